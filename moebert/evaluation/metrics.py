"""Metrics of how well a similarity score separates co-cited pairs (label 1) from random pairs (label 0).

One implementation for `eval.py` and for the evaluation inside `train.py`; the calibration of scores into
probabilities is in `moebert.evaluation.calibration`. Threshold searches are exact: the scores
are sorted once (by scikit-learn's curve functions) and every cut between two distinct scores is considered; a
pair is predicted co-cited when its score is >= the threshold.
"""

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve


BASE_METRICS = ("f1_max", "roc_auc", "average_precision")  # the headline metrics of a split


class OneClassError(ValueError):
    """The labels hold a single class: F1max, ROC-AUC and thresholds mean nothing there."""


def checked_pairs(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(int)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be two 1-d arrays of one length.")
    classes = set(np.unique(labels).tolist())
    if not classes <= {0, 1}:
        raise ValueError(f"labels must be 0 or 1, found {sorted(classes)}.")
    if len(classes) < 2:
        raise OneClassError(
            f"all {len(labels)} pairs have label {classes.pop() if classes else '-'}: threshold metrics need both "
            "co-cited (1) and random (0) pairs."
        )
    return scores, labels


def f1_max(scores, labels) -> dict:
    """The best F1 over all thresholds, with its threshold, precision and recall."""
    scores, labels = checked_pairs(scores, labels)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    precision, recall = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision), where=precision + recall > 0)
    best = int(np.argmax(f1))
    return {
        "f1_max": float(f1[best]),
        "f1_max_threshold": float(thresholds[best]),
        "precision_at_f1_max": float(precision[best]),
        "recall_at_f1_max": float(recall[best]),
    }


def best_accuracy(scores, labels) -> dict:
    """The best accuracy over all thresholds (predicting all pairs random included) and its threshold."""
    scores, labels = checked_pairs(scores, labels)
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    positives, negatives = labels.sum(), len(labels) - labels.sum()
    accuracy = (tpr * positives + (1 - fpr) * negatives) / len(labels)
    best = int(np.argmax(accuracy))
    return {"accuracy_max": float(accuracy[best]), "accuracy_max_threshold": float(thresholds[best])}


def at_threshold(scores, labels, threshold: float) -> dict:
    """F1, precision, recall and accuracy when pairs scoring >= `threshold` are called co-cited."""
    scores, labels = checked_pairs(scores, labels)
    predicted = scores >= threshold
    tp = int((predicted & (labels == 1)).sum())
    precision = tp / predicted.sum() if predicted.any() else 0.0
    recall = tp / labels.sum()
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": f1, "precision": precision, "recall": recall, "accuracy": float((predicted == labels).mean())}


def pair_metrics(scores, labels) -> dict:
    """All threshold-free and best-threshold metrics of one split (the paper's protocol: the threshold is chosen
    on the split it is scored on)."""
    scores, labels = checked_pairs(scores, labels)
    mean_positive, mean_negative = float(scores[labels == 1].mean()), float(scores[labels == 0].mean())
    return (
        f1_max(scores, labels)
        | best_accuracy(scores, labels)
        | {
            "roc_auc": float(roc_auc_score(labels, scores)),
            "average_precision": float(average_precision_score(labels, scores)),
            "mean_cosine_positive": mean_positive,
            "mean_cosine_negative": mean_negative,
            "cosine_ratio": mean_positive / mean_negative if mean_negative else float("inf"),
        }
    )


def honest_metrics(valid_scores, valid_labels, test_scores, test_labels) -> dict:
    """The honest protocol: the F1max threshold is chosen on `valid` and applied, unchanged, to `test`."""
    threshold = f1_max(valid_scores, valid_labels)["f1_max_threshold"]
    scored = at_threshold(test_scores, test_labels, threshold)
    return {f"{name}_at_valid_threshold": value for name, value in scored.items()} | {"valid_threshold": threshold}


# --------------------------------------------------------------------------------------------- bootstrap


