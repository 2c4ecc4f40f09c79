"""Retrieval on co-citation: can a model find a paper's co-cited partners among all test papers of all domains?

    python -m benchmarks.bench_retrieval [--model NAME=PATH ...] [--output_dir docs] [--precision auto] [--backend onnx]

Every `test` paper of the embedded SYNERGY sample is in the collection, embedded by its own domain's expert (an
index knows its papers' domains). Every test paper with co-cited partners in `test` is a query. Reported: MRR,
Recall@10, nDCG@10, searching the whole collection and only the query's domain; for MoE-BERT models with the query's
gold domain, with the domain predicted by `search.py`'s classifier (fitted on the train papers, never on test),
and with no domain at all: the query through every expert, each scored against its own domain's papers, merged;
and by paper id (`search.py query --id`: the test papers indexed by search's own code, each queried by its id).
Models: TF-IDF (fitted on the train texts), the base model, and `outputs/shared-expert` and `outputs/moebert` when
`train.py` wrote them. Prints the table (docs/results.md keeps it, dated) and writes a plot of Recall@k into
`--output_dir`. Encoding options as in eval.py and search.py (moebert.encoders.options).
"""

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from moebert.data.pairs import load_domain_datasets, sample_specs
from moebert.device import autocast
from moebert.encoders.interface import embed
from moebert.encoders.loader import load_encoder
from moebert.encoders.options import EncodingOptions, add_encoding_arguments
from moebert.evaluation.metrics import ranking_metrics
from moebert.names import DEFAULT_OUTPUT_DIR, SHARED_EXPERT_DIR, default_base_model
from moebert.search.domain_classifier import DomainClassifier

RECALL_KS = (1, 2, 5, 10, 20, 50, 100)


def papers_and_partners(datasets: dict, split: str):
    """Unique papers of `split` (text, domain), and each paper's co-cited partners (indices)."""
    texts, domains, index, partners = [], [], {}, {}
    for domain, dataset in datasets.items():
        for row in dataset[split]:
            for side in ("a", "b"):
                if row[f"paper_{side}"] not in index:
                    index[row[f"paper_{side}"]] = len(texts)
                    texts.append(row[side])
                    domains.append(domain)
            if row["label"] == 1:
                a, b = index[row["paper_a"]], index[row["paper_b"]]
                partners.setdefault(a, set()).add(b)
                partners.setdefault(b, set()).add(a)
    return texts, domains, partners


def scores(collection: np.ndarray, queries: np.ndarray, partners: dict, query_domains, domains) -> dict:
    """Whole collection, and only the papers of the query's (gold or predicted) domain; query rows are aligned
    with the collection's."""
    similarity = queries @ collection.T
    in_domain = np.where(np.equal.outer(np.array(query_domains), np.array(domains)), similarity, -np.inf)
    return {"all": ranking_metrics(similarity, partners, RECALL_KS), "domain": ranking_metrics(in_domain, partners, RECALL_KS)}


def merged_over_experts(encoder, texts: list[str], collection: np.ndarray, domains: list[str]) -> np.ndarray:
    """The other way to search without a domain: each query through every expert, scored against the papers that
    expert embedded (the same vector space), all merged into one ranking."""
    similarity, domains = np.empty((len(texts), len(domains)), dtype=np.float32), np.array(domains)
    for domain in sorted(set(domains)):
        columns = domains == domain
        similarity[:, columns] = embed(encoder, texts, [domain] * len(texts)) @ collection[columns].T
    return similarity


