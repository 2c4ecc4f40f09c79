"""A search index of a paper collection, each paper embedded by its own domain's expert: built chunk by chunk by any
number of processes (`accelerate launch search.py index`), resumable whatever the process count, and queried through
the expert of the query's domain, given or predicted.

An index folder holds: `chunks/NNNNNN.npy` (the vectors of chunk N, unit length) and `chunks/NNNNNN.parquet` (its
papers' id, domain and text; written last, it marks the chunk done), a FAISS index (inner product on unit vectors,
i.e. cosine; IVF-PQ for collections whose vectors outgrow memory: compressed codes in memory, the candidates they find
re-scored exactly from the chunks on disk), a domain classifier for queries without a domain, and `manifest.json`
(model and its fingerprint, dimension, domains, backend, the collections indexed). Nothing in it is pickled.

Chunk k of a collection is its rows k * chunk_size to (k + 1) * chunk_size, read in pieces (moebert.search.collection):
every process reads the collection and encodes the chunks that fall to it, so a chunk is the same papers, encoded
alike, whatever the number of processes, and a resumed build redoes only the chunks not yet written. One process then
builds the FAISS index, the classifier (on a bounded sample) and the manifest. Several processes need a folder that
every one of them sees (one disk, or a shared filesystem across machines); a layout where they do not is refused.
"""

import json
import logging
import socket
import uuid
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from moebert.atomic import write_file, writing_file
from moebert.data.pairs import sample_specs
from moebert.device import ProcessGroupError, autocast, check_process_group, cpu_forced, default_device
from moebert.encoders.interface import UnknownDomainError, embed
from moebert.encoders.loader import encoder_of_model, load_encoder
from moebert.encoders.options import EncodingOptions
from moebert.loading import model_fingerprint, weights_fingerprint
from moebert.models.builder import build_model
from moebert.names import DEFAULT_BASE_MODEL_ID, DEFAULT_OUTPUT_DIR, default_base_model, nearby_path, public_name
from moebert.search.collection import CollectionError, iter_pieces
from moebert.search.domain_classifier import DomainClassifier, held_out_accuracy

logger = logging.getLogger(__name__)

DEFAULT_INDEX_DIR = Path("search_index")
EMBEDDED_MODEL = "embedded"  # the embedded base upcycled, untrained, into the SYNERGY domains: the base, per domain
MANIFEST, FAISS_FILE, CHUNKS, FORMAT = "manifest.json", "index.faiss", "chunks", 2
IVFPQ_ABOVE = 2_000_000  # papers: `--index_type auto` takes IVF-PQ above this (docs/search.md: memory and latency)


@dataclass
class IndexSettings:
    """How `build_index` builds: the FAISS index type (auto: flat up to IVFPQ_ABOVE papers, IVF-PQ above) and its
    IVF-PQ parameters, the papers per chunk, and the sample the domain classifier is fitted on."""

    index_type: str = "auto"  # auto, flat or ivfpq
    nlist: int = 1024  # ivfpq: inverted lists
    pq_m: int = 48  # ivfpq: bytes per vector (divides the dimension)
    train_size: int = 100_000  # ivfpq: vectors the quantizer is trained on, drawn from every chunk
    chunk_size: int = 1024  # papers per chunk written: the unit of resume and of the processes' shares
    classifier_sample: int = 50_000  # papers the domain classifier is fitted on, drawn from every chunk


class SearchError(ValueError):
    """Input that cannot be searched as given; the message names the problem and the fix."""


def faiss_module():
    """FAISS, which every index is built with and searched by (requirements.txt pins faiss-cpu)."""
    try:
        import faiss
    except ImportError:
        raise SearchError("search needs FAISS, which is not installed here: pip install faiss-cpu (the version "
                          "requirements.txt pins)") from None
    return faiss


# ------------------------------------------------------------------------------------------------ model and vectors


