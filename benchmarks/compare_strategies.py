"""The paper's claim side by side: one MoE with an expert per domain against one specialist per domain (strategy 1),
one shared model trained on all domains, the untrained base, TF-IDF and all-mpnet-base-v2, on the same `test`
pairs.

    python -m benchmarks.compare_strategies [--output_dir outputs/strategies] [--max_train_steps N] [--recipe quick]
                                            [--bootstrap 1000] [--serving_texts 500]

Every trained row starts from the same base (train.py's default, or --model_name_or_path) under the same recipe and
the same budget of optimizer steps: the MoE and the shared model take N steps over all domains; the specialists
(`train.py --specialist`) share N steps between them in proportion to their domains' train pairs, as the MoE's
domain batches do, each evaluated on its own `valid` about as often. On a CPU the quick recipe's step: the MoE's
experts in the top layers; the specialists train those layers whole, attention included, since nothing is shared.
Each is trained by train.py in a process of its own (its wall time and peak memory recorded); a row already trained
in OUTPUT_DIR is kept, so a stopped comparison goes on where it stopped. Then eval.py scores every row (ROC-AUC,
F1max per domain and mean, each row's gain over the MoE with a paired bootstrap interval), and each row serves
every domain once in a fresh process (TF-IDF aside): parameters, disk, peak memory, abstracts/s over the same `test`
abstracts.
Everything goes to OUTPUT_DIR/comparison.md (and eval/, costs.json).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAINED_ROWS = ("moe", "specialists", "shared")
MPNET = "sentence-transformers/all-mpnet-base-v2"


def specialist_steps(train_pairs: dict[str, int], total: int, alpha: float = 1.0) -> dict[str, int]:
    """The budget of `total` steps shared in proportion to each domain's train pairs to the power `alpha`, as the
    MoE's domain batches are (at least one step each), rounded so that the shares add up to `total` (largest
    remainders first)."""
    weights = {d: n**alpha for d, n in train_pairs.items()}
    exact = {d: total * w / sum(weights.values()) for d, w in weights.items()}
    steps = {d: int(x) for d, x in exact.items()}
    for d in sorted(exact, key=lambda d: exact[d] - steps[d], reverse=True)[: total - sum(steps.values())]:
        steps[d] += 1
    return {d: max(1, n) for d, n in steps.items()}


def train_pair_counts(datasets: list[str] | None) -> dict[str, int]:
    from moebert.data.pairs import load_domain_datasets, parse_dataset_specs

    loaded = load_domain_datasets(parse_dataset_specs(datasets), splits=("train",))
    return {d: sum(1 for label in dataset["train"]["label"] if label == 1) for d, dataset in loaded.items()}


def run_measured(command: list[str], log: Path) -> dict:
    """Run a command (its output to `log`), return its wall seconds and peak resident memory; a failure stops the
    comparison naming the log."""
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"error: {' '.join(command)} failed (exit {process.returncode}); see {log}")
    return {"seconds": round(time.perf_counter() - started, 1), "peak_gib": round(usage.ru_maxrss / 2**20, 2)}


def train_rows(args, out: Path) -> dict:
    """Train every row not trained yet; {row: [its runs' costs]}."""
    common = [sys.executable, "train.py", "--recipe", args.recipe, "--stem_cache_dir", str(out / "stem-cache")]
    common += [f"--dataset={spec}" for spec in args.dataset or []]
    common += ["--model_name_or_path", args.model_name_or_path] if args.model_name_or_path else []
    budget = ["--max_train_steps", str(args.max_train_steps)] if args.max_train_steps else []
    total = args.max_train_steps or recipe_steps(args.recipe)
    recipe_alpha = recipe_value(args.recipe, "domain_sampling_alpha")
    every = ["--eval_steps", str(max(1, total // 10))] if args.max_train_steps else []
    runs = {
        "moe": [(out / "moe", [*budget, *every])],
        "shared": [(out / "shared", [*budget, *every, "--shared_expert", "--no-select_experts_per_domain",
                                     "--load_best_model_at_end"])],
        "specialists": [(out / "specialists" / d, ["--specialist", d, "--max_train_steps", str(n), "--eval_steps",
                                                   str(max(1, n // 10))])
                        for d, n in specialist_steps(train_pair_counts(args.dataset), total, recipe_alpha).items()],
    }
    costs = json.loads((out / "training.json").read_text()) if (out / "training.json").exists() else {}
    for row, row_runs in runs.items():
        for folder, flags in row_runs:
            if (folder / "config.json").exists():
                continue
            print(f"training {row}: {folder}", flush=True)
            cost = run_measured([*common, "--output_dir", str(folder), *flags], out / f"train-{folder.name}.log")
            costs.setdefault(row, {})[folder.name] = cost
            (out / "training.json").write_text(json.dumps(costs, indent=2) + "\n")
    return costs


def recipe_value(recipe: str, setting: str):
    from moebert.training.recipes import RECIPES

    return RECIPES[recipe][setting]


def recipe_steps(recipe: str) -> int:
    steps = recipe_value(recipe, "max_train_steps")
    if steps is None:
        raise SystemExit(f"error: recipe {recipe} trains by epochs; give --max_train_steps to share a step budget")
    return steps


def models(args, out: Path) -> dict[str, str]:
    from moebert.names import default_base_model

    rows = {"moe": out / "moe", "specialists": out / "specialists", "shared": out / "shared",
            "base": args.model_name_or_path or default_base_model(), "tfidf": "tfidf"}
    if not args.no_mpnet:
        rows["all-mpnet-base-v2"] = MPNET
    return {label: str(path) for label, path in rows.items()}


def serve(label: str, spec: str, count: int, datasets: list[str] | None) -> dict:
    """In this process: load the row as eval.py would and embed `count` `test` abstracts, each domain through its
    own expert or specialist; its parameters, disk and speed (the caller reads the peak memory)."""
    from moebert.data.pairs import load_domain_datasets, parse_dataset_specs
    from moebert.encoders.interface import embed
    from moebert.encoders.loader import load_encoder
    from moebert.encoders.options import EncodingOptions

    loaded = load_domain_datasets(parse_dataset_specs(datasets), splits=("test",))
    texts, domains = [], []
    for domain, dataset in loaded.items():
        unique = sorted(set(dataset["test"]["a"]) | set(dataset["test"]["b"]))
        texts += unique[: count // len(loaded)]
        domains += [domain] * len(unique[: count // len(loaded)])
    encoder = load_encoder(spec, EncodingOptions(device="cpu"))
    first_of_each = [domains.index(d) for d in dict.fromkeys(domains)]
    embed(encoder, [texts[i] for i in first_of_each], [domains[i] for i in first_of_each])  # every specialist loaded
    started = time.perf_counter()
    embed(encoder, texts, domains)
    seconds = time.perf_counter() - started
    return {"abstracts_per_s": round(len(texts) / seconds, 1), "texts": len(texts),
            "parameters": parameter_count(encoder), "disk_mb": round(disk_bytes(spec) / 1e6, 1)}


def parameter_count(encoder) -> int | None:
    parts = getattr(encoder, "_encoders", None) or {"": encoder}  # specialists: every one of them
    counted = [getattr(part, "model", None) for part in parts.values()]
    if any(model is None or not hasattr(model, "parameters") for model in counted):
        return None  # TF-IDF: a vocabulary, no weights
    return sum(p.numel() for model in counted for p in model.parameters())


def disk_bytes(spec: str) -> int:
    """The weights a user downloads to serve every domain: the model's safetensors (not the expert files beside
    them), every specialist's, or those of the local copy of a Hub id shipped as a package."""
    from moebert.encoders.specialists import specialist_folders
    from moebert.names import local_copy

    folder = Path(local_copy(spec))
    folders = list((specialist_folders(folder) or {}).values()) or [folder]
    return sum(weights.stat().st_size for model in folders for weights in model.glob("*.safetensors"))


def serving_costs(args, out: Path, rows: dict[str, str]) -> dict:
    costs = {}
    for label, spec in rows.items():
        if spec == "tfidf":  # fitted per domain by eval.py; no weights to serve
            continue
        log = out / f"serve-{label}.log"
        command = [sys.executable, "-m", "benchmarks.compare_strategies", "--serve", label, spec, "--serving_texts",
                   str(args.serving_texts), "--output_dir", str(out), *[f"--dataset={s}" for s in args.dataset or []]]
        measured = run_measured(command, log)
        costs[label] = json.loads(log.read_text().strip().splitlines()[-1]) | {"peak_gib": measured["peak_gib"]}
        print(f"serving {label}: {costs[label]}", flush=True)
    (out / "costs.json").write_text(json.dumps(costs, indent=2) + "\n")
    return costs


def cost_table(costs: dict, training: dict) -> str:
    lines = ["| row | parameters (all domains) | disk | peak memory serving | abstracts/s | training (wall, peak) |",
             "|---|---|---|---|---|---|"]
    for label, cost in costs.items():
        runs = training.get(label, {}).values()
        trained = (f"{sum(r['seconds'] for r in runs) / 60:.1f} min, {max(r['peak_gib'] for r in runs):.2f} GiB"
                   + (f" ({len(runs)} runs)" if len(runs) > 1 else "")) if runs else "-"
        parameters = f"{cost['parameters'] / 1e6:.1f}M" if cost["parameters"] else "-"
        lines.append(f"| {label} | {parameters} | {cost['disk_mb']:.0f} MB | {cost['peak_gib']:.2f} GiB | "
                     f"{cost['abstracts_per_s']:.1f} | {trained} |")
    return "\n".join(lines)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/strategies"))
    parser.add_argument("--model_name_or_path", default=None, help="the base of every row (default: train.py's)")
    parser.add_argument("--dataset", action="append", help="DOMAIN=SOURCE, repeatable (default: embedded sample)")
    parser.add_argument("--recipe", default="quick", help="train.py's recipe for every trained row")
    parser.add_argument("--max_train_steps", type=int, default=None, help="the step budget of every trained row "
                        "(default: the recipe's)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--serving_texts", type=int, default=500, help="test abstracts each row embeds for its speed")
    parser.add_argument("--no_mpnet", action="store_true", help="leave out all-mpnet-base-v2 (it needs "
                        "benchmarks/requirements-mpnet.txt offline)")
    parser.add_argument("--serve", nargs=2, metavar=("LABEL", "SPEC"), help=argparse.SUPPRESS)  # one row's serving
    return parser.parse_args()


def main():
    args = parse_args()
    if args.serve:
        print(json.dumps(serve(*args.serve, args.serving_texts, args.dataset)))
        return
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    training = train_rows(args, out)
    rows = models(args, out)
    evaluation = [sys.executable, "eval.py", *[f"--model={label}={spec}" for label, spec in rows.items()],
                  "--reference", "moe", "--bootstrap", str(args.bootstrap), "--output_dir", str(out / "eval"),
                  *[f"--dataset={s}" for s in args.dataset or []]]
    print("scoring every row on test", flush=True)
    training["eval"] = {"eval.py": run_measured(evaluation, out / "eval.log")}
    (out / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    costs = serving_costs(args, out, rows)
    report = ((out / "eval" / "results.md").read_text() + "\n\nServing every domain, one process per row (CPU):\n\n"
              + cost_table(costs, training) + "\n")
    (out / "comparison.md").write_text(report)
    print(report + f"\nwritten to {out}/comparison.md")


if __name__ == "__main__":
    main()
