"""Semantic search over a paper collection, each paper embedded by its own domain's expert.

    python search.py index                                  # the SYNERGY papers shipped in data/, with
                                                            # outputs/moebert (or the untrained embedded model)
    python search.py query --text "Baclofen for spasticity after stroke" [--domain Chou_2004] [--top_k 10] [--json]
    python search.py index --papers papers.csv.gz --model ORG/MOEBERT --output_dir my_index [--add]
    python search.py query --index my_index --queries questions.txt

A collection is a table with columns `id`, `text`, `domain` (csv/tsv/jsonl/parquet, the text formats also
compressed; a `save_to_disk` folder; or a Hub dataset id). `index` writes into `--output_dir`: the vectors in
chunks (an interrupted run resumes from the chunks already written), a FAISS index (inner product on unit
vectors, i.e. cosine; `--index_type ivfpq` for collections whose vectors do not fit in memory: compressed codes
in memory, the candidates they find re-scored exactly from the chunks on disk), the ids and domains in index
order, a domain classifier for queries without a domain, and `manifest.json` (model and its fingerprint,
dimension, domains). `--add` appends papers to an existing index. `query` embeds the query with the
index's own model, through the expert of `--domain` or, without it, of the predicted domain.

From Python:

    from search import PaperIndex
    index = PaperIndex.load("search_index")
    hits = index.search(["Baclofen for spasticity after stroke"], top_k=5)   # domain predicted
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from data.cocitation import read_table
from data.loading import SAMPLE_DIR
from defaults import default_base_model, public_name
from encoders import (BACKENDS, BATCH_SIZE_HELP, TransformerEncoder, autocast, default_backend, default_device,
                      model_fingerprint, normalise, weights_fingerprint)
from onnx_backend import ExportError, cached_onnx_encoder, load_onnx_encoder

DEFAULT_INDEX_DIR = Path("search_index")
DEFAULT_TRAINED = Path("outputs/moebert")  # what `python train.py` writes
EMBEDDED_MODEL = "embedded"  # DEFAULT_BASE_MODEL_ID upcycled, untrained, into the SYNERGY domains: the base, per domain
MANIFEST, PAPERS, FAISS_FILE, CHUNKS = "manifest.json", "papers.jsonl", "index.faiss", "chunks"


class SearchError(ValueError):
    """Input that cannot be searched as given; the message names the problem and the fix."""


# ------------------------------------------------------------------------------------------------ papers


def read_papers(source: str | None) -> pd.DataFrame:
    """The collection as a table `id, text, domain` (ids as strings, unique)."""
    if source is None:
        return shipped_papers()
    path = Path(source)
    if path.is_dir():
        from datasets import load_from_disk

        table = load_from_disk(str(path)).to_pandas()
    elif path.exists():
        try:
            table = read_table(path)
        except ValueError as error:
            raise SearchError(str(error)) from None
    else:
        from datasets import load_dataset

        try:
            table = load_dataset(source, split="train").to_pandas()
        except Exception as error:  # the hub client raises many kinds; all mean "not loadable"
            raise SearchError(f"--papers {source!r} is no local file or folder and no loadable Hub dataset "
                              f"({type(error).__name__}: {error}).") from None
    missing = [c for c in ("id", "text", "domain") if c not in table.columns]
    if missing:
        raise SearchError(f"--papers {source}: the table lacks columns {missing} (it has {list(table.columns)}); "
                          "a collection needs id, text and domain.")
    table = table[["id", "text", "domain"]].astype(str)
    empty = table["text"].str.strip() == ""
    if empty.any():
        print(f"{int(empty.sum())} papers without text left out", file=sys.stderr)
        table = table[~empty]
    duplicated = table["id"][table["id"].duplicated()]
    if len(duplicated):
        raise SearchError(f"--papers {source}: ids occur more than once, e.g. {duplicated.iloc[0]!r}; ids must be unique.")
    return table.reset_index(drop=True)


def shipped_papers() -> pd.DataFrame:
    """Every paper of the embedded SYNERGY sample (all splits), once."""
    rows = []
    for folder in sorted(p for p in SAMPLE_DIR.iterdir() if p.is_dir()):
        for split in sorted(folder.glob("*.parquet")):
            pairs = pd.read_parquet(split)
            for side in ("a", "b"):
                rows.append(pd.DataFrame({"id": pairs[f"paper_{side}"], "text": pairs[side], "domain": folder.name}))
    return pd.concat(rows).drop_duplicates("id").astype(str).sort_values("id").reset_index(drop=True)


# ------------------------------------------------------------------------------------------------ model


def load_encoder(spec: str | None, max_seq_length: int, batch_size: int, device: str, backend: str = "torch",
                 quantize: str = "int8"):
    """(encoder, model name as recorded, fingerprint of its weights); `backend="onnx"`: ONNX Runtime, from an export
    folder or the model's cached export with `quantize` weights (see onnx_backend)."""
    if spec is None:
        spec = str(DEFAULT_TRAINED) if (DEFAULT_TRAINED / "config.json").exists() else EMBEDDED_MODEL
    if spec == EMBEDDED_MODEL:
        domains = sorted(p.name for p in SAMPLE_DIR.iterdir() if p.is_dir())
        fingerprint = weights_fingerprint(default_base_model(), domains)

        def upcycled():
            from modeling_moebert import MoEBertModel

            return MoEBertModel.from_bert(default_base_model(), domains=domains)

        if backend == "onnx":
            encoder = cached_onnx_encoder(fingerprint, upcycled, max_seq_length, batch_size, quantize, source=spec)
            return encoder, spec, fingerprint
        model, tokenizer = upcycled()
        return TransformerEncoder(model.to(device).eval(), tokenizer, max_seq_length, batch_size), spec, fingerprint
    try:
        if backend == "onnx":
            encoder = load_onnx_encoder(spec, max_seq_length, batch_size, quantize)
            return encoder, spec, encoder.fingerprint
        encoder = TransformerEncoder.from_pretrained(spec, max_seq_length, batch_size, device)
    except (OSError, ValueError) as error:
        raise SearchError(f"--model {spec!r} cannot be loaded: {str(error).splitlines()[0]}") from None
    if not encoder.is_moebert:
        raise SearchError(f"--model {spec!r} is no MoE-BERT: search routes each paper to its domain's expert.")
    return encoder, spec, model_fingerprint(spec)