def roc_auc(scores, labels) -> float:
    """ROC-AUC as the Mann-Whitney statistic (ties count one half): the same number as scikit-learn's, without
    its per-call overhead, for the thousands of calls of a bootstrap."""
    scores, labels = checked_pairs(scores, labels)
    ranks = rankdata(scores)  # average ranks for ties
    positives = labels.sum()
    negatives = len(labels) - positives
    return float((ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def f1_max_value(scores, labels) -> float:
    """The best F1 over all thresholds (cuts between distinct scores), as `f1_max` computes it."""
    scores, labels = checked_pairs(scores, labels)
    order = np.argsort(-scores, kind="stable")
    sorted_scores, true_positives = scores[order], np.cumsum(labels[order])
    cuts = np.flatnonzero(np.r_[sorted_scores[1:] != sorted_scores[:-1], True])  # last index of each distinct score
    predicted = cuts + 1
    return float((2 * true_positives[cuts] / (predicted + labels.sum())).max())


BOOTSTRAP_METRICS = {"roc_auc": roc_auc, "f1_max": f1_max_value}


def paired_bootstrap(per_model: dict, reference: str, resamples: int = 1000, seed: int = 0) -> dict:
    """Gains over `reference`, with 95% percentile intervals, from the same resampled pairs for every model.

    `per_model`: {model: {domain: (scores, labels)}}, every model scored on the same pairs in the same order.
    Each resample draws, within every domain and label, as many pairs as there are, with replacement (the strata
    keep their sizes). Gains are given for the mean over domains, for all domains pooled and for each domain:
    {model: {"mean" | "all" | DOMAIN: {metric: {"gain", "low", "high"}}}}."""
    domains = list(per_model[reference])
    labels = {d: np.asarray(per_model[reference][d][1]).astype(int) for d in domains}
    rng = np.random.default_rng(seed)
    draws = [_stratified_draw(labels, rng) for _ in range(resamples)]
    values = {model: _bootstrap_values(per_model[model], labels, draws) for model in per_model}
    gains = {}
    for model, value in values.items():
        gains[model] = {}
        for view, metrics in value.items():
            gains[model][view] = {}
            for name, (point, resampled) in metrics.items():
                ref_point, ref_resampled = values[reference][view][name]
                differences = resampled - ref_resampled
                low, high = np.percentile(differences, [2.5, 97.5])
                gains[model][view][name] = {"gain": point - ref_point, "low": float(low), "high": float(high)}
    return gains


def _stratified_draw(labels: dict, rng) -> dict:
    draw = {}
    for domain, y in labels.items():
        parts = [np.flatnonzero(y == c) for c in (0, 1)]
        draw[domain] = np.concatenate([p[rng.integers(0, len(p), len(p))] for p in parts])
    return draw


def _bootstrap_values(scored: dict, labels: dict, draws: list) -> dict:
    """{view: {metric: (value on the pairs as they are, array of values on each resample)}}; views "mean", "all"
    and each domain."""
    scores = {d: np.asarray(scored[d][0], dtype=np.float64) for d in labels}
    everything = {d: np.arange(len(labels[d])) for d in labels}
    out = {"mean": {}, "all": {}} | {d: {} for d in labels}
    for name, metric in BOOTSTRAP_METRICS.items():
        def per_domain(draw):
            return [metric(scores[d][draw[d]], labels[d][draw[d]]) for d in labels]

        def pooled(draw):
            return metric(
                np.concatenate([scores[d][draw[d]] for d in labels]), np.concatenate([labels[d][draw[d]] for d in labels])
            )

        point, resampled = per_domain(everything), np.array([per_domain(draw) for draw in draws])  # (draws, domains)
        out["mean"][name] = (float(np.mean(point)), resampled.mean(axis=1))
        out["all"][name] = (pooled(everything), np.array([pooled(draw) for draw in draws]))
        for column, d in enumerate(labels):
            out[d][name] = (point[column], resampled[:, column])
    return out


# --------------------------------------------------------------------------------------------- ranking


def ranking_metrics(similarity: np.ndarray, partners: dict, recall_ks=(10,)) -> dict:
    """MRR, Recall@k and nDCG@10 of ranking, for each query row `q` of `similarity`, every other column; the
    relevant columns of `q` are `partners[q]`. Candidates a query must not see can be set to -inf."""
    reciprocal_ranks, ndcgs, recalls = [], [], {k: [] for k in recall_ks}
    for query, relevant in partners.items():
        ranking = np.argsort(-similarity[query], kind="stable")
        hits = np.isin(ranking[ranking != query], list(relevant))
        reciprocal_ranks.append(1 / (np.argmax(hits) + 1) if hits.any() else 0.0)
        for k in recall_ks:
            recalls[k].append(hits[:k].sum() / len(relevant))
        gains = hits[:10] / np.log2(np.arange(2, 2 + len(hits[:10])))
        ideal = (1 / np.log2(np.arange(2, 2 + min(len(relevant), 10)))).sum()
        ndcgs.append(gains.sum() / ideal)
    return {"mrr": float(np.mean(reciprocal_ranks)), "ndcg_at_10": float(np.mean(ndcgs))} | {
        f"recall_at_{k}": float(np.mean(values)) for k, values in recalls.items()
    }


def metric_summary(results: dict) -> dict:
    """The headline metrics of evaluated results: the mean over domains, and pooled (`pooled_`)."""
    return {
        f"{prefix}{name}": results[key][name]
        for key, prefix in (("mean", ""), ("all", "pooled_"))
        for name in BASE_METRICS
        if name in results.get(key, {})
    }
