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
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from data.loading import DatasetError, load_domain_dataset, parse_dataset_specs
from defaults import default_base_model
from metrics import BOOTSTRAP_METRICS, OneClassError, honest_metrics, pair_metrics, paired_bootstrap

DEFAULT_TRAINED = {"moebert": Path("outputs/moebert"), "shared": Path("outputs/shared-expert")}  # train.py's outputs
TABLE_METRICS = ("f1_max", "roc_auc", "f1_at_valid_threshold")
SUMMARIES = ("mean", "all")  # keys of a model's results beside its domains


# ------------------------------------------------------------------------------------------------ encoders


class TransformerEncoder:
    """A MoE-BERT (texts get their domain token) or a plain encoder (mean pooling over non-padding tokens)."""

    def __init__(self, model, tokenizer, max_seq_length: int, batch_size: int):
        self.model, self.tokenizer = model, tokenizer
        self.is_moebert = getattr(model.config, "model_type", None) == "moebert"
        self.max_seq_length, self.batch_size = max_seq_length, batch_size

    @classmethod
    def from_pretrained(cls, name_or_path: str, max_seq_length: int, batch_size: int, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        model = AutoModel.from_pretrained(name_or_path, trust_remote_code=True).to(device).eval()
        return cls(model, AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=True), max_seq_length, batch_size)

    def fit(self, train_texts):
        pass

    def encode(self, texts: list[str], domain: str) -> np.ndarray:
        if self.is_moebert:
            texts = self.model.prepend_domain_token(texts, domain)  # unknown domain: ValueError naming the known
        order = np.argsort([-len(t) for t in texts], kind="stable")  # similar lengths together: less padding
        vectors = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        batches = range(0, len(texts), self.batch_size)
        for start in tqdm(batches, desc=f"encoding {domain}", unit="batch", leave=False):
            index = order[start : start + self.batch_size]
            batch = self.tokenizer(
                [texts[i] for i in index], padding=True, truncation=True, max_length=self.max_seq_length, return_tensors="pt"
            ).to(self.model.device)
            if self.is_moebert:  # by name, in either routing mode (token routing would read the all-zero segments)
                batch["domain_ids"] = torch.full((len(index),), self.model.config.domain_index(domain), device=self.model.device)
            with torch.inference_mode():
                output = self.model(**batch)
            vectors[index] = self._pool(output, batch["attention_mask"]).float().cpu().numpy()
        return vectors

    def _pool(self, output, attention_mask):
        if self.is_moebert:
            return output.pooler_output
        mask = attention_mask.unsqueeze(-1).to(output.last_hidden_state.dtype)
        return (output.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class SentenceTransformerEncoder:
    """A sentence-transformers model (a repo with `modules.json`), encoded with its own pooling and normalisation:
    mean pooling would be wrong for models trained with CLS or last-token pooling."""

    def __init__(self, name_or_path: str, max_seq_length: int, batch_size: int, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(name_or_path, trust_remote_code=True, device=device)
        self.model.max_seq_length = max_seq_length
        self.batch_size = batch_size

    def fit(self, train_texts):
        pass

    def encode(self, texts: list[str], domain: str) -> np.ndarray:
        return self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=True)


class TfidfEncoder:
    """The classic reference: TF-IDF vectors fitted on the domain's training texts."""

    def __init__(self):
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.vectorizer = TfidfVectorizer(sublinear_tf=True, stop_words="english")

    def fit(self, train_texts):
        self.vectorizer.fit(train_texts)

    def encode(self, texts, domain):
        return self.vectorizer.transform(texts)


def load_encoder(spec: str, args):
    """`tfidf`; a MoE-BERT; a sentence-transformers model (has modules.json); else any encoder, mean-pooled."""
    from transformers import PretrainedConfig
    from transformers.utils import cached_file

    if spec == "tfidf":
        return TfidfEncoder()
    config, _ = PretrainedConfig.get_config_dict(spec)  # local folder or Hub id; OSError when neither
    if config.get("model_type") != "moebert" and cached_file(
        spec, "modules.json", _raise_exceptions_for_missing_entries=False
    ):
        return SentenceTransformerEncoder(spec, args.max_seq_length, args.batch_size, args.device)
    return TransformerEncoder.from_pretrained(spec, args.max_seq_length, args.batch_size, args.device)


def default_device() -> str:
    """The accelerator when there is one: every transformer model of a comparison runs on the same device."""
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def bf16_is_native(device: str) -> bool:
    """Whether this device computes bf16 matrix products natively (CUDA Ampere+, x86 CPUs with AVX512-BF16 or
    AMX): elsewhere bf16 is emulated and slower than fp32."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    cpuinfo = Path("/proc/cpuinfo")
    return device == "cpu" and cpuinfo.exists() and bool({"avx512_bf16", "amx_bf16"} & set(cpuinfo.read_text().split()))


def autocast(device: str, precision: str):
    """bf16 autocast for `bf16`, and for `auto` where bf16 is native (else fp32, and says so); fp32 for `fp32`."""
    use_bf16 = precision == "bf16" or (precision == "auto" and bf16_is_native(device))
    if precision == "auto" and not use_bf16:
        print(f"encoding in fp32: bf16 is not native on {device}", file=sys.stderr)
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=use_bf16)


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
        self.vectors = _normalise(encoder.encode(self.texts, domain))
        a = self.vectors[[index[t] for t in split["a"]]]
        b = self.vectors[[index[t] for t in split["b"]]]
        self.scores = np.asarray(a.multiply(b).sum(axis=1)).ravel() if hasattr(a, "multiply") else (a * b).sum(axis=1)

    def similarity_matrix(self) -> np.ndarray:
        similarity = self.vectors @ self.vectors.T
        return similarity.toarray() if hasattr(similarity, "toarray") else similarity


def _normalise(vectors):
    if hasattr(vectors, "multiply"):  # sparse TF-IDF rows are already unit length
        return vectors.tocsr()
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


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
    """Metrics per domain and pooled, and the scores of each evaluated pair: ({domain: metrics}, {domain: arrays})."""
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
        scored[domain] = (splits[split], labels[split])
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


# ------------------------------------------------------------------------------------------------ output


def markdown_table(results: dict, metric: str) -> str:
    domains = sorted({d for per_model in results.values() for d in per_model if d not in SUMMARIES + ("bootstrap",)})
    domains += list(SUMMARIES)
    lines = [f"| {metric} | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for label, per_domain in results.items():
        cells = [per_domain.get(d, {}).get(metric) for d in domains]
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


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="NAME=PATH_OR_HUB_ID, PATH_OR_HUB_ID, or tfidf; repeatable")
    parser.add_argument("--dataset", action="append", help="DOMAIN=SOURCE, repeatable (default: embedded sample)")
    parser.add_argument("--split", default="test", choices=["valid", "test"])
    parser.add_argument("--max_seq_length", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: the accelerator if there is one)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"], help="encode under bf16 "
                        "autocast (auto: where bf16 is native); the reported figures are fp32")
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
            encoder = load_encoder(path, args)
        except (OSError, ValueError) as error:  # unknown id, no network, not a model folder
            print(f"  skipped: cannot load {path}: {error}", file=sys.stderr)
            results[label] = {"all": {"error": f"cannot load {path}: {error}"}}
            continue
        with autocast(args.device, args.precision):
            results[label], scored = evaluate_model(encoder, datasets, args.split)
        predictions |= {(label, domain): arrays for domain, arrays in scored.items()}

    tables = "\n\n".join(markdown_table(results, m) for m in TABLE_METRICS if args.split == "test" or m != TABLE_METRICS[2])
    scored_references = [r for r in references if any(label == r for label, _ in predictions)]
    if args.bootstrap and scored_references:
        gains = bootstrap_gains(predictions, scored_references, args.bootstrap)
        for model, per_reference in gains.items():
            results[model]["bootstrap"] = {"resamples": args.bootstrap} | per_reference
        tables += "\n\n" + gains_table(gains)
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_predictions(args.output_dir / "predictions.csv", predictions)
    plot(predictions, results, args.output_dir)
    (args.output_dir / "results.md").write_text(tables + "\n")
    print(f"\n{tables}\n\nwritten to {args.output_dir}/ (results.json, results.md, predictions.csv, plots)")
    return results


if __name__ == "__main__":
    main()