def embed(encoder, texts: list[str], domains: list[str]) -> np.ndarray:
    """Unit vectors, each text through its own domain's expert (encoders without experts, such as `eval.py`'s
    TF-IDF or sentence-transformers ones, ignore the domain); a (text, domain) seen twice is encoded once."""
    if getattr(encoder, "is_moebert", False):
        model_domains = encoder.config.domains
        unknown = sorted(set(domains) - set(model_domains))
        if unknown:
            raise SearchError(f"domain {unknown[0]!r} is not one of the model's domains {model_domains}.")
    vectors = np.zeros((len(texts), 0), dtype=np.float32)
    for domain in sorted(set(domains)):
        rows = [i for i, d in enumerate(domains) if d == domain]
        unique = sorted({texts[i] for i in rows})
        encoded = encoder.encode(unique, domain)
        encoded = encoded.toarray() if hasattr(encoded, "toarray") else encoded  # sparse TF-IDF rows
        if not vectors.shape[1]:
            vectors = np.zeros((len(texts), encoded.shape[1]), dtype=np.float32)
        position = {text: j for j, text in enumerate(unique)}
        vectors[rows] = encoded[[position[texts[i]] for i in rows]]
    return normalise(vectors)


# ------------------------------------------------------------------------------------------------ domain classifier


