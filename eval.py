"""Score how well cosine similarity of abstract embeddings separates co-cited pairs from random pairs.

    python eval.py --bootstrap 1000                   # embedded default (SYNERGY): base model and TF-IDF, and
                                                      # the models train.py wrote to outputs/moebert and
                                                      # outputs/shared-expert if present; gains over the base
                                                      # with 95% intervals
    python eval.py --model ours=path/or/hub-id --model tfidf --dataset CVD=GleghornLab/abstract_domain_cvd

Models: a MoE-BERT checkpoint (each pair routed to its domain's expert), any Hugging Face encoder (mean pooling
over non-padding tokens), or `tfidf`. Each unique text is encoded once per model and domain. Metrics per domain
and pooled (`all`): the paper's protocol (threshold chosen on the evaluated split itself) and, for `--split test`,
the honest protocol (threshold chosen on `valid`, applied to `test`); plus a retrieval view (MRR, Recall@10,
nDCG@10). With `--bootstrap N`, each model's gain over `--reference` (default: the base model) in mean-over-domains
and pooled ROC-AUC and F1max, with a 95% paired bootstrap interval (the same resampled pairs for both models,
drawn within each domain and label). Writes `results.json`, `predictions.csv`, a markdown table and PNG plots into
`--output_dir`.
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from data.loading import DatasetError, load_domain_dataset, parse_dataset_specs
from defaults import default_base_model
from encoders import BACKENDS, BATCH_SIZE_HELP, RemoteCodeError, autocast, default_device, load_encoder, normalise
from metrics import (
    BOOTSTRAP_METRICS,
    OneClassError,
    calibration_metrics,
    f1_max,
    fit_platt,
    honest_metrics,
    pair_metrics,
    paired_bootstrap,
    platt,
    reliability_curve,
    roc_auc,
)

DEFAULT_TRAINED = {"moebert": Path("outputs/moebert"), "shared": Path("outputs/shared-expert")}  # train.py's outputs
TABLE_METRICS = ("f1_max", "roc_auc", "f1_at_valid_threshold")
SUMMARIES = ("mean", "all")  # keys of a model's results beside its domains
NOT_DOMAINS = ("bootstrap", "calibration")  # and keys that are neither domains nor summaries


def parse_model_specs(specs: list[str] | None) -> dict[str, str]:
    """`NAME=PATH`, `PATH` or `tfidf` -> {label: path}; none -> base model, TF-IDF, and the trained default."""
    if not specs:
        trained = [f"{label}={path}" for label, path in DEFAULT_TRAINED.items() if path.exists()]
        specs = trained + [f"base={default_base_model()}", "tfidf"]
    models = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        label, path = (label, path) if sep and not Path(spec).exists() else (Path(spec).name or spec, spec)
        models[label] = path
    return models


# ------------------------------------------------------------------------------------------------ scoring


class EncodedSplit:
    """One split's unique texts, each encoded once (unit-length rows), and the cosine of each of its pairs."""

    def __init__(self, encoder, split, domain: str):
        self.texts = sorted(set(split["a"]) | set(split["b"]))
        index = {t: i for i, t in enumerate(self.texts)}
        self.vectors = normalise(encoder.encode(self.texts, domain))
        a = self.vectors[[index[t] for t in split["a"]]]
        b = self.vectors[[index[t] for t in split["b"]]]
        self.scores = np.asarray(a.multiply(b).sum(axis=1)).ravel() if hasattr(a, "multiply") else (a * b).sum(axis=1)

    def similarity_matrix(self) -> np.ndarray:
        similarity = self.vectors @ self.vectors.T
        return similarity.toarray() if hasattr(similarity, "toarray") else similarity


def retrieval_metrics(split, encoded: EncodedSplit) -> dict:
    """For each abstract with co-cited partners, rank every other abstract of the split by cosine."""
    index = {t: i for i, t in enumerate(encoded.texts)}
    partners = {}
    for a, b, label in zip(split["a"], split["b"], split["label"]):
        if label == 1:
            partners.setdefault(index[a], set()).add(index[b])
            partners.setdefault(index[b], set()).add(index[a])
    return ranking_metrics(encoded.similarity_matrix(), partners) if partners else {}


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


