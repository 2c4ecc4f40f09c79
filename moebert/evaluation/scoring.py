"""Scoring an encoder on pair datasets: per domain, the mean over domains and pooled; the paper's protocol and,
on `test`, the honest one; a retrieval view; and the validation that training runs at every evaluation. Scoring
changes nothing: fitting a calibration on the scores is a step of its own (moebert.evaluation.calibration).
"""

import logging
import time

import numpy as np

from moebert.encoders.interface import Encoder, normalise
from moebert.encoders.transformer import ShardedEncoder, StemEncoder, TransformerEncoder
from moebert.evaluation.metrics import OneClassError, honest_metrics, pair_metrics, ranking_metrics

logger = logging.getLogger(__name__)

SUMMARIES = ("mean", "all")  # keys of a model's results beside its domains


class EncodedSplit:
    """One split's unique texts, each encoded once (unit-length rows), and the cosine of each of its pairs."""

    def __init__(self, encoder: Encoder, split, domain: str):
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


def evaluate_model(encoder: Encoder, datasets: dict, split: str) -> tuple[dict, dict]:
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
            logger.warning(f"  {domain}: skipped: {error}")
            continue
        for name, scores in splits.items():
            pooled[name][0].append(scores)
            pooled[name][1].append(np.asarray(dataset[name]["label"]))
        labels = {name: np.asarray(dataset[name]["label"]) for name in splits}
        results[domain] = split_metrics(splits, labels, split)
        results[domain] |= retrieval_metrics(dataset[split], encoded[split])
        scored[domain] = {name: (splits[name], labels[name]) for name in splits}
    if scored:
        scores = {name: np.concatenate(s) for name, (s, _) in pooled.items()}
        labels = {name: np.concatenate(l) for name, (_, l) in pooled.items()}
        results["mean"] = mean_over_domains([results[domain] for domain in scored])
        results["all"] = split_metrics(scores, labels, split)
    seconds = time.perf_counter() - started
    logger.info(f"  encoded {encoded_texts} abstracts in {seconds:.1f} s ({encoded_texts / seconds:.1f} abstracts/s, "
                "with scoring)")
    return results, scored


def mean_over_domains(per_domain: list[dict]) -> dict:
    """The macro average: each domain counts once, whatever its size, and each keeps its own cosine scale (the
    paper's per-domain protocol). Thresholds are left out: their mean is no threshold of anything."""
    thresholds = ("f1_max_threshold", "accuracy_max_threshold", "valid_threshold")
    names = [n for n in per_domain[0] if all(n in d for d in per_domain) and n not in thresholds]
    return {n: float(np.mean([d[n] for d in per_domain])) for n in names if isinstance(per_domain[0][n], float)}


def split_metrics(scores: dict, labels: dict, split: str) -> dict:
    try:
        metrics = pair_metrics(scores[split], labels[split])
        if split == "test":
            metrics |= honest_metrics(scores["valid"], labels["valid"], scores["test"], labels["test"])
        return metrics
    except OneClassError as error:
        return {"error": f"{split}: {error}"}


def scored_metrics(per_domain: dict) -> dict:
    """pair_metrics of given scores per domain, their mean over domains, and pooled (`all`)."""
    results = {d: pair_metrics(*arrays) for d, arrays in per_domain.items()}
    results["mean"] = mean_over_domains(list(results.values()))
    results["all"] = pair_metrics(*(np.concatenate([a[i] for a in per_domain.values()]) for i in (0, 1)))
    return results


def validate(model, tokenizer, datasets: dict, max_seq_length: int, batch_size: int, accelerator=None,
             stems=None) -> tuple[dict, dict]:
    """Valid metrics of a model in training and the scores they came from (as `evaluate_model` returns them); with
    several processes each encodes a share of the texts and all get the same results. With stored stem states, each
    text is encoded from the first MoE layer's experts up."""
    model.eval()
    if stems is not None:
        encoder = StemEncoder(model, stems, batch_size)
    else:
        encoder = TransformerEncoder(model, tokenizer, max_seq_length, batch_size)
    if accelerator is not None and accelerator.num_processes > 1:
        encoder = ShardedEncoder(encoder, accelerator)
    results, scored = evaluate_model(encoder, datasets, "valid")
    model.train()
    return results, scored
