"""What eval.py writes and shows: markdown tables, bootstrap gains, the scored pairs, and plots where people look
(score histograms, ROC curves, reliability diagrams). Every file is written whole (moebert.atomic)."""

import logging
from pathlib import Path

import numpy as np

from moebert.atomic import write_file, writing_file
from moebert.evaluation.calibration import calibration_metrics, platt, reliability_curve
from moebert.evaluation.metrics import BOOTSTRAP_METRICS, paired_bootstrap
from moebert.evaluation.scoring import SUMMARIES

logger = logging.getLogger(__name__)

TABLE_METRICS = ("f1_max", "roc_auc", "f1_at_valid_threshold")
NOT_DOMAINS = ("bootstrap", "calibration")  # keys of a model's results that are neither domains nor summaries


def calibration_table(results: dict) -> str:
    """Pooled over domains (one threshold for all): raw cosines against calibrated probabilities, per model."""
    lines = ["| pooled over domains | ROC-AUC raw / calibrated | F1max raw / calibrated | its threshold raw / calibrated "
             "| ECE raw / calibrated | Brier raw / calibrated |", "|---|---|---|---|---|---|"]
    for label, per_model in results.items():
        if "calibration" in per_model:
            report = per_model["calibration"]
            cells = [" / ".join(f"{report[v]['pooled'][m]:.3f}" for v in ("raw", "calibrated"))
                     for m in ("roc_auc", "f1_max", "f1_max_threshold", "ece", "brier")]
            lines.append(f"| {label} ({report.get('fitted_by', 'model')}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_table(results: dict, metric: str) -> str:
    domains = sorted({d for per_model in results.values() for d in per_model if d not in SUMMARIES + NOT_DOMAINS})
    domains += list(SUMMARIES)
    lines = [f"| {metric} | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for label, per_domain in results.items():
        cells = [per_domain.get(d, {}).get(metric) for d in domains]
        if all(c is None for c in cells) and "error" not in per_domain.get("all", {}):
            continue  # e.g. the honest protocol for calibrated probabilities: nothing to show
        lines.append(f"| {label} | " + " | ".join("n/a" if v is None else f"{v:.3f}" for v in cells) + " |")
    return "\n".join(lines)


def bootstrap_gains(predictions: dict, references: list[str], resamples: int) -> dict:
    """{model: {"vs REFERENCE": gains}} for every model scored on the same domains as the reference."""
    per_model = {}
    for (label, domain), arrays in predictions.items():
        per_model.setdefault(label, {})[domain] = arrays
    gains = {}
    for reference in references:
        same_pairs = {m: s for m, s in per_model.items() if set(s) == set(per_model[reference])}
        logger.info(f"bootstrap: {resamples} resamples of the pairs, gains over {reference} ...")
        for model, gain in paired_bootstrap(same_pairs, reference, resamples).items():
            if model != reference:
                gains.setdefault(model, {})[f"vs {reference}"] = gain
    return gains


def gains_table(gains: dict) -> str:
    """One row per model and reference: each metric's gain with its 95% interval, mean over domains and pooled."""
    columns = [(view, name) for view in SUMMARIES for name in BOOTSTRAP_METRICS]
    lines = [
        "| gain (95% CI) | " + " | ".join(f"{name} ({view})" for view, name in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for model, per_reference in gains.items():
        for reference, gain in per_reference.items():
            cells = [gain[view][name] for view, name in columns]
            cells = [f"{c['gain']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]" for c in cells]
            lines.append(f"| {model} {reference} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def domain_gains_table(gains: dict, metric: str = "roc_auc") -> str:
    """One row per model and reference: each domain's gain in `metric` with its 95% interval, so a domain that loses
    shows (its interval wholly below 0) even where the mean gains."""
    per_reference = [(model, reference, gain) for model, refs in gains.items() for reference, gain in refs.items()]
    domains = [view for view in per_reference[0][2] if view not in SUMMARIES] if per_reference else []
    lines = [f"| {metric} gain per domain (95% CI) | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for model, reference, gain in per_reference:
        cells = [gain[d][metric] for d in domains]
        lines.append(f"| {model} {reference} | "
                     + " | ".join(f"{c['gain']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]" for c in cells) + " |")
    return "\n".join(lines)


def write_predictions(path: Path, predictions: dict):
    rows = ["pair_id,domain,model,cosine,label\n"]
    for (label, domain), (scores, labels) in predictions.items():
        rows += [f"{pair_id},{domain},{label},{score:.6f},{truth}\n" for pair_id, (score, truth) in enumerate(zip(scores, labels))]
    write_file(path, "".join(rows))


def save_figure(fig, path: Path):
    import matplotlib.pyplot as plt

    with writing_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def plot(predictions: dict, results: dict, output_dir: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    domains = sorted({domain for _, domain in predictions})
    for (label, domain), (scores, labels) in predictions.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        bins = np.linspace(min(scores.min(), 0), 1, 40)
        ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label="co-cited")
        ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label="random")
        threshold = results[label][domain].get("f1_max_threshold")
        if threshold is not None:
            ax.axvline(threshold, color="black", linestyle="--", label=f"F1max threshold {threshold:.3f}")
        ax.set(xlabel="cosine similarity", ylabel="pairs", title=f"{label}: {domain}")
        ax.legend()
        fig.tight_layout()
        save_figure(fig, output_dir / f"hist_{_safe(label)}_{_safe(domain)}.png")
    for domain in domains:
        fig, ax = plt.subplots(figsize=(5, 5))
        for (label, d), (scores, labels) in predictions.items():
            if d == domain and len(set(labels.tolist())) == 2:
                fpr, tpr, _ = roc_curve(labels, scores)
                ax.plot(fpr, tpr, label=f"{label} (AUC {results[label][domain]['roc_auc']:.3f})")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC: {domain}")
        ax.legend(loc="lower right")
        fig.tight_layout()
        save_figure(fig, output_dir / f"roc_{_safe(domain)}.png")


def plot_reliability(results: dict, predictions: dict, output_dir: Path):
    """Per calibrated model: observed co-citation frequency against the predicted probability, pooled over domains,
    raw cosines and calibrated probabilities (a calibrated model follows the diagonal)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for label, per_model in results.items():
        if "calibration" not in per_model:
            continue
        parameters = per_model["calibration"]["parameters"]
        raw = [predictions[(label, d)] for d in parameters if (label, d) in predictions]
        scores, labels = (np.concatenate([r[i] for r in raw]) for i in (0, 1))
        probabilities = np.concatenate([platt(predictions[(label, d)][0], *parameters[d]) for d in parameters
                                        if (label, d) in predictions])
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
        for name, values in (("cosine read as a probability", scores), ("calibrated probability", probabilities)):
            predicted, observed, _ = reliability_curve(values, labels)
            ece = calibration_metrics(values, labels)["ece"]
            ax.plot(predicted, observed, marker="o", label=f"{name} (ECE {ece:.3f})")
        ax.set(xlabel="predicted probability of co-citation", ylabel="observed share co-cited",
               title=f"{label}: reliability, all domains pooled", xlim=(0, 1), ylim=(0, 1))
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        save_figure(fig, output_dir / f"reliability_{_safe(label)}.png")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
