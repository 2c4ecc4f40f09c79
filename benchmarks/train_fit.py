"""Does a trained model fit its own training pairs? A check that separates "the loop does not learn" from "what it
learns does not carry to unseen papers".

    python -m benchmarks.train_fit [--model moebert=outputs/moebert] [--model base=PATH] [--dataset DOMAIN=SOURCE ...]

For each domain, the train positives are scored against as many random pairs of train abstracts that are not
co-cited (seed 0), scored by eval.py (run as a command); results go to eval_results/train_fit/.
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from moebert.data.cocitation import sample_negatives
from moebert.data.pairs import load_domain_datasets, parse_dataset_specs

ROOT = Path(__file__).resolve().parents[1]


def train_pairs_with_random_negatives(train: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    positives = train.loc[train.label == 1, ["a", "b"]]
    texts = sorted(set(positives.a) | set(positives.b))
    index = {text: i for i, text in enumerate(texts)}
    i, j = positives.a.map(index).to_numpy(), positives.b.map(index).to_numpy()
    co_cited = np.unique(np.minimum(i, j) * len(texts) + np.maximum(i, j))  # keys as sample_negatives reads them
    drawn = sample_negatives(np.arange(len(texts)), len(positives), co_cited, np.zeros(0, np.int64), len(texts), rng)
    negatives = pd.DataFrame({"a": [texts[k] for k in drawn[:, 0]], "b": [texts[k] for k in drawn[:, 1]]})
    return pd.concat([positives.assign(label=1), negatives.assign(label=0)])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="as in eval.py (default: eval.py's default models)")
    parser.add_argument("--dataset", action="append", help="DOMAIN=SOURCE, repeatable (default: embedded sample)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        flags = []
        for domain, dataset in load_domain_datasets(parse_dataset_specs(args.dataset)).items():
            frame = train_pairs_with_random_negatives(dataset["train"].to_pandas(), rng)
            (Path(folder) / domain).mkdir()
            for split in ("train", "valid", "test"):  # every split is the training pairs: a fit, not a test
                frame.to_parquet(Path(folder) / domain / f"{split}.parquet")
            flags += ["--dataset", f"{domain}={Path(folder) / domain}"]
        models = [flag for spec in args.model or [] for flag in ("--model", spec)]
        command = [sys.executable, "eval.py", *models, *flags, "--output_dir", "eval_results/train_fit"]
        subprocess.run(command, cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
