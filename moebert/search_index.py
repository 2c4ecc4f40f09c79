"""A search index of a paper collection, each paper embedded by its own domain's expert: building it (resumable,
chunk by chunk), and querying it (through the expert of the query's domain, given or predicted).

A collection is a table with columns `id`, `text`, `domain` (csv/tsv/jsonl/parquet, the text formats also
compressed; a `save_to_disk` folder; or a Hub dataset id). An index folder holds the vectors in chunks (an
interrupted build resumes from the chunks already written), a FAISS index (inner product on unit vectors, i.e.
cosine; IVF-PQ for collections whose vectors do not fit in memory: compressed codes in memory, the candidates they
find re-scored exactly from the chunks on disk), the ids and domains in index order, a domain classifier for queries
without a domain, and `manifest.json` (model and its fingerprint, dimension, domains, backend). Nothing in it is
pickled.
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from moebert.atomic import write_file, writing_file
from moebert.cocitation import read_table
from moebert.device import autocast, default_device
from moebert.domain_classifier import DomainClassifier, held_out_accuracy
from moebert.encoders import normalise
from moebert.encoding import EncodingOptions, encoder_of_model, load_encoder
from moebert.loading import model_fingerprint, weights_fingerprint
from moebert.names import DEFAULT_OUTPUT_DIR, default_base_model, nearby_path, public_name
from moebert.pair_datasets import SAMPLE_DIR

DEFAULT_INDEX_DIR = Path("search_index")
EMBEDDED_MODEL = "embedded"  # the embedded base upcycled, untrained, into the SYNERGY domains: the base, per domain
MANIFEST, PAPERS, FAISS_FILE, CHUNKS = "manifest.json", "papers.jsonl", "index.faiss", "chunks"


@dataclass
class IndexSettings:
    """How `build_index` builds: the FAISS index type and its IVF-PQ parameters, and the papers per chunk."""

    index_type: str = "flat"  # or "ivfpq"
    nlist: int = 1024  # ivfpq: inverted lists
    pq_m: int = 48  # ivfpq: bytes per vector (divides the dimension)
    train_size: int = 100_000  # ivfpq: vectors the quantizer is trained on
    chunk_size: int = 1024  # papers per chunk written: the unit of resume


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


def index_encoder(spec: str | None, options: EncodingOptions):
    """(encoder, model name as recorded, fingerprint of its weights) of a search model: a MoE-BERT folder, Hub id or
    ONNX export; by default the model train.py writes, else the embedded base upcycled into the SYNERGY domains."""
    if spec is None:
        spec = str(DEFAULT_OUTPUT_DIR) if (DEFAULT_OUTPUT_DIR / "config.json").exists() else EMBEDDED_MODEL
    if spec == EMBEDDED_MODEL:
        from modeling_moebert import MoEBertModel

        domains = sorted(p.name for p in SAMPLE_DIR.iterdir() if p.is_dir())
        fingerprint = weights_fingerprint(default_base_model(), domains)
        model, tokenizer = MoEBertModel.from_bert(default_base_model(), domains=domains)
        model.config.max_seq_length = 256  # the base's own (its sentence-transformers settings)
        return encoder_of_model(model, tokenizer, fingerprint, options, spec), spec, fingerprint
    try:
        encoder = load_encoder(spec, options)
    except (OSError, ValueError) as error:
        raise SearchError(f"--model {spec!r} cannot be loaded: {str(error).splitlines()[0]}") from None
    if not encoder.routes_by_domain:
        raise SearchError(f"--model {spec!r} is no MoE-BERT: search routes each paper to its domain's expert.")
    return encoder, spec, getattr(encoder, "fingerprint", None) or model_fingerprint(spec)


def embed(encoder, texts: list[str], domains: list[str]) -> np.ndarray:
    """Unit vectors, each text through its own domain's expert (encoders without experts, such as `eval.py`'s
    TF-IDF or sentence-transformers ones, ignore the domain); a (text, domain) seen twice is encoded once."""
    if encoder.routes_by_domain:
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


# ------------------------------------------------------------------------------------------------ index


def build_index(papers_source: str | None, out: Path, model: str | None, options: EncodingOptions,
                settings: IndexSettings, add: bool = False) -> dict:
    """Embed the papers not yet in the index's chunks, then add every chunk not yet in the FAISS index; `add`: append
    the papers to an existing index."""
    out = Path(out)
    papers = read_papers(papers_source)
    encoder, model_name, fingerprint = index_encoder(model, options)
    manifest = _manifest_for(out, model_name, fingerprint, encoder, options, settings.index_type, add)
    done = _chunk_ids(out)
    if add:
        indexed = _indexed_papers(out)
        papers = pd.concat([indexed, papers[~papers["id"].isin(set(indexed["id"]))]])
    elif set(done) - set(papers["id"]):
        raise SearchError(f"{out} already holds papers that are not in this collection: pass --add to append "
                          "these papers, or another --output_dir.")
    todo = papers[~papers["id"].isin(set(done))]
    print(f"{len(papers)} papers, {len(papers) - len(todo)} already embedded, {len(todo)} to embed with {model_name}")
    todo = todo.assign(length=todo["text"].str.len()).sort_values(["domain", "length"], kind="stable")
    next_chunk = 1 + max((int(f.stem) for f in (out / CHUNKS).glob("[0-9]*.npy")), default=-1)  # skips .NNNNNN.npy
    with autocast(options.device, options.dtype):  # decided (and said) once, not per chunk
        for start in tqdm(range(0, len(todo), settings.chunk_size), desc="chunks", unit="chunk"):
            chunk = todo.iloc[start : start + settings.chunk_size]
            vectors = embed(encoder, chunk["text"].tolist(), chunk["domain"].tolist())
            _write_chunk(out / CHUNKS, next_chunk, vectors, chunk)
            next_chunk += 1
    manifest |= _write_faiss(out, manifest, settings)
    texts = papers["text"].tolist()
    classifier_domains = papers["domain"].tolist()
    manifest["domain_accuracy_held_out"] = held_out_accuracy(texts, classifier_domains)
    DomainClassifier.fit(texts, classifier_domains).save(out)
    write_file(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    print(f"{manifest['papers']} papers in {out}/ ({manifest['index_type']}, dimension {manifest['dimension']}); "
          f"domain classifier accuracy on held-out papers: {manifest['domain_accuracy_held_out']}")
    return manifest


def _manifest_for(out: Path, model_name: str, fingerprint: str, encoder, options: EncodingOptions, index_type: str,
                  add: bool) -> dict:
    """The manifest of this index; an existing one must name the same model (and index type)."""
    manifest = {
        # the manifest may be published: the model by a public name, and where it is relative to the index, if near
        "model": public_name(model_name), "model_path": nearby_path(model_name, out), "fingerprint": fingerprint,
        "dimension": encoder.config.hidden_size,
        "normalized": True, "metric": "inner_product", "index_type": index_type,
        "max_seq_length": encoder.max_seq_length, "domains": list(encoder.config.domains),
        "precision": options.dtype, "backend": options.runtime,
    }
    existing = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).exists() else None
    if existing is None and add:
        raise SearchError(f"--add: {out} holds no index yet; build one first with `python search.py index`.")
    if existing and existing["fingerprint"] != fingerprint:
        raise SearchError(f"{out} was built with the model {existing['model']} ({existing['fingerprint'][:19]}...), "
                          f"not {model_name}: pass --model {existing['model']} or another --output_dir.")
    if existing:
        manifest |= {k: existing[k] for k in ("index_type", "indexed_chunks") if k in existing}
    out.mkdir(parents=True, exist_ok=True)
    write_file(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")  # before the first chunk: resumable
    return manifest


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
    with writing_file(folder / f"{number:06d}.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, vectors, allow_pickle=False)
    meta = {"id": chunk["id"].tolist(), "domain": chunk["domain"].tolist(), "text": chunk["text"].tolist()}
    write_file(folder / f"{number:06d}.json", json.dumps(meta))


def _write_faiss(out: Path, manifest: dict, settings: IndexSettings) -> dict:
    """Add the chunks not yet indexed to the FAISS index (a new one if there is none), then write it and the
    papers table in index order."""
    import faiss

    chunks = _finished_chunks(out)
    indexed = manifest.get("indexed_chunks", 0)
    index = faiss.read_index(str(out / FAISS_FILE)) if indexed and (out / FAISS_FILE).exists() else None
    if index is None:
        indexed = 0
        index = _new_faiss_index(manifest, chunks, settings)
    papers = [] if indexed == 0 else [json.loads(line) for line in open(out / PAPERS)]
    for meta_file in chunks[indexed:]:
        index.add(np.load(meta_file.with_suffix(".npy"), allow_pickle=False))
        meta = json.loads(meta_file.read_text())
        papers += [{"id": i, "domain": d, "text": t} for i, d, t in zip(meta["id"], meta["domain"], meta["text"])]
    with writing_file(out / FAISS_FILE) as tmp:
        faiss.write_index(index, str(tmp))
    write_file(out / PAPERS, "".join(json.dumps(p) + "\n" for p in papers))
    return {"indexed_chunks": len(chunks), "papers": index.ntotal}


def _new_faiss_index(manifest: dict, chunks: list[Path], settings: IndexSettings):
    """An empty index; IVF-PQ is trained first, on the vectors of the first chunks (up to --train_size)."""
    import faiss

    if manifest["index_type"] == "flat":
        return faiss.IndexFlatIP(manifest["dimension"])
    sample, count = [], 0
    for chunk in chunks:
        if count >= settings.train_size:
            break
        sample.append(np.load(chunk.with_suffix(".npy"), allow_pickle=False))
        count += len(sample[-1])
    return ivfpq_index(np.concatenate(sample)[: settings.train_size], settings.nlist, settings.pq_m)


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


# ------------------------------------------------------------------------------------------------ query


class PaperIndex:
    """A built index, its model and its domain classifier: `search(texts, domain=None, top_k=10)`."""

    def __init__(self, folder: Path, encoder, manifest: dict, papers: pd.DataFrame, faiss_index, classifier,
                 stored: "StoredVectors | None" = None, rerank: int = 10, precision: str = "fp32"):
        self.folder, self.encoder, self.manifest, self.papers = folder, encoder, manifest, papers
        self.faiss_index, self.classifier, self.stored, self.rerank = faiss_index, classifier, stored, rerank
        self.precision = precision

    @classmethod
    def load(cls, folder=DEFAULT_INDEX_DIR, model: str | None = None, options: EncodingOptions | None = None,
             nprobe: int = 64, rerank: int = 10):
        """`options`: how queries are encoded; by default the backend, length and precision the index was built
        with. `nprobe`, `rerank`: IVF-PQ only.
        Its `top_k * rerank` best candidates by compressed codes are re-scored exactly from the stored vectors
        (memory-mapped, so only those rows are read); `rerank=0` keeps PQ scores."""
        import faiss

        folder = Path(folder)
        if not (folder / FAISS_FILE).exists():
            raise SearchError(f"{folder} holds no search index; build one with `python search.py index --output_dir {folder}`.")
        manifest = json.loads((folder / MANIFEST).read_text())
        nearby = manifest.get("model_path") and folder / manifest["model_path"]
        options = query_options(options or EncodingOptions(device=default_device()), manifest)
        try:
            encoder, name, fingerprint = index_encoder(
                model or (str(nearby) if nearby and nearby.is_dir() else manifest["model"]), options)
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
        return cls(folder, encoder, manifest, papers, faiss_index, DomainClassifier.load(folder), stored, rerank,
                   options.dtype)

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
        with autocast(self.encoder.device, self.precision):
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


def query_options(options: EncodingOptions, manifest: dict) -> EncodingOptions:
    """Queries are encoded as the index was built (backend, precision, length) unless asked otherwise."""
    built = {"backend": manifest.get("backend", "torch"), "precision": manifest.get("precision", "fp32"),
             "max_seq_length": manifest["max_seq_length"]}
    given = {k: v for k, v in vars(options).items() if v is not None}
    return EncodingOptions(**(built | given))
