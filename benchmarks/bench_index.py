"""Indexing at scale without the model: every stage of `search.py index` but the encoder, on a collection of a
million papers or more, with the time and peak memory of each stage.

    python -m benchmarks.bench_index [--papers 1000000] [--chunk_size 1024] [--index_type ivfpq] [--queries 200]

The collection: SYNERGY and CiteSeer abstracts and their sentences (from ../shared when it is there, else the papers
shipped in data/), repeated with a running number until --papers, each with its own id and its source's domain,
written as one parquet file. The model is replaced by a cheap stand-in that turns a text into a unit vector of the
base's dimension (a fixed random projection of hashed word counts: texts that share words lie close), so what is
measured is reading the collection in pieces, chunking, writing the chunks, the FAISS index (trained on a sample,
filled chunk by chunk), the domain classifier on a bounded sample and the paper table. Then the query side: loading
the index (ids and domains only), and the search time of single queries, IVF-PQ with exact re-scoring against a
flat index over the same vectors. Peak memory is each stage's own (the process's peak is reset between stages).
"""

import argparse
import re
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from moebert.data.builds import SHARED_CITESEER, SHARED_SYNERGY, read_citeseer
from moebert.data.pairs import sample_papers
from moebert.encoders.interface import Encoder
from moebert.encoders.options import EncodingOptions
from moebert.search.collection import iter_pieces
from moebert.search.index import IndexSettings, StoredVectors, build_index

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


class HashedWords(Encoder):
    """The stand-in for a model: hashed word counts, projected to `dimension` by a fixed random matrix."""

    routes_by_domain = True

    def __init__(self, domains: list[str], dimension: int = 384, features: int = 2**14):
        from sklearn.feature_extraction.text import HashingVectorizer

        self.vectorizer = HashingVectorizer(n_features=features, alternate_sign=False, norm="l2")
        self.projection = np.random.default_rng(0).standard_normal((features, dimension)).astype(np.float32)
        self.config = SimpleNamespace(domains=domains, hidden_size=dimension, calibration=None)
        self.max_seq_length = 256

    def encode(self, texts: list[str], domain: str) -> np.ndarray:
        return np.asarray(self.vectorizer.transform(texts) @ self.projection, dtype=np.float32)


def collection(count: int, path: Path) -> list[str]:
    """Write a collection of `count` papers to `path` (parquet); returns its domains."""
    synergy = SHARED_SYNERGY / "papers.csv.gz"
    sources = [pd.read_csv(synergy)[["text", "domain"]] if synergy.exists() else sample_papers()[["text", "domain"]]]
    if SHARED_CITESEER.exists():
        sources.append(read_citeseer(SHARED_CITESEER)[0][["text", "domain"]])
    rows = []
    for text, domain in pd.concat(sources).dropna().itertuples(index=False):
        rows += [(t, str(domain)) for t in [text] + [s for s in SENTENCE_END.split(text) if len(s.split()) >= 5]]
    base = pd.DataFrame(rows, columns=["text", "domain"]).drop_duplicates("text")
    repeats = -(-count // len(base))
    papers = pd.concat([base.assign(text=base["text"] + f" (copy {r})") for r in range(repeats)]).head(count)
    papers.insert(0, "id", [f"P{i}" for i in range(len(papers))])
    papers.to_parquet(path, row_group_size=50_000)
    return sorted(papers["domain"].unique())


class Stages:
    """Time and peak resident memory of each stage, the peak reset when a stage begins."""

    def __init__(self):
        self.rows, self.started = [], None

    def begin(self):
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM)
        self.started = time.perf_counter()

    def end(self, name: str):
        peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 2**20
        self.rows.append((name, time.perf_counter() - self.started, peak))
        print(f"{name}: {self.rows[-1][1]:.1f} s, peak {peak:.2f} GiB", flush=True)
        self.begin()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--papers", type=int, default=1_000_000)
    parser.add_argument("--chunk_size", type=int, default=1024)
    parser.add_argument("--index_type", default="ivfpq", choices=["flat", "ivfpq"])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--work", default=None, help="folder for the collection and the index (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-index-"))
    work.mkdir(parents=True, exist_ok=True)
    stages = Stages()
    stages.begin()
    domains = collection(args.papers, work / "papers.parquet")
    stages.end(f"writing the collection ({args.papers:,} papers, {(work / 'papers.parquet').stat().st_size / 2**20:.0f} MiB parquet)")
    pieces = sum(1 for _ in iter_pieces(str(work / "papers.parquet"), args.chunk_size))
    stages.end(f"reading it in {pieces} pieces of {args.chunk_size}")
    encoder = HashedWords(domains)
    settings = IndexSettings(index_type=args.index_type, chunk_size=args.chunk_size)
    build_index(str(work / "papers.parquet"), work / "index", None, EncodingOptions(device="cpu"), settings,
                loaded=(encoder, "hashed-words", "hashed-words"), on_stage=stages.end)
    query_side(work / "index", args.queries, stages)
    print("\n| stage | seconds | peak memory |\n|---|---|---|")
    for name, seconds, peak in stages.rows:
        print(f"| {name} | {seconds:.1f} | {peak:.2f} GiB |")
    disk = sum(f.stat().st_size for f in (work / "index").rglob("*") if f.is_file()) / 2**30
    print(f"\nindex folder: {disk:.2f} GiB on disk; work folder {work}")


def query_side(folder: Path, count: int, stages: Stages):
    """The paper table's ids and domains as a query loads them, then single-query latency: IVF-PQ (nprobe 64, the
    top 100 re-scored from the stored vectors) against a flat index of the same vectors, and recall@10."""
    import faiss

    chunks = sorted((folder / "chunks").glob("[0-9]*.parquet"))
    papers = pd.concat([pd.read_parquet(p, columns=["id", "domain"]) for p in chunks])
    stages.end(f"loading the paper table's ids and domains ({len(papers):,})")
    index = faiss.read_index(str(folder / "index.faiss"))
    stored = StoredVectors.open(folder, index.ntotal)
    rng = np.random.default_rng(1)
    rows = rng.choice(index.ntotal, count, replace=False)
    queries = stored.rows(np.sort(rows)) + rng.normal(0, 0.02, (count, stored.chunks[0].shape[1])).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    stages.end("opening the FAISS index and the stored vectors")
    if hasattr(index, "nprobe"):
        index.nprobe = 64
        found, started = [], time.perf_counter()
        for query in queries:
            found.append(stored.rerank(query[None], index.search(query[None], 100)[1], 10)[1][0])
        ivfpq_ms = 1000 * (time.perf_counter() - started) / count
        stages.end(f"{count} single queries on IVF-PQ, re-scored: {ivfpq_ms:.2f} ms each")
    flat = faiss.IndexFlatIP(index.d)
    for chunk in chunks:
        flat.add(np.load(chunk.with_suffix(".npy")))
    stages.end(f"a flat index of the same {flat.ntotal:,} vectors, filled")
    exact, started = [], time.perf_counter()
    for query in queries:
        exact.append(flat.search(query[None], 10)[1][0])
    flat_ms = 1000 * (time.perf_counter() - started) / count
    stages.end(f"{count} single queries on the flat index: {flat_ms:.2f} ms each")
    if hasattr(index, "nprobe"):
        recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)])
        print(f"IVF-PQ re-scored: recall@10 {recall:.3f} of the flat index's top 10")


if __name__ == "__main__":
    main()