class DomainClassifier:
    """Predicts a query's domain: TF-IDF words and a logistic regression fitted on the collection's own labels.
    Stored as JSON and .npy arrays (no pickle), so an index from elsewhere can be loaded safely."""

    def __init__(self, vocabulary: dict, idf: np.ndarray, coef: np.ndarray, intercept: np.ndarray, classes: list):
        self.vocabulary, self.idf, self.coef, self.intercept, self.classes = vocabulary, idf, coef, intercept, classes

    @classmethod
    def fit(cls, texts: list[str], domains: list[str]) -> "DomainClassifier":
        from sklearn.linear_model import LogisticRegression

        vectorizer = domain_vectorizer()
        features = vectorizer.fit_transform(texts)
        if len(set(domains)) == 1:  # nothing to tell apart
            coef, intercept = np.zeros((1, features.shape[1])), np.zeros(1)
        else:
            regression = LogisticRegression(max_iter=1000, C=10.0).fit(features, domains)
            coef, intercept = regression.coef_, regression.intercept_
            if len(regression.classes_) == 2:  # sklearn keeps one row z for two classes: p = sigmoid(z) = softmax(0, z)
                coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
        vocabulary = {word: int(i) for word, i in vectorizer.vocabulary_.items()}
        return cls(vocabulary, vectorizer.idf_, coef, intercept, sorted(set(domains)))

    def predict(self, texts: list[str]) -> tuple[list[str], np.ndarray]:
        """(domain, probability) per text."""
        vectorizer = domain_vectorizer()
        vectorizer.vocabulary_, vectorizer.idf_ = self.vocabulary, self.idf
        scores = vectorizer.transform(texts) @ self.coef.T + self.intercept
        scores = np.exp(scores - scores.max(axis=1, keepdims=True))
        probabilities = scores / scores.sum(axis=1, keepdims=True)
        best = probabilities.argmax(axis=1)
        return [self.classes[i] for i in best], probabilities[np.arange(len(texts)), best]

    def save(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "domain_classifier.json").write_text(json.dumps({"vocabulary": self.vocabulary, "classes": self.classes}))
        for name in ("idf", "coef", "intercept"):
            np.save(folder / f"domain_classifier_{name}.npy", getattr(self, name), allow_pickle=False)

    @classmethod
    def load(cls, folder: Path) -> "DomainClassifier":
        meta = json.loads((folder / "domain_classifier.json").read_text())
        arrays = [np.load(folder / f"domain_classifier_{n}.npy", allow_pickle=False) for n in ("idf", "coef", "intercept")]
        return cls(meta["vocabulary"], *arrays, meta["classes"])


def domain_vectorizer():
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(sublinear_tf=True, stop_words="english", min_df=1)


def held_out_accuracy(texts: list[str], domains: list[str], seed: int = 0) -> float | None:
    """Accuracy of the classifier on a random fifth of the papers, fitted on the rest."""
    if len(set(domains)) < 2 or len(texts) < 10:
        return None
    held_out = np.random.default_rng(seed).random(len(texts)) < 0.2
    fitted = DomainClassifier.fit([t for t, h in zip(texts, held_out) if not h], [d for d, h in zip(domains, held_out) if not h])
    predicted, _ = fitted.predict([t for t, h in zip(texts, held_out) if h])
    return float(np.mean([p == d for p, d in zip(predicted, (d for d, h in zip(domains, held_out) if h))]))


# ------------------------------------------------------------------------------------------------ index