def index_encoder(spec: str | None, options: EncodingOptions):
    """(encoder, model name as recorded, fingerprint of its weights) of a search model: a MoE-BERT folder, Hub id or
    ONNX export; by default the model train.py writes, else the embedded base upcycled into the SYNERGY domains."""
    if spec is None:
        spec = str(DEFAULT_OUTPUT_DIR) if (DEFAULT_OUTPUT_DIR / "config.json").exists() else EMBEDDED_MODEL
    if spec == EMBEDDED_MODEL:
        domains = list(sample_specs())
        fingerprint = weights_fingerprint(default_base_model(), domains)
        encoder = encoder_of_model(lambda: build_model(DEFAULT_BASE_MODEL_ID, domains), fingerprint, options, spec)
        return encoder, spec, fingerprint
    try:
        encoder = load_encoder(spec, options)
    except (OSError, ValueError) as error:
        raise SearchError(f"--model {spec!r} cannot be loaded: {str(error).splitlines()[0]}") from None
    if not encoder.routes_by_domain:
        raise SearchError(f"--model {spec!r} is no MoE-BERT: search routes each paper to its domain's expert.")
    return encoder, spec, getattr(encoder, "fingerprint", None) or model_fingerprint(spec)


# ------------------------------------------------------------------------------------------------ building


