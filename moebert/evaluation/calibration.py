"""Fitting calibrations: per domain, a map from cosine similarity to the probability that two texts are co-cited.

Platt scaling, `sigmoid(a * cosine + b)` fitted on the `valid` pairs (co-cited and random in equal numbers), so one
threshold means the same in every domain where raw cosines do not. A MoE-BERT stores its maps in its config
(`calibration`: {"method", "fitted_on", "fitted_by", "parameters": {domain: [a, b]}}), which applies them
(`MoEBertConfig.cocitation_probability`, used by the model and every encoder); here they are fitted (train.py after
every validation, `eval.py` for models without one, `eval.py calibrate`) and scored, with `platt` applying a fitted
map to arrays of scores.
"""

import numpy as np

from moebert.evaluation.metrics import OneClassError, checked_pairs, f1_max, roc_auc


def platt(scores, a: float, b: float) -> np.ndarray:
    """P(co-cited) = sigmoid(a * score + b)."""
    return 1.0 / (1.0 + np.exp(-(a * np.asarray(scores, dtype=np.float64) + b)))


def fit_platt(scores, labels) -> tuple[float, float]:
    """(a, b) of `platt` by maximum likelihood (logistic regression on the one score, unregularised). Monotone when
    a > 0."""
    from sklearn.linear_model import LogisticRegression

    scores, labels = checked_pairs(scores, labels)
    fit = LogisticRegression(C=np.inf, max_iter=1000).fit(scores[:, None], labels)
    return float(fit.coef_[0, 0]), float(fit.intercept_[0])


def fit_calibration(scored: dict, fitted_by: str = "train.py", kept: dict | None = None) -> dict:
    """Per domain, Platt scaling fitted on its `valid` scores ({domain: {"valid": (scores, labels), ...}}): what a
    MoE-BERT config stores as `calibration`. Domains whose valid split has one class only get none; the domains of
    the calibration `kept` that were not scored keep their maps (their experts did not change)."""
    parameters = {d: p for d, p in (kept or {}).get("parameters", {}).items() if d not in scored}
    for domain, splits in scored.items():
        try:
            parameters[domain] = list(fit_platt(*splits["valid"]))
        except OneClassError:
            continue
    return {"method": "platt", "fitted_on": "valid", "fitted_by": fitted_by, "parameters": parameters}


def describe(a: float, b: float) -> str:
    """One line on a domain's map, for people."""
    midpoint = f"0.5 at cosine {-b / a:.3f}" if a > 0 else "its valid cosines do not rank co-cited pairs higher"
    return f"P(co-cited) = sigmoid({a:.3f} * cosine {b:+.3f}); {midpoint}"


def calibration_metrics(probabilities, labels, bins: int = 10) -> dict:
    """Expected calibration error (`bins` equal-width bins of predicted probability, each weighted by its share of
    the pairs: |mean predicted - observed frequency|) and the Brier score (mean squared error of the probability)."""
    probabilities, labels = checked_pairs(np.clip(probabilities, 0.0, 1.0), labels)
    which = np.minimum((probabilities * bins).astype(int), bins - 1)
    gaps = [abs(probabilities[which == k].mean() - labels[which == k].mean()) * (which == k).mean()
            for k in range(bins) if (which == k).any()]
    return {"ece": float(sum(gaps)), "brier": float(np.mean((probabilities - labels) ** 2))}


def reliability_curve(probabilities, labels, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean predicted probability, observed frequency, pairs) per non-empty bin: the points of a reliability plot."""
    probabilities, labels = np.clip(np.asarray(probabilities, dtype=np.float64), 0, 1), np.asarray(labels)
    which = np.minimum((probabilities * bins).astype(int), bins - 1)
    kept = [k for k in range(bins) if (which == k).any()]
    return (np.array([probabilities[which == k].mean() for k in kept]), np.array([labels[which == k].mean() for k in kept]),
            np.array([(which == k).sum() for k in kept]))


def calibrated(scored: dict, split: str, calibration: dict) -> dict:
    """{domain: (probabilities, labels)} of `split` for the domains the calibration covers."""
    parameters = calibration["parameters"]
    return {d: (platt(splits[split][0], *parameters[d]), splits[split][1]) for d, splits in scored.items()
            if d in parameters}


def calibration_report(scored: dict, split: str, calibration: dict) -> dict:
    """Raw cosines and calibrated probabilities of `split`, side by side: pooled ROC-AUC, F1max and the threshold
    it picks (one threshold for all domains), expected calibration error and Brier score, pooled and per domain
    (raw cosines read as probabilities, clipped to [0, 1])."""
    parameters = calibration["parameters"]
    raw = {d: splits[split] for d, splits in scored.items() if d in parameters}
    views = {"raw": raw, "calibrated": calibrated(scored, split, calibration)}
    report = {k: v for k, v in calibration.items() if k != "parameters"} | {"parameters": parameters}
    for view, per_domain in views.items():
        scores, labels = (np.concatenate([arrays[i] for arrays in per_domain.values()]) for i in (0, 1))
        best = f1_max(scores, labels)
        report[view] = {
            "pooled": {"roc_auc": roc_auc(scores, labels), "f1_max": best["f1_max"],
                       "f1_max_threshold": best["f1_max_threshold"]} | calibration_metrics(scores, labels),
            "per_domain": {d: calibration_metrics(*arrays) for d, arrays in per_domain.items()},
        }
    return report