def build_index(args) -> dict:
    """Embed the papers not yet in the index's chunks, then add every chunk not yet in the FAISS index."""
    out = Path(args.output_dir)
    papers = read_papers(args.papers)
    encoder, model_name, fingerprint = load_encoder(args.model, args.max_seq_length, args.batch_size, args.device,
                                                    args.backend)
    manifest = _manifest_for(out, args, model_name, fingerprint, encoder)
    done = _chunk_ids(out)
    if args.add:
        indexed = _indexed_papers(out)
        papers = pd.concat([indexed, papers[~papers["id"].isin(set(indexed["id"]))]])
    elif set(done) - set(papers["id"]):
        raise SearchError(f"{out} already holds papers that are not in this collection: pass --add to append "
                          "these papers, or another --output_dir.")
    todo = papers[~papers["id"].isin(set(done))]
    print(f"{len(papers)} papers, {len(papers) - len(todo)} already embedded, {len(todo)} to embed with {model_name}")
    todo = todo.assign(length=todo["text"].str.len()).sort_values(["domain", "length"], kind="stable")
    next_chunk = 1 + max((int(f.stem) for f in (out / CHUNKS).glob("[0-9]*.npy")), default=-1)  # skips .NNNNNN.npy
    with autocast(args.device, args.precision):  # decided (and said) once, not per chunk
        for start in tqdm(range(0, len(todo), args.chunk_size), desc="chunks", unit="chunk"):
            chunk = todo.iloc[start : start + args.chunk_size]
            vectors = embed(encoder, chunk["text"].tolist(), chunk["domain"].tolist())
            _write_chunk(out / CHUNKS, next_chunk, vectors, chunk)
            next_chunk += 1
    manifest |= _write_faiss(out, manifest, args)
    texts = papers["text"].tolist()
    classifier_domains = papers["domain"].tolist()
    manifest["domain_accuracy_held_out"] = held_out_accuracy(texts, classifier_domains)
    DomainClassifier.fit(texts, classifier_domains).save(out)
    _atomic_write(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    print(f"{manifest['papers']} papers in {out}/ ({manifest['index_type']}, dimension {manifest['dimension']}); "
          f"domain classifier accuracy on held-out papers: {manifest['domain_accuracy_held_out']}")
    return manifest


def _manifest_for(out: Path, args, model_name: str, fingerprint: str, encoder) -> dict:
    """The manifest of this index; an existing one must name the same model (and index type)."""
    manifest = {
        # the manifest may be published: the model by a public name, and where it is relative to the index, if near
        "model": public_name(model_name), "model_path": nearby_path(model_name, out), "fingerprint": fingerprint,
        "dimension": encoder.config.hidden_size,
        "normalized": True, "metric": "inner_product", "index_type": args.index_type,
        "max_seq_length": args.max_seq_length, "domains": list(encoder.config.domains),
        "precision": args.precision, "backend": args.backend,
    }
    existing = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).exists() else None
    if existing is None and args.add:
        raise SearchError(f"--add: {out} holds no index yet; build one first with `python search.py index`.")
    if existing and existing["fingerprint"] != fingerprint:
        raise SearchError(f"{out} was built with the model {existing['model']} ({existing['fingerprint'][:19]}...), "
                          f"not {model_name}: pass --model {existing['model']} or another --output_dir.")
    if existing:
        manifest |= {k: existing[k] for k in ("index_type", "indexed_chunks") if k in existing}
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")  # before the first chunk: resumable
    return manifest


def nearby_path(model: str, index_dir: Path) -> str | None:
    """A local model folder's path relative to the index folder, when it lies within two folders up of it (the index
    and the model moved together keep working); else None: a path that climbs further would tell about this machine."""
    if not Path(model).is_dir():
        return None
    relative = Path(os.path.relpath(Path(model).resolve(), Path(index_dir).resolve()))
    return relative.as_posix() if relative.parts[:3].count("..") <= 2 else None


def _finished_chunks(out: Path) -> list[Path]:
    """The chunks' id files in index order; a chunk's vectors are the .npy beside it (one without ids is unfinished)."""
    return sorted((out / CHUNKS).glob("*.json"))


def _chunk_ids(out: Path) -> list[str]:
    return [i for meta in _finished_chunks(out) for i in json.loads(meta.read_text())["id"]]


def _indexed_papers(out: Path) -> pd.DataFrame:
    return pd.read_json(out / PAPERS, lines=True, dtype=False).astype(str) if (out / PAPERS).exists() else pd.DataFrame(columns=["id", "text", "domain"])