def evaluate_model(encoder, datasets: dict, split: str) -> tuple[dict, dict]:
    """Metrics per domain and pooled, and the scores of each evaluated pair: ({domain: metrics},
    {domain: {"valid" | split: (scores, labels)}})."""
    results, scored = {}, {}
    pooled = {name: ([], []) for name in ("valid", split)}
    encoded_texts, started = 0, time.perf_counter()
    for domain, dataset in datasets.items():
        try:
            encoder.fit(list(dataset["train"]["a"]) + list(dataset["train"]["b"]))
            encoded = {name: EncodedSplit(encoder, dataset[name], domain) for name in pooled}
            encoded_texts += sum(len(e.texts) for e in encoded.values())
            splits = {name: e.scores for name, e in encoded.items()}
        except ValueError as error:  # e.g. a MoE-BERT without this domain
            results[domain] = {"error": str(error)}
            print(f"  {domain}: skipped: {error}", file=sys.stderr)
            continue
        for name, scores in splits.items():
            pooled[name][0].append(scores)
            pooled[name][1].append(np.asarray(dataset[name]["label"]))
        labels = {name: np.asarray(dataset[name]["label"]) for name in splits}
        results[domain] = _split_metrics(splits, labels, split)
        results[domain] |= retrieval_metrics(dataset[split], encoded[split])
        scored[domain] = {name: (splits[name], labels[name]) for name in splits}
    if scored:
        scores = {name: np.concatenate(s) for name, (s, _) in pooled.items()}
        labels = {name: np.concatenate(l) for name, (_, l) in pooled.items()}
        results["mean"] = _mean_over_domains([results[domain] for domain in scored])
        results["all"] = _split_metrics(scores, labels, split)
    seconds = time.perf_counter() - started
    print(f"  encoded {encoded_texts} abstracts in {seconds:.1f} s ({encoded_texts / seconds:.1f} abstracts/s, with scoring)")
    return results, scored


def _mean_over_domains(per_domain: list[dict]) -> dict:
    """The macro average: each domain counts once, whatever its size, and each keeps its own cosine scale (the
    paper's per-domain protocol). Thresholds are left out: their mean is no threshold of anything."""
    thresholds = ("f1_max_threshold", "accuracy_max_threshold", "valid_threshold")
    names = [n for n in per_domain[0] if all(n in d for d in per_domain) and n not in thresholds]
    return {n: float(np.mean([d[n] for d in per_domain])) for n in names if isinstance(per_domain[0][n], float)}


def _split_metrics(scores: dict, labels: dict, split: str) -> dict:
    try:
        metrics = pair_metrics(scores[split], labels[split])
        if split == "test":
            metrics |= honest_metrics(scores["valid"], labels["valid"], scores["test"], labels["test"])
        return metrics
    except OneClassError as error:
        return {"error": f"{split}: {error}"}


# ------------------------------------------------------------------------------------------------ calibration


def fit_calibration(scored: dict, fitted_by: str = "train.py") -> dict:
    """Per domain, Platt scaling fitted on its `valid` scores: what a MoE-BERT config stores as `calibration`.
    Domains whose valid split has one class only get none."""
    parameters = {}
    for domain, splits in scored.items():
        try:
            parameters[domain] = list(fit_platt(*splits["valid"]))
        except OneClassError:
            continue
    return {"method": "platt", "fitted_on": "valid", "fitted_by": fitted_by, "parameters": parameters}


def calibration_report(scored: dict, split: str, calibration: dict) -> tuple[dict, dict]:
    """Raw cosines and calibrated probabilities of `split`, side by side: pooled ROC-AUC, F1max and the threshold
    it picks (one threshold for all domains), expected calibration error and Brier score, pooled and per domain
    (raw cosines read as probabilities, clipped to [0, 1]). Returns (report, {domain: (probabilities, labels)})."""
    parameters = calibration["parameters"]
    raw = {d: splits[split] for d, splits in scored.items() if d in parameters}
    calibrated = {d: (platt(scores, *parameters[d]), labels) for d, (scores, labels) in raw.items()}
    report = {k: v for k, v in calibration.items() if k != "parameters"} | {"parameters": parameters}
    for view, per_domain in (("raw", raw), ("calibrated", calibrated)):
        scores, labels = (np.concatenate([arrays[i] for arrays in per_domain.values()]) for i in (0, 1))
        best = f1_max(scores, labels)
        report[view] = {
            "pooled": {"roc_auc": roc_auc(scores, labels), "f1_max": best["f1_max"],
                       "f1_max_threshold": best["f1_max_threshold"]} | calibration_metrics(scores, labels),
            "per_domain": {d: calibration_metrics(*arrays) for d, arrays in per_domain.items()},
        }
    return report, calibrated


