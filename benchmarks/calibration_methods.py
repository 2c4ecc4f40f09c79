"""Platt scaling against isotonic regression for the cosine -> P(co-cited) map, on `valid` only.

    python eval.py --split valid --model moebert=outputs/moebert --output_dir eval_valid
    python -m benchmarks.calibration_methods eval_valid/predictions.csv --model moebert

Two-fold cross-validation within each domain: each map is fitted on one half of a domain's valid pairs and scores
the other half; the held-out probabilities of all domains are pooled for the expected calibration error and the
Brier score.
"""

import argparse

import numpy as np
import pandas as pd
from sklearn.isotonic import IsotonicRegression

from moebert.evaluation.calibration import calibration_metrics, fit_platt, platt


def held_out(scores: np.ndarray, labels: np.ndarray, fit: np.ndarray) -> dict:
    """Both maps fitted on the pairs `fit`, applied to the others."""
    a, b = fit_platt(scores[fit], labels[fit])
    isotonic = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(scores[fit], labels[fit])
    return {"platt": platt(scores[~fit], a, b), "isotonic": isotonic.predict(scores[~fit])}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictions", help="predictions.csv of `eval.py --split valid`")
    parser.add_argument("--model", default="moebert")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    predictions = pd.read_csv(args.predictions)
    predictions = predictions[predictions.model == args.model]
    rng = np.random.default_rng(args.seed)
    pooled = {"platt": ([], []), "isotonic": ([], [])}
    for _, rows in predictions.groupby("domain"):
        scores, labels = rows.cosine.to_numpy(), rows.label.to_numpy()
        fold = rng.permutation(len(scores)) % 2 == 0
        for fit in (fold, ~fold):
            for name, probabilities in held_out(scores, labels, fit).items():
                pooled[name][0].append(probabilities)
                pooled[name][1].append(labels[~fit])
    print(f"{args.model}, valid, two-fold cross-validation within each domain, pooled:")
    for name, (probabilities, labels) in pooled.items():
        metrics = calibration_metrics(np.concatenate(probabilities), np.concatenate(labels))
        print(f"  {name:>8}: ECE {metrics['ece']:.4f}, Brier {metrics['brier']:.4f}")


if __name__ == "__main__":
    main()