def _write_chunk(folder: Path, number: int, vectors: np.ndarray, chunk: pd.DataFrame):
    """Vectors first, then the ids that mark the chunk as done: a chunk without its ids is redone."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{number:06d}.npy", "wb") as f:
        np.save(f, vectors, allow_pickle=False)
    os.replace(folder / f".{number:06d}.npy", folder / f"{number:06d}.npy")
    meta = {"id": chunk["id"].tolist(), "domain": chunk["domain"].tolist(), "text": chunk["text"].tolist()}
    _atomic_write(folder / f"{number:06d}.json", json.dumps(meta))


def _write_faiss(out: Path, manifest: dict, args) -> dict:
    """Add the chunks not yet indexed to the FAISS index (a new one if there is none), then write it and the
    papers table in index order."""
    import faiss

    chunks = _finished_chunks(out)
    indexed = manifest.get("indexed_chunks", 0)
    index = faiss.read_index(str(out / FAISS_FILE)) if indexed and (out / FAISS_FILE).exists() else None
    if index is None:
        indexed = 0
        index = _new_faiss_index(manifest, chunks, args)
    papers = [] if indexed == 0 else [json.loads(line) for line in open(out / PAPERS)]
    for meta_file in chunks[indexed:]:
        index.add(np.load(meta_file.with_suffix(".npy"), allow_pickle=False))
        meta = json.loads(meta_file.read_text())
        papers += [{"id": i, "domain": d, "text": t} for i, d, t in zip(meta["id"], meta["domain"], meta["text"])]
    faiss.write_index(index, str(out / f".{FAISS_FILE}"))
    os.replace(out / f".{FAISS_FILE}", out / FAISS_FILE)
    _atomic_write(out / PAPERS, "".join(json.dumps(p) + "\n" for p in papers))
    return {"indexed_chunks": len(chunks), "papers": index.ntotal}


def _new_faiss_index(manifest: dict, chunks: list[Path], args):
    """An empty index; IVF-PQ is trained first, on the vectors of the first chunks (up to --train_size)."""
    import faiss

    if manifest["index_type"] == "flat":
        return faiss.IndexFlatIP(manifest["dimension"])
    sample, count = [], 0
    for chunk in chunks:
        if count >= args.train_size:
            break
        sample.append(np.load(chunk.with_suffix(".npy"), allow_pickle=False))
        count += len(sample[-1])
    return ivfpq_index(np.concatenate(sample)[: args.train_size], args.nlist, args.pq_m)


def ivfpq_index(training_vectors: np.ndarray, nlist: int, pq_m: int):
    """An empty IVF-PQ inner-product index trained on these vectors: `pq_m` bytes a vector, up to `nlist` lists."""
    import faiss

    count, dimension = training_vectors.shape
    if dimension % pq_m:
        raise SearchError(f"--pq_m {pq_m} must divide the embedding dimension {dimension}.")
    if count < 256:  # each of the PQ's 256 codes per sub-vector needs a training point
        raise SearchError(f"--index_type ivfpq needs at least 256 papers to train on, this collection has "
                          f"{count}: use the default flat index.")
    nlist = max(1, min(nlist, count // 39))  # FAISS wants about 39 training vectors per list
    index = faiss.index_factory(dimension, f"IVF{nlist},PQ{pq_m}", faiss.METRIC_INNER_PRODUCT)
    index.do_polysemous_training = False  # codes for Hamming pre-filtering, which search does not use: 30x the training time
    index.train(training_vectors)
    return index


def _atomic_write(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ query


class PaperIndex:
    """A built index, its model and its domain classifier: `search(texts, domain=None, top_k=10)`."""

    def __init__(self, folder: Path, encoder, manifest: dict, papers: pd.DataFrame, faiss_index, classifier,
                 stored: "StoredVectors | None" = None, rerank: int = 10):
        self.folder, self.encoder, self.manifest, self.papers = folder, encoder, manifest, papers
        self.faiss_index, self.classifier, self.stored, self.rerank = faiss_index, classifier, stored, rerank

    @classmethod
    def load(cls, folder=DEFAULT_INDEX_DIR, model: str | None = None, device: str | None = None, nprobe: int = 64,
             rerank: int = 10, backend: str | None = None):
        """`backend`: torch or onnx, by default the one the index was built with. `nprobe`, `rerank`: IVF-PQ only.
        Its `top_k * rerank` best candidates by compressed codes are re-scored exactly from the stored vectors
        (memory-mapped, so only those rows are read); `rerank=0` keeps PQ scores."""
        import faiss

        folder = Path(folder)
        if not (folder / FAISS_FILE).exists():
            raise SearchError(f"{folder} holds no search index; build one with `python search.py index --output_dir {folder}`.")
        manifest = json.loads((folder / MANIFEST).read_text())
        nearby = manifest.get("model_path") and folder / manifest["model_path"]
        try:
            encoder, name, fingerprint = load_encoder(
                model or (str(nearby) if nearby and nearby.is_dir() else manifest["model"]), manifest["max_seq_length"],
                None, device or default_device(), backend or manifest.get("backend", "torch"),
            )
        except SearchError:
            if model:
                raise
            raise SearchError(f"{folder} was built with the model {manifest['model']!r}, which is not here: pass "
                              "--model with the path of its folder.") from None
        if fingerprint != manifest["fingerprint"]:
            raise SearchError(f"{folder} was built with the model {manifest['model']}, not {name} (its weights "
                              f"differ): query with --model {manifest['model']} or rebuild the index.")
        faiss_index = faiss.read_index(str(folder / FAISS_FILE))
        stored = None
        if hasattr(faiss_index, "nprobe"):
            faiss_index.nprobe = nprobe
            stored = StoredVectors.open(folder, faiss_index.ntotal) if rerank else None
        with open(folder / PAPERS) as lines:  # ids and domains only: the texts are not needed to answer
            papers = pd.DataFrame([(p["id"], p["domain"]) for p in map(json.loads, lines)], columns=["id", "domain"])
        return cls(folder, encoder, manifest, papers, faiss_index, DomainClassifier.load(folder), stored, rerank)

    def search(self, texts: list[str], domain: str | None = None, top_k: int = 10) -> list[dict]:
        """Per query text: {"domain", "domain_probability" (None when given), "hits": [{"id", "domain", "score"}]}."""
        blank = [i for i, text in enumerate(texts) if not text.strip()]
        if blank:  # it would embed to the domain token alone and rank papers by nothing the user asked
            raise SearchError(f"queries {blank[:5]} are empty: give each query some text.")
        if domain is not None and domain not in self.manifest["domains"]:
            raise SearchError(f"unknown domain {domain!r}: this index's model knows {self.manifest['domains']}.")
        if domain is None:
            domains, probabilities = self.classifier.predict(texts)
        else:
            domains, probabilities = [domain] * len(texts), [None] * len(texts)
        with autocast(self.encoder.device, self.manifest.get("precision", "fp32")):
            vectors = embed(self.encoder, texts, domains)
        if self.stored is None:
            scores, rows = self.faiss_index.search(vectors, top_k)
        else:
            scores, rows = self.stored.rerank(vectors, self.faiss_index.search(vectors, top_k * self.rerank)[1], top_k)
        results = []
        for query_domain, probability, row_scores, row_ids in zip(domains, probabilities, scores, rows):
            hits = [
                {"id": self.papers["id"][r], "domain": self.papers["domain"][r], "score": float(s),
                 "probability": self.cocitation_probability(float(s), query_domain, self.papers["domain"][r])}
                for s, r in zip(row_scores, row_ids) if r >= 0
            ]
            results.append({"domain": query_domain, "domain_probability": probability and float(probability), "hits": hits})
        return results


    def cocitation_probability(self, cosine: float, query_domain: str, paper_domain: str) -> float | None:
        """The model's calibrated probability that the query and a paper of its own domain are co-cited; None for a
        model without calibration for that domain, or a paper of another domain (calibrated on same-domain pairs)."""
        calibrated = (self.encoder.config.calibration or {}).get("parameters", {})
        if paper_domain != query_domain or query_domain not in calibrated:
            return None
        return self.encoder.cocitation_probability(cosine, query_domain)


class StoredVectors:
    """The exact vectors of an index in its chunk files, in index order, memory-mapped: a row is read when asked."""

    def __init__(self, chunks: list[np.ndarray]):
        self.chunks, self.starts = chunks, np.cumsum([0] + [len(c) for c in chunks])

    @classmethod
    def open(cls, folder: Path, count: int) -> "StoredVectors":
        """The chunks of the index in `folder`, which must hold the `count` vectors the FAISS index has."""
        chunks = [np.load(c.with_suffix(".npy"), mmap_mode="r", allow_pickle=False) for c in _finished_chunks(folder)]
        stored = cls(chunks)
        if stored.starts[-1] < count:
            raise SearchError(f"{folder / CHUNKS} holds {stored.starts[-1]} vectors but the index {count}: the chunks "
                              "were removed or cut short; query with --rerank 0 (compressed scores) or rebuild the index.")
        return stored

    def rows(self, rows: np.ndarray) -> np.ndarray:
        chunk = np.searchsorted(self.starts, rows, side="right") - 1
        return np.stack([self.chunks[c][r - self.starts[c]] for c, r in zip(chunk, rows)]).astype(np.float32)

    def rerank(self, queries: np.ndarray, candidates: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """Each query's candidate rows (-1: none) ordered by exact inner product, best `top_k`, as FAISS returns them."""
        scores = np.full((len(queries), top_k), -np.inf, dtype=np.float32)
        rows = np.full((len(queries), top_k), -1, dtype=np.int64)
        for i, (query, found) in enumerate(zip(queries, candidates)):
            found = found[found >= 0]
            if len(found):
                exact = self.rows(found) @ query
                best = np.argsort(-exact, kind="stable")[:top_k]
                scores[i, : len(best)], rows[i, : len(best)] = exact[best], found[best]
        return scores, rows