def scored_metrics(per_domain: dict) -> dict:
    """pair_metrics of given scores per domain, their mean over domains, and pooled (`all`)."""
    results = {d: pair_metrics(*arrays) for d, arrays in per_domain.items()}
    results["mean"] = _mean_over_domains(list(results.values()))
    results["all"] = pair_metrics(*(np.concatenate([a[i] for a in per_domain.values()]) for i in (0, 1)))
    return results


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


def calibrate(argv: list[str]):
    """`python eval.py calibrate --model FOLDER`: fit a MoE-BERT's per-domain calibration on `valid` and store it
    in the folder's config.json."""
    parser = argparse.ArgumentParser(prog="eval.py calibrate", description=calibrate.__doc__)
    parser.add_argument("--model", required=True, help="a local MoE-BERT folder (its config.json is rewritten)")
    parser.add_argument("--dataset", action="append", help="DOMAIN=SOURCE, repeatable (default: embedded sample)")
    parser.add_argument("--max_seq_length", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=None, help=BATCH_SIZE_HELP)
    parser.add_argument("--device", default=None)
    parser.add_argument("--precision", default="auto", choices=["fp32", "bf16", "auto"])
    args = parser.parse_args(argv)
    args.device = args.device or default_device()
    folder = Path(args.model)
    if not (folder / "config.json").is_file():
        parser.error(f"--model {args.model}: give a local model folder; the calibration is written into its config.json.")
    encoder = load_encoder(args.model, args.max_seq_length, args.batch_size, args.device)
    if not getattr(encoder, "is_moebert", False):
        parser.error(f"--model {args.model} is no MoE-BERT; for other models eval.py fits a calibration on valid itself.")
    try:
        datasets = {d: load_domain_dataset(src, ("train", "valid"), d) for d, src in parse_dataset_specs(args.dataset).items()}
    except DatasetError as error:
        parser.error(str(error))
    with autocast(args.device, args.precision):
        _, scored = evaluate_model(encoder, datasets, "valid")
    calibration = fit_calibration(scored, "eval.py calibrate")
    config = encoder.config
    config.calibration = calibration
    config.save_pretrained(folder / ".tmp-config")
    os.replace(folder / ".tmp-config" / "config.json", folder / "config.json")
    shutil.rmtree(folder / ".tmp-config")
    for domain, (a, b) in calibration["parameters"].items():
        midpoint = f"0.5 at cosine {-b / a:.3f}" if a > 0 else "its valid cosines do not rank co-cited pairs higher"
        print(f"{domain}: P(co-cited) = sigmoid({a:.3f} * cosine {b:+.3f}); {midpoint}")
    print(f"calibration written to {folder / 'config.json'}")
    return calibration


# ------------------------------------------------------------------------------------------------ output


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
        print(f"bootstrap: {resamples} resamples of the pairs, gains over {reference} ...")
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