def build_index(papers_source: str | None, out: Path, model: str | None, options: EncodingOptions,
                settings: IndexSettings, add: bool = False, processes=None, loaded=None, on_stage=None) -> dict | None:
    """Embed the chunks of the collection not yet written (each process its share), then, on the main process, add
    every chunk not yet in the FAISS index and fit the domain classifier; `add`: append the collection to an existing
    index. `processes`: an accelerate PartialState (default: this run's). `loaded`: (encoder, model name,
    fingerprint) of a model already loaded, instead of `model`. `on_stage(name)` is called as each stage ends (a
    benchmark's clock). Returns the manifest (on the main process)."""
    faiss_module()  # refused before any work, not after the chunks
    processes = processes or launched_processes()
    out, on_stage = Path(out), on_stage or (lambda stage: None)
    if processes.num_processes > 1 and options.runtime == "torch" and processes.device.type != "cpu":
        options = EncodingOptions(**(vars(options) | {"device": str(processes.device)}))  # a GPU each
    with processes.main_process_first():  # an ONNX export is made once, into the cache, then read by the others
        encoder, model_name, fingerprint = loaded or index_encoder(model, options)
    on_stage("model loaded")
    manifest = _manifest_for(out, model_name, fingerprint, encoder, options, settings.index_type, add)  # checked by all
    if processes.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_file(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")  # before the first chunk: resumable
    processes.wait_for_everyone()
    check_shared_folder(out, processes)
    part = _collection_part(manifest, papers_source, add)
    done = set(chunk_numbers(out))  # read by every process before any writes: all agree on the shares
    processes.wait_for_everyone()
    skip = _indexed_ids(out, below=part["first"]) if add else set()
    _embed_share(encoder, papers_source, out, part, done, skip, settings, options, processes)
    processes.wait_for_everyone()  # every chunk is written
    on_stage("chunks embedded and written")
    if not processes.is_main_process:
        return None
    manifest["parts"][-1] |= {"complete": True}
    return _finish(out, manifest, settings, on_stage)


def launched_processes():
    """This run's processes (accelerate's PartialState; CPU processes join by gloo under ACCELERATE_USE_CPU), checked
    to form one group."""
    from accelerate import PartialState

    processes = PartialState(cpu=cpu_forced())
    try:
        check_process_group(processes.num_processes)
    except ProcessGroupError as error:
        raise SearchError(str(error)) from None
    return processes


def check_shared_folder(out: Path, processes):
    """Several processes write one index: each must see the folder the others see. Refused in one line if not."""
    if processes.num_processes == 1:
        return
    from accelerate.utils import broadcast_object_list, gather_object

    token = [uuid.uuid4().hex if processes.is_main_process else None]
    broadcast_object_list(token)
    marker = out / f".process-check-{token[0]}"
    if processes.is_main_process:
        write_file(marker, token[0])
    processes.wait_for_everyone()
    sees = marker.is_file() and marker.read_text() == token[0]
    answers = gather_object([(processes.process_index, socket.gethostname(), sees)])
    processes.wait_for_everyone()
    if processes.is_main_process:
        marker.unlink(missing_ok=True)
    blind = [f"process {rank} on {host}" for rank, host, seen in answers if not seen]
    if blind:
        raise SearchError(f"{out} is not one folder for every process ({', '.join(blind)} does not see what process 0 "
                          "wrote there): indexing with several processes or machines needs an --output_dir that "
                          "every process sees (one disk, or a shared filesystem such as NFS).")


def _collection_part(manifest: dict, source: str | None, add: bool) -> dict:
    """The part of the index this collection fills: its first chunk number. A build resumes its one part; --add
    resumes an unfinished part of the same collection or starts a new one after the last chunk."""
    name = public_name(source) if source else "the shipped SYNERGY papers"
    parts = manifest.setdefault("parts", [])
    if parts and (not add or (parts[-1]["source"] == name and not parts[-1].get("complete"))):
        return parts[-1]
    first = max((p["first"] + p.get("chunks", 0) for p in parts), default=0)
    parts.append({"source": name, "first": first})
    return parts[-1]


def _embed_share(encoder, source, out: Path, part: dict, done: set, skip: set, settings: IndexSettings,
                 options: EncodingOptions, processes):
    """Read the collection piece by piece; encode and write the chunks not done that fall to this process (the
    undone chunks are dealt out in turn), and on the main process check that the chunks done are this collection's."""
    rank, world, undone, written = processes.process_index, processes.num_processes, 0, 0
    pieces = tqdm(desc=f"chunks (process {rank})" if world > 1 else "chunks", unit="chunk")
    with autocast(options.device, options.dtype):  # decided (and said) once, not per chunk
        for k, piece in enumerate(_pieces(source, settings.chunk_size, skip)):
            number = part["first"] + k
            if number in done:  # every process checks, so that all of them stop on a foreign chunk
                _check_done_chunk(out, number, piece, source)
            elif undone % world == rank:
                undone += 1
                if len(piece):
                    _write_chunk(out / CHUNKS, number, _embed_papers(encoder, piece), piece)
                    written += 1
            else:
                undone += 1
            pieces.update(1)
    pieces.close()
    part["chunks"] = k + 1 if "k" in locals() else 0
    logger.info(f"process {rank} of {world}: encoded {written} chunks ({len(done)} were done before)")


def _embed_papers(encoder, papers: pd.DataFrame) -> np.ndarray:
    try:
        return embed(encoder, papers["text"].tolist(), papers["domain"].tolist())
    except UnknownDomainError as error:
        raise SearchError(f"--papers: {error}") from None


def _pieces(source, size: int, skip: set):
    """The collection's pieces without empty texts (counted) and without papers already indexed (`skip`)."""
    try:
        for piece in iter_pieces(source, size):
            empty = piece["text"].str.strip() == ""
            if empty.any():
                logger.warning(f"{int(empty.sum())} papers without text left out")
            yield piece[~empty & ~piece["id"].isin(skip)]
    except CollectionError as error:
        raise SearchError(str(error)) from None


def _check_done_chunk(out: Path, number: int, piece: pd.DataFrame, source):
    import pyarrow.parquet as pq

    stored = pq.read_table(chunk_file(out, number, ".parquet"), columns=["id"]).column("id").to_pylist()
    if stored != piece["id"].tolist():
        raise SearchError(f"{out} already holds papers that are not in this collection ({source}, chunk {number}): "
                          "pass --add to append these papers, or another --output_dir.")


def chunk_file(out: Path, number: int, suffix: str) -> Path:
    return out / CHUNKS / f"{number:06d}{suffix}"


def chunk_numbers(out: Path) -> list[int]:
    """The numbers of the finished chunks, in index order (a chunk without its papers table is unfinished)."""
    return sorted(int(p.stem) for p in (out / CHUNKS).glob("[0-9]*.parquet"))


def _write_chunk(folder: Path, number: int, vectors: np.ndarray, chunk: pd.DataFrame):
    """Vectors first, then the papers table that marks the chunk as done: a chunk without it is redone."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    with writing_file(folder / f"{number:06d}.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, vectors, allow_pickle=False)
    table = pa.table({c: chunk[c].tolist() for c in ("id", "domain", "text")})
    with writing_file(folder / f"{number:06d}.parquet") as tmp:
        pq.write_table(table, tmp)


def _papers(out: Path, columns=("id", "domain"), numbers: list[int] | None = None) -> pd.DataFrame:
    """Columns of the papers of the finished chunks, in index order; a query reads ids and domains only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    numbers = chunk_numbers(out) if numbers is None else numbers
    tables = [pq.read_table(chunk_file(out, n, ".parquet"), columns=list(columns)) for n in numbers]
    return pa.concat_tables(tables).to_pandas() if tables else pd.DataFrame(columns=list(columns))


def _indexed_ids(out: Path, below: int) -> set:
    return set(_papers(out, ("id",), [n for n in chunk_numbers(out) if n < below])["id"])


def _manifest_for(out: Path, model_name: str, fingerprint: str, encoder, options: EncodingOptions, index_type: str,
                  add: bool) -> dict:
    """The manifest of this index; an existing one must name the same model (and keeps its index type and parts)."""
    manifest = {
        "format": FORMAT,
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
    if existing and existing.get("format") != FORMAT:
        raise SearchError(f"{out} was built by an earlier search.py (another index layout): build it anew into another "
                          "--output_dir.")
    if existing and existing["fingerprint"] != fingerprint:
        raise SearchError(f"{out} was built with the model {existing['model']} ({existing['fingerprint'][:19]}...), "
                          f"not {model_name}: pass --model {existing['model']} or another --output_dir.")
    if existing:
        manifest |= {k: existing[k] for k in ("index_type", "indexed_chunks", "parts") if k in existing}
    return manifest


def _finish(out: Path, manifest: dict, settings: IndexSettings, on_stage) -> dict:
    """Once every chunk is written: ids checked unique, the FAISS index, the domain classifier, the manifest."""
    numbers = chunk_numbers(out)
    ids = _papers(out, ("id",), numbers)["id"]
    if ids.duplicated().any():
        raise SearchError(f"--papers: ids occur more than once, e.g. {ids[ids.duplicated()].iloc[0]!r}; ids must be "
                          "unique (across the collections of an index, too).")
    on_stage("ids checked unique")
    manifest |= _write_faiss(out, manifest, numbers, settings)
    on_stage(f"FAISS index ({manifest['index_type']}) trained, filled and written")
    sample = _sample_papers(out, numbers, settings.classifier_sample)
    texts, domains = sample["text"].tolist(), sample["domain"].tolist()
    manifest["domain_accuracy_held_out"] = held_out_accuracy(texts, domains)
    DomainClassifier.fit(texts, domains).save(out)
    on_stage(f"domain classifier fitted on {len(texts)} papers")
    write_file(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    logger.info(f"{manifest['papers']} papers in {out}/ ({manifest['index_type']}, dimension "
                f"{manifest['dimension']}); domain classifier accuracy on held-out papers: "
                f"{manifest['domain_accuracy_held_out']}")
    return manifest


def _write_faiss(out: Path, manifest: dict, numbers: list[int], settings: IndexSettings) -> dict:
    """Add the chunks not yet indexed to the FAISS index (a new one if there is none), chunk by chunk."""
    faiss = faiss_module()

    indexed = manifest.get("indexed_chunks", 0)
    index = faiss.read_index(str(out / FAISS_FILE)) if indexed and (out / FAISS_FILE).exists() else None
    if index is None:
        indexed = 0
        index = _new_faiss_index(out, manifest, numbers, settings)
    for number in tqdm(numbers[indexed:], desc="adding to the index", unit="chunk", leave=False):
        index.add(np.load(chunk_file(out, number, ".npy"), allow_pickle=False))
    with writing_file(out / FAISS_FILE) as tmp:
        faiss.write_index(index, str(tmp))
    return {"indexed_chunks": len(numbers), "papers": index.ntotal}


def _new_faiss_index(out: Path, manifest: dict, numbers: list[int], settings: IndexSettings):
    """An empty index of the manifest's type (auto: by the collection's size, said in one line); IVF-PQ is trained
    first, on up to --train_size vectors drawn from every chunk."""
    faiss = faiss_module()

    counts = [len(np.load(chunk_file(out, n, ".npy"), mmap_mode="r", allow_pickle=False)) for n in numbers]
    total = sum(counts)
    if manifest["index_type"] == "auto":
        manifest["index_type"] = "ivfpq" if total > IVFPQ_ABOVE else "flat"
        why = "above" if total > IVFPQ_ABOVE else "up to"
        logger.info(f"--index_type auto: {manifest['index_type']} for {total} papers ({why} {IVFPQ_ABOVE:,}: a flat "
                    f"index holds {total * manifest['dimension'] * 4 / 2**30:.2f} GiB of vectors in memory)")
    if manifest["index_type"] == "flat":
        return faiss.IndexFlatIP(manifest["dimension"])
    return ivfpq_index(_sample_rows(out, numbers, counts, settings.train_size), settings.nlist, settings.pq_m)


def _draw(counts: list[int], size: int, seed: int = 0) -> list[np.ndarray]:
    """Per chunk, the rows of a uniform sample of `size` rows (all of them when there are fewer)."""
    total = sum(counts)
    chosen = np.sort(np.random.default_rng(seed).choice(total, min(size, total), replace=False))
    starts = np.cumsum([0] + counts)
    return [chosen[(chosen >= a) & (chosen < b)] - a for a, b in zip(starts[:-1], starts[1:])]


def _sample_rows(out: Path, numbers: list[int], counts: list[int], size: int) -> np.ndarray:
    """The vectors of a uniform sample of rows, each chunk mapped only while its rows are read."""
    rows = _draw(counts, size)
    return np.concatenate([np.load(chunk_file(out, n, ".npy"), mmap_mode="r", allow_pickle=False)[r].astype(np.float32)
                           for n, r in zip(numbers, rows)])


def _sample_papers(out: Path, numbers: list[int], size: int) -> pd.DataFrame:
    """Texts and domains of a uniform sample of the papers (the domain classifier's data)."""
    import pyarrow.parquet as pq

    files = [chunk_file(out, n, ".parquet") for n in numbers]
    rows = _draw([pq.ParquetFile(f).metadata.num_rows for f in files], size)
    parts = [pq.read_table(f, columns=["text", "domain"]).take(r).to_pandas() for f, r in zip(files, rows) if len(r)]
    return pd.concat(parts, ignore_index=True)


def ivfpq_index(training_vectors: np.ndarray, nlist: int, pq_m: int):
    """An empty IVF-PQ inner-product index trained on these vectors: `pq_m` bytes a vector, up to `nlist` lists."""
    faiss = faiss_module()

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
        faiss = faiss_module()

        folder = Path(folder)
        if not (folder / FAISS_FILE).exists():
            raise SearchError(f"{folder} holds no search index; build one with `python search.py index --output_dir {folder}`.")
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("format") != FORMAT:
            raise SearchError(f"{folder} was built by an earlier search.py (another index layout): build it anew with "
                              "`python search.py index`.")
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
        papers = _papers(folder)  # ids and domains only: the texts are not needed to answer
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
        scores, rows = self._nearest(vectors, top_k)
        results = []
        for query_domain, probability, row_scores, row_ids in zip(domains, probabilities, scores, rows):
            hits = [
                {"id": self.papers["id"][r], "domain": self.papers["domain"][r], "score": float(s),
                 "probability": self.cocitation_probability(float(s), query_domain, self.papers["domain"][r])}
                for s, r in zip(row_scores, row_ids) if r >= 0
            ]
            results.append({"domain": query_domain, "domain_probability": probability and float(probability), "hits": hits})
        return results

    def similar_to(self, ids: list, top_k: int = 10) -> dict:
        """Papers like these: the collection ranked by how likely each paper is to be co-cited with any of the given
        ones (indexed papers, each embedded by its own domain's expert), the given papers left out. Per hit: its best
        cosine with a given paper, that paper (`closest`), and their calibrated P(co-cited) where both share a
        domain. {"ids", "hits": [{"id", "domain", "score", "probability", "closest"}]}."""
        rows = self.rows_of(ids)
        given = set(rows.tolist())
        scores, found = self._nearest(self.exact_vectors(rows), min(top_k + len(given), self.faiss_index.ntotal))
        best: dict[int, tuple[float, int]] = {}  # candidate row -> (best cosine, the given row it was found from)
        for source, row_scores, row_ids in zip(rows, scores, found):
            for score, row in zip(row_scores.tolist(), row_ids.tolist()):
                if row >= 0 and row not in given and score > best.get(row, (-np.inf,))[0]:
                    best[row] = (score, int(source))
        ranked = sorted(best.items(), key=lambda item: -item[1][0])[:top_k]
        domains, paper_ids = self.papers["domain"], self.papers["id"]
        hits = [{"id": paper_ids[r], "domain": domains[r], "score": score, "closest": paper_ids[source],
                 "probability": self.cocitation_probability(score, domains[source], domains[r])}
                for r, (score, source) in ranked]
        return {"ids": list(ids), "hits": hits}

    def rows_of(self, ids: list) -> np.ndarray:
        """The index rows of these paper ids (compared as text: a command line gives "42" for the id 42); an unknown
        id is refused naming it."""
        if not ids:
            raise SearchError("give at least one paper id.")
        unknown = [str(i) for i in ids if str(i) not in self.row_of_id]
        if unknown:
            raise SearchError(f"unknown paper id {unknown[0]!r}: this index holds {len(self.papers):,} papers "
                              f"({', '.join(map(str, self.papers['id'][:3]))}, ...); give ids of indexed papers.")
        return np.array([self.row_of_id[str(i)] for i in ids], dtype=np.int64)

    @cached_property
    def row_of_id(self) -> dict[str, int]:
        """Each paper's index row by its id as text; made on the first query by id, then kept."""
        return {str(paper_id): row for row, paper_id in enumerate(self.papers["id"])}

    def exact_vectors(self, rows: np.ndarray) -> np.ndarray:
        """The stored vectors of these rows, read from the chunk files (exact, also under IVF-PQ)."""
        return self.chunk_vectors.rows(rows)

    @cached_property
    def chunk_vectors(self) -> "StoredVectors":
        """The stored vectors, memory-mapped once (IVF-PQ's re-scoring already holds them)."""
        return self.stored or StoredVectors.open(self.folder, self.faiss_index.ntotal)

    def _nearest(self, vectors: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's best `top_k` per vector (scores, rows), IVF-PQ's candidates re-scored exactly where it keeps them."""
        if self.stored is None:
            return self.faiss_index.search(vectors, top_k)
        return self.stored.rerank(vectors, self.faiss_index.search(vectors, top_k * self.rerank)[1], top_k)

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
        chunks = [np.load(chunk_file(folder, n, ".npy"), mmap_mode="r", allow_pickle=False) for n in chunk_numbers(folder)]
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


def built_options(folder: Path, options: EncodingOptions) -> EncodingOptions:
    """The options an existing index was built with (backend, precision), for adding to it alike; `options` as they
    are where there is no index yet."""
    if not (folder / MANIFEST).exists():
        return options
    manifest = json.loads((folder / MANIFEST).read_text())
    return EncodingOptions(**(vars(options) | {"backend": manifest.get("backend", "torch"),
                                               "precision": manifest.get("precision", "fp32")}))


def query_options(options: EncodingOptions, manifest: dict) -> EncodingOptions:
    """Queries are encoded as the index was built (backend, precision, length) unless asked otherwise."""
    built = {"backend": manifest.get("backend", "torch"), "precision": manifest.get("precision", "fp32"),
             "max_seq_length": manifest["max_seq_length"]}
    given = {k: v for k, v in vars(options).items() if v is not None}
    return EncodingOptions(**(built | given))