def read_queries(path: str) -> list[str]:
    """One query per line of a text file, or the `text` column of a table."""
    if Path(path).suffix == ".txt":
        return [line.strip() for line in open(path) if line.strip()]
    return read_table(path)["text"].astype(str).tolist()


def print_results(texts: list[str], results: list[dict], as_json: bool):
    for text, result in zip(texts, results):
        if as_json:
            print(json.dumps({"query": text} | result))
            continue
        how = "given" if result["domain_probability"] is None else f"predicted, p={result['domain_probability']:.2f}"
        print(f"query: {text[:100]}{'...' if len(text) > 100 else ''}\ndomain: {result['domain']} ({how})")
        for rank, hit in enumerate(result["hits"], 1):
            chance = "" if hit["probability"] is None else f"  P(co-cited) {hit['probability']:.2f}"
            print(f"  {rank:>3}. {hit['score']:.4f}{chance}  {hit['id']}  {hit['domain']}")


# ------------------------------------------------------------------------------------------------ command line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="embed a collection into a FAISS index")
    index.add_argument("--papers", default=None, help="table or dataset with id, text, domain (default: shipped SYNERGY)")
    index.add_argument("--model", default=None, help=f"MoE-BERT folder or Hub id (default: {DEFAULT_TRAINED} if "
                       "trained, else the embedded base upcycled into the SYNERGY domains)")
    index.add_argument("--output_dir", default=str(DEFAULT_INDEX_DIR))
    index.add_argument("--add", action="store_true", help="append these papers to the index in --output_dir")
    index.add_argument("--index_type", default="flat", choices=["flat", "ivfpq"])
    index.add_argument("--nlist", type=int, default=1024, help="ivfpq: inverted lists")
    index.add_argument("--pq_m", type=int, default=48, help="ivfpq: bytes per vector (divides the dimension)")
    index.add_argument("--train_size", type=int, default=100_000, help="ivfpq: vectors to train the quantizer on")
    index.add_argument("--chunk_size", type=int, default=1024, help="papers per chunk written (the unit of resume)")
    query = commands.add_parser("query", help="search an index")
    query.add_argument("--index", default=str(DEFAULT_INDEX_DIR))
    query.add_argument("--text", action="append", help="a query, repeatable")
    query.add_argument("--queries", help="a .txt file (one query per line) or a table with a text column")
    query.add_argument("--domain", default=None, help="the queries' domain (default: predicted per query)")
    query.add_argument("--top_k", type=int, default=10)
    query.add_argument("--nprobe", type=int, default=64, help="ivfpq: lists searched per query")
    query.add_argument("--rerank", type=int, default=10, help="ivfpq: top_k * rerank candidates re-scored exactly "
                       "from the stored vectors (0: compressed scores, no disk reads)")
    query.add_argument("--model", default=None, help="default: the model the index was built with")
    query.add_argument("--json", action="store_true", help="one JSON object per query")
    for sub in (index, query):
        sub.add_argument("--max_seq_length", type=int, default=256)
        sub.add_argument("--batch_size", type=int, default=None, help=BATCH_SIZE_HELP)
        sub.add_argument("--device", default=None, help="default: the accelerator if there is one")
        sub.add_argument("--backend", default=None, choices=BACKENDS, help="onnx: ONNX Runtime with int8 weights (a "
                         "MoE-BERT is exported once, on first use; an export folder can be given as --model); default: "
                         + ("the index's" if sub is query else "onnx on a CPU, torch on an accelerator"))
    index.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                       help="auto: bf16 autocast where bf16 is native (queries then use the same)")
    args = parser.parse_args(argv)
    args.device = args.device or default_device()
    try:
        if args.command == "index":
            args.backend = args.backend or default_backend(args.device)
            return build_index(args)
        texts = (args.text or []) + (read_queries(args.queries) if args.queries else [])
        if not texts:
            parser.error("query needs --text or --queries")
        index = PaperIndex.load(args.index, args.model, args.device, args.nprobe, args.rerank, args.backend)
        results = index.search(texts, args.domain, args.top_k)
        print_results(texts, results, args.json)
        return results
    except (SearchError, ExportError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