def by_paper_id(spec: str, options: EncodingOptions, texts: list[str], domains: list[str], partners: dict) -> dict:
    """Queries by paper id through search's own path: the test papers indexed as `search.py index` indexes them, each
    query `PaperIndex.similar_to([its id])` over the whole collection (its stored vector; itself left out)."""
    from moebert.search.index import IndexSettings, PaperIndex, build_index

    ids = [f"T{i}" for i in range(len(texts))]
    similarity = np.full((len(texts), len(texts)), -np.inf, dtype=np.float32)
    with tempfile.TemporaryDirectory() as folder:
        papers = Path(folder) / "papers.parquet"
        pd.DataFrame({"id": ids, "text": texts, "domain": domains}).to_parquet(papers)
        build_index(str(papers), Path(folder) / "index", spec, options, IndexSettings())
        index = PaperIndex.load(Path(folder) / "index", spec, options)
        for query in partners:
            for hit in index.similar_to([ids[query]], top_k=len(texts) - 1)["hits"]:
                similarity[query, int(hit["id"][1:])] = hit["score"]
    return {"all": ranking_metrics(similarity, partners, RECALL_KS)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="NAME=PATH, repeatable (default: base, shared, moebert, tfidf)")
    parser.add_argument("--output_dir", type=Path, default=Path("docs"), help="where the plot goes")
    parser.add_argument("--no_merged", action="store_true", help="leave out the query through every expert merged "
                        "(it embeds every query once per domain: the slowest row)")
    add_encoding_arguments(parser)
    args = parser.parse_args()
    options = EncodingOptions.from_args(args)
    trained = {"shared": SHARED_EXPERT_DIR, "moebert": DEFAULT_OUTPUT_DIR}
    specs = dict(s.split("=", 1) for s in args.model) if args.model else (
        {"tfidf": "tfidf", "base": default_base_model()}
        | {label: str(path) for label, path in trained.items() if path.exists()}
    )
    datasets = load_domain_datasets(sample_specs(), splits=("train", "test"))
    texts, domains, partners = papers_and_partners(datasets, "test")
    train_texts, train_domains, _ = papers_and_partners(datasets, "train")
    classifier = DomainClassifier.fit(train_texts, train_domains)
    predicted, _ = classifier.predict(texts)
    accuracy = float(np.mean([p == d for p, d in zip(predicted, domains)]))
    print(f"{len(texts)} test papers in {len(set(domains))} domains, {len(partners)} queries; "
          f"domain classifier accuracy on the test papers {accuracy:.3f}")

    results = {}
    for label, spec in specs.items():
        encoder = load_encoder(spec, options)
        encoder.fit(train_texts)
        with autocast(options.device, options.dtype):
            collection = embed(encoder, texts, domains)
            results[label] = scores(collection, collection, partners, domains, domains)
            if encoder.routes_by_domain and encoder.config.num_experts > 1:
                queries = embed(encoder, texts, predicted)
                results[f"{label}, predicted domain"] = scores(collection, queries, partners, predicted, domains)
                if not args.no_merged:
                    merged = merged_over_experts(encoder, texts, collection, domains)
                    results[f"{label}, every expert merged"] = {"all": ranking_metrics(merged, partners, RECALL_KS)}
        if encoder.routes_by_domain:
            results[f"{label}, by paper id"] = by_paper_id(spec, options, texts, domains, partners)
        print(label, json.dumps({k: round(v["recall_at_10"], 4) for k, v in results[label].items()}))
    write_outputs(results, accuracy, len(texts), len(partners), args.output_dir)


def write_outputs(results: dict, accuracy: float, papers: int, queries: int, output_dir: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"{papers} test papers, {queries} queries; predicted-domain accuracy {accuracy:.3f}", "",
             "| model | search | MRR | Recall@10 | nDCG@10 |", "|---|---|---|---|---|"]
    for label, by_scope in results.items():
        for scope, m in by_scope.items():
            where = "whole collection" if scope == "all" else "query's domain only"
            lines.append(f"| {label} | {where} | {m['mrr']:.3f} | {m['recall_at_10']:.3f} | {m['ndcg_at_10']:.3f} |")
    print("\n".join(lines))
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, by_scope in results.items():
        ax.plot(RECALL_KS, [by_scope["all"][f"recall_at_{k}"] for k in RECALL_KS], marker="o", label=label)
    ax.set(xscale="log", xlabel="k (papers returned)", ylabel="Recall@k", title="Co-cited partners found, whole collection")
    ax.set_xticks(RECALL_KS, [str(k) for k in RECALL_KS])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output_dir / "retrieval_recall_at_k.png", dpi=100)
    print(f"written to {output_dir}/retrieval_recall_at_k.png")


if __name__ == "__main__":
    main()
