"""Recall, query latency and memory of `search.py`'s FAISS indexes on about 100,000 real text embeddings.

    python -m benchmarks.bench_search [--vectors 100000] [--queries 300] [--top_k 10] [--nlist 1024] [--pq_m 48]

The collection: every SYNERGY abstract and each of its sentences (from ../shared when it is there, else the
papers shipped in data/), then CiteSeer abstracts and sentences, until --vectors; --queries further sentences,
left out of the collection, are the queries. All are embedded by the embedded model (all-MiniLM-L6-v2 upcycled;
bf16 where native), as `search.py index` would. Then, as `search.py query` runs them one at a time: the flat
inner-product index (exact, the default) and IVF-PQ (`--index_type ivfpq`) at several nprobe, with and without
re-scoring its candidates from the stored vectors (`--rerank`, memory-mapped from disk as in an index folder).
Recall@k is the share of the exact top k that each finds. Also times one query text through
`moebert.encoders.interface.embed`.
"""

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from moebert.data.builds import SHARED_CITESEER, SHARED_SYNERGY, read_citeseer
from moebert.data.pairs import sample_papers
from moebert.device import autocast
from moebert.encoders.interface import embed
from moebert.encoders.options import EncodingOptions
from moebert.search.index import EMBEDDED_MODEL, StoredVectors, index_encoder, ivfpq_index

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def real_texts(count: int, queries: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(collection, queries): abstracts and their sentences of five or more words, each text once; the queries are
    sentences drawn at random and kept out of the collection."""
    synergy = SHARED_SYNERGY / "papers.csv.gz"
    abstracts = pd.read_csv(synergy)["text"] if synergy.exists() else sample_papers()["text"]
    if SHARED_CITESEER.exists():
        abstracts = pd.concat([abstracts, read_citeseer(SHARED_CITESEER)[0]["text"]])
    texts, seen = [], set()
    for abstract in abstracts.dropna().astype(str):
        for text in [abstract] + [s for s in SENTENCE_END.split(abstract) if len(s.split()) >= 5]:
            if text not in seen:
                seen.add(text)
                texts.append(text)
    rng = np.random.default_rng(seed)
    sentences = [i for i, t in enumerate(texts[: count + queries]) if len(t) < 400]
    held_out = set(rng.choice(sentences, queries, replace=False).tolist())
    kept = [t for i, t in enumerate(texts[: count + queries]) if i not in held_out]
    return kept[:count], [texts[i] for i in sorted(held_out)]


def latencies_ms(search, queries: np.ndarray, top_k: int) -> tuple[list[float], np.ndarray]:
    times, found = [], []
    for query in queries:
        started = time.perf_counter()
        ids = search(query[None], top_k)
        times.append(1000 * (time.perf_counter() - started))
        found.append(ids[0])
    return times, np.array(found)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--top_k", type=int, default=10)
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--pq_m", type=int, default=48)
    args = parser.parse_args()
    texts, query_texts = real_texts(args.vectors, args.queries)
    encoder, _, _ = index_encoder(EMBEDDED_MODEL, EncodingOptions(batch_size=64, max_seq_length=256, device="cpu"))
    domain = encoder.model.config.domains[0]  # untrained: every expert is the base model
    started = time.perf_counter()
    with autocast("cpu", "auto"):
        vectors = embed(encoder, texts, [domain] * len(texts))
        queries = embed(encoder, query_texts, [domain] * len(query_texts))
    print(f"{len(vectors):,} real texts embedded in {time.perf_counter() - started:.0f} s; {len(queries)} held-out "
          f"sentences as single queries, top {args.top_k}, {faiss.omp_get_max_threads()} threads")

    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    _, exact = flat.search(queries, args.top_k)
    started = time.perf_counter()
    ivfpq = ivfpq_index(vectors, args.nlist, args.pq_m)
    ivfpq.add(vectors)
    ivfpq_build_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:
        np.save(Path(folder) / "vectors.npy", vectors)
        stored = StoredVectors([np.load(Path(folder) / "vectors.npy", mmap_mode="r")])
        rows = [("flat (exact)", flat, 0, 0)] + [
            (f"IVF{ivfpq.nlist},PQ{args.pq_m}", ivfpq, nprobe, rerank) for nprobe in (16, 64) for rerank in (0, 10)
        ]
        print(f"\n{'index':18} {'nprobe':>6} {'rerank':>6} {'MiB in RAM':>10} {'p50 ms':>7} {'p99 ms':>7} "
              f"{f'recall@{args.top_k}':>10}")
        for name, index, nprobe, rerank in rows:
            if nprobe:
                index.nprobe = nprobe
            if rerank:
                search = lambda q, k: stored.rerank(q, index.search(q, k * rerank)[1], k)[1]  # noqa: E731
            else:
                search = lambda q, k: index.search(q, k)[1]  # noqa: E731
            times, found = latencies_ms(search, queries, args.top_k)
            recall = np.mean([len(set(f) & set(e)) / args.top_k for f, e in zip(found, exact)])
            megabytes = faiss.serialize_index(index).nbytes / 2**20
            print(f"{name:18} {nprobe or '-':>6} {rerank or '-':>6} {megabytes:10.1f} {percentile(times, 50):7.2f} "
                  f"{percentile(times, 99):7.2f} {recall:10.3f}")
    print(f"IVF-PQ training and adding took {ivfpq_build_s:.1f} s; rerank reads top_k x rerank rows of the "
          f"{vectors.nbytes / 2**20:.1f} MiB of stored vectors from disk")

    text = ["Intrathecal baclofen for severe spasticity in children with cerebral palsy: a randomised trial."]
    times = []
    for _ in range(21):
        started = time.perf_counter()
        embed(encoder, text, [domain])
        times.append(1000 * (time.perf_counter() - started))
    print(f"embedding one query text (fp32): p50 {percentile(times[1:], 50):.1f} ms, p99 {percentile(times[1:], 99):.1f} ms")


if __name__ == "__main__":
    main()
