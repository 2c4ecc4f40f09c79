"""Query latency and index memory of `search.py`'s FAISS indexes at a collection size we do not have.

    python benchmarks/bench_search.py [--vectors 100000] [--queries 300] [--top_k 10]

Generates unit vectors of MiniLM's dimension (384) with some cluster structure (10 domains' centres plus noise),
builds the flat inner-product index (`search.py`'s default) and the IVF-PQ one (`--index_type ivfpq`), and times
single-query searches (p50, p99) and their agreement with the exact top 10. Also times one query text end to end
through `search.embed` (the embedded model, CPU) to show what dominates a query.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search import EMBEDDED_MODEL, embed, load_encoder  # noqa: E402

DIMENSION = 384


def unit_vectors(count: int, rng) -> np.ndarray:
    centres = rng.standard_normal((10, DIMENSION)).astype(np.float32)
    vectors = centres[rng.integers(0, 10, count)] + 0.8 * rng.standard_normal((count, DIMENSION)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def latencies_ms(index, queries: np.ndarray, top_k: int) -> tuple[list[float], np.ndarray]:
    times, found = [], []
    for query in queries:
        started = time.perf_counter()
        _, ids = index.search(query[None], top_k)
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
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    vectors, queries = unit_vectors(args.vectors, rng), unit_vectors(args.queries, rng)
    print(f"{args.vectors} vectors of dimension {DIMENSION}, {args.queries} single-vector queries, top {args.top_k}, "
          f"{faiss.omp_get_max_threads()} threads")

    flat = faiss.IndexFlatIP(DIMENSION)
    ivfpq = faiss.index_factory(DIMENSION, "IVF1024,PQ48", faiss.METRIC_INNER_PRODUCT)
    rows, exact = [], None
    for name, index in (("flat (exact)", flat), ("IVF1024,PQ48, nprobe 16", ivfpq)):
        started = time.perf_counter()
        if not index.is_trained:
            index.train(vectors)
        index.add(vectors)
        build_s = time.perf_counter() - started
        if hasattr(index, "nprobe"):
            index.nprobe = 16
        times, found = latencies_ms(index, queries, args.top_k)
        exact = found if exact is None else exact
        recall = np.mean([len(set(f) & set(e)) / args.top_k for f, e in zip(found, exact)])
        megabytes = faiss.serialize_index(index).nbytes / 2**20
        rows.append((name, megabytes, build_s, percentile(times, 50), percentile(times, 99), recall))

    print(f"\n{'index':26} {'MiB':>7} {'build s':>8} {'p50 ms':>7} {'p99 ms':>7} {'recall@10 vs exact':>19}")
    for name, megabytes, build_s, p50, p99, recall in rows:
        print(f"{name:26} {megabytes:7.1f} {build_s:8.2f} {p50:7.3f} {p99:7.3f} {recall:19.3f}")

    encoder, _, _ = load_encoder(EMBEDDED_MODEL, 256, 32, "cpu")
    text = ["Intrathecal baclofen for severe spasticity in children with cerebral palsy: a randomised trial."]
    embed(encoder, text, ["Oud_2018"])
    times = []
    for _ in range(20):
        started = time.perf_counter()
        embed(encoder, text, ["Oud_2018"])
        times.append(1000 * (time.perf_counter() - started))
    print(f"\nembedding one query text on the CPU ({torch.get_num_threads()} threads, fp32): "
          f"p50 {percentile(times, 50):.1f} ms, p99 {percentile(times, 99):.1f} ms")


if __name__ == "__main__":
    main()