def write_predictions(path: Path, predictions: dict):
    with open(path, "w") as f:
        f.write("pair_id,domain,model,cosine,label\n")
        for (label, domain), (scores, labels) in predictions.items():
            for pair_id, (score, truth) in enumerate(zip(scores, labels)):
                f.write(f"{pair_id},{domain},{label},{score:.6f},{truth}\n")


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
        fig.savefig(output_dir / f"hist_{_safe(label)}_{_safe(domain)}.png", dpi=100)
        plt.close(fig)
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
        fig.savefig(output_dir / f"roc_{_safe(domain)}.png", dpi=100)
        plt.close(fig)


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
        fig.savefig(output_dir / f"reliability_{_safe(label)}.png", dpi=100)
        plt.close(fig)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["calibrate"]:
        return calibrate(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="NAME=PATH_OR_HUB_ID, PATH_OR_HUB_ID, or tfidf; repeatable")
    parser.add_argument("--dataset", action="append", help="DOMAIN=SOURCE, repeatable (default: embedded sample)")
    parser.add_argument("--split", default="test", choices=["valid", "test"])
    parser.add_argument("--max_seq_length", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=None, help=BATCH_SIZE_HELP)
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: the accelerator if there is one)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"], help="encode under bf16 "
                        "autocast (auto: where bf16 is native); the reported figures are fp32")
    parser.add_argument(
        "--trust_remote_code", action="store_true", help="let a model that is no MoE-BERT run Python code from its own "
        "repository (MoE-BERT folders are loaded with this project's classes and never need it)",
    )
    parser.add_argument("--backend", default="torch", choices=BACKENDS, help="onnx: MoE-BERT models run on ONNX "
                        "Runtime with int8 weights, exported on first use (an export folder is always run so)")
    parser.add_argument("--output_dir", type=Path, default=Path("eval_results"))
    parser.add_argument("--bootstrap", type=int, default=0, metavar="N", help="resamples for the gains' 95%% intervals")
    parser.add_argument(
        "--reference", action="append", metavar="NAME", help="model the gains are measured against, repeatable "
        "(default: base and, when evaluated, shared, the one-expert baseline; else the first model)",
    )
    args = parser.parse_args(argv)
    args.device = args.device or default_device()
    models = parse_model_specs(args.model)
    references = args.reference or [r for r in ("base", "shared") if r in models] or list(models)[:1]
    unknown = [r for r in references if r not in models]
    if args.bootstrap and unknown:
        parser.error(f"--reference {unknown[0]!r} is not one of the models {list(models)}; name it with --model NAME=PATH.")

    try:
        specs = parse_dataset_specs(args.dataset)
        needed = ("train", "valid", args.split)
        datasets = {d: load_domain_dataset(src, tuple(dict.fromkeys(needed)), d) for d, src in specs.items()}
    except DatasetError as error:
        parser.error(str(error))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    results, predictions = {}, {}
    for label, path in models.items():
        print(f"model {label}: {path}")
        try:
            encoder = load_encoder(path, args.max_seq_length, args.batch_size, args.device, args.trust_remote_code,
                                   args.backend)
        except RemoteCodeError as error:
            parser.error(str(error))
        except (OSError, ValueError) as error:  # unknown id, no network, not a model folder
            print(f"  skipped: cannot load {path}: {error}", file=sys.stderr)
            results[label] = {"all": {"error": f"cannot load {path}: {error}"}}
            continue
        with autocast(args.device, args.precision):
            results[label], scored = evaluate_model(encoder, datasets, args.split)
        predictions |= {(label, domain): arrays[args.split] for domain, arrays in scored.items()}
        if args.split == "test" and scored:
            stored = getattr(getattr(encoder, "config", None), "calibration", None)
            report, calibrated = calibration_report(scored, args.split, stored or fit_calibration(scored, "eval.py"))
            results[label]["calibration"] = report
            if stored:  # the model's own probabilities, scored beside its cosines (and against the references)
                results[f"{label} (calibrated)"] = scored_metrics(calibrated)
                predictions |= {(f"{label} (calibrated)", domain): arrays for domain, arrays in calibrated.items()}

    tables = "\n\n".join(markdown_table(results, m) for m in TABLE_METRICS if args.split == "test" or m != TABLE_METRICS[2])
    if any("calibration" in r for r in results.values()):
        tables += "\n\n" + calibration_table(results)
    scored_references = [r for r in references if any(label == r for label, _ in predictions)]
    if args.bootstrap and scored_references:
        gains = bootstrap_gains(predictions, scored_references, args.bootstrap)
        for model, per_reference in gains.items():
            results[model]["bootstrap"] = {"resamples": args.bootstrap} | per_reference
        tables += "\n\n" + gains_table(gains)
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_predictions(args.output_dir / "predictions.csv", predictions)
    plot(predictions, results, args.output_dir)
    plot_reliability(results, predictions, args.output_dir)
    (args.output_dir / "results.md").write_text(tables + "\n")
    print(f"\n{tables}\n\nwritten to {args.output_dir}/ (results.json, results.md, predictions.csv, plots)")
    return results


if __name__ == "__main__":
    main()
