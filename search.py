"""Semantic search over a paper collection, each paper embedded by its own domain's expert.

    python search.py index                                  # the SYNERGY papers shipped in data/, with
                                                            # outputs/moebert (or the untrained embedded model)
    python search.py query --text "Baclofen for spasticity after stroke" [--domain Chou_2004] [--top_k 10] [--json]
    python search.py index --papers papers.csv.gz --model ORG/MOEBERT --output_dir my_index [--add] [--backend onnx]
    accelerate launch search.py index --papers pubmed.parquet --model ORG/MOEBERT --output_dir my_index  # N GPUs
    python search.py query --index my_index --queries questions.txt
    python search.py query --id 10.1001/jama.2013.4 --id 10.1056/nejmoa0803399   # papers like these (ids indexed)

A collection is a table with columns `id`, `text`, `domain`, read in pieces (moebert.search.collection); `index` writes a
resumable index into `--output_dir` (moebert.search.index says what it holds), with any number of processes and
machines under `accelerate launch` (each process encodes its share of the chunks); `query` embeds the query with the
index's own model, through the expert of `--domain` or, without it, of the predicted domain; `query --id` ranks the
collection by how likely each paper is to be co-cited with the given papers (from their stored vectors: nothing is
embedded again).

From Python:

    from moebert.search.index import PaperIndex
    index = PaperIndex.load("search_index")
    hits = index.search(["Baclofen for spasticity after stroke"], top_k=5)   # domain predicted
    like = index.similar_to(["10.1001/jama.2013.4"], top_k=5)                  # papers like these
"""

import time

STARTED = time.perf_counter()  # before the imports below, which are part of what a user waits for

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
from pathlib import Path  # noqa: E402

from moebert.data.tables import TableError, read_table
from moebert.encoders.export.manifest import ExportError
from moebert.encoders.options import EncodingOptions, add_encoding_arguments, serving_options
from moebert.logs import show_logs
from moebert.names import DEFAULT_OUTPUT_DIR
from moebert.search.index import (DEFAULT_INDEX_DIR, IVFPQ_ABOVE, IndexSettings, PaperIndex, SearchError, build_index,
                                  built_options)

logger = logging.getLogger("moebert.search")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="embed a collection into a FAISS index")
    index.add_argument("--papers", default=None, help="table or dataset with id, text, domain (default: shipped SYNERGY)")
    index.add_argument("--model", default=None, help=f"MoE-BERT folder or Hub id (default: {DEFAULT_OUTPUT_DIR} if "
                       "trained, else the embedded base upcycled into the SYNERGY domains)")
    index.add_argument("--output_dir", default=str(DEFAULT_INDEX_DIR))
    index.add_argument("--add", action="store_true", help="append these papers to the index in --output_dir")
    defaults = IndexSettings()
    index.add_argument("--index_type", default=defaults.index_type, choices=["auto", "flat", "ivfpq"], help="auto: "
                       f"flat up to {IVFPQ_ABOVE:,} papers, IVF-PQ above (compressed codes in memory, candidates "
                       "re-scored from the stored vectors)")
    index.add_argument("--nlist", type=int, default=defaults.nlist, help="ivfpq: inverted lists")
    index.add_argument("--pq_m", type=int, default=defaults.pq_m, help="ivfpq: bytes per vector (divides the dimension)")
    index.add_argument("--train_size", type=int, default=defaults.train_size, help="ivfpq: vectors to train the "
                       "quantizer on")
    index.add_argument("--chunk_size", type=int, default=defaults.chunk_size, help="papers per chunk written (the unit "
                       "of resume and of the processes' shares)")
    index.add_argument("--classifier_sample", type=int, default=defaults.classifier_sample, help="papers the domain "
                       "classifier is fitted on, drawn from the whole collection")
    add_encoding_arguments(index, default="on a CPU onnx (int8, exported once and cached), on a GPU torch with bf16 "
                           "where native; with --add, as the index was built")
    query = commands.add_parser("query", help="search an index")
    query.add_argument("--index", default=str(DEFAULT_INDEX_DIR))
    query.add_argument("--text", action="append", help="a query, repeatable")
    query.add_argument("--queries", help="a .txt file (one query per line) or a table with a text column")
    query.add_argument("--id", action="append", dest="ids", help="an indexed paper's id, repeatable: papers likely to "
                       "be co-cited with these, the given ones left out (instead of --text)")
    query.add_argument("--domain", default=None, help="the queries' domain (default: predicted per query)")
    query.add_argument("--top_k", type=int, default=10)
    query.add_argument("--nprobe", type=int, default=64, help="ivfpq: lists searched per query")
    query.add_argument("--rerank", type=int, default=10, help="ivfpq: top_k * rerank candidates re-scored exactly "
                       "from the stored vectors (0: compressed scores, no disk reads)")
    query.add_argument("--model", default=None, help="default: the model the index was built with")
    query.add_argument("--json", action="store_true", help="one JSON object per query")
    add_encoding_arguments(query, default="as the index was built")
    args = parser.parse_args(argv)
    if args.command == "query":
        try:
            args.texts = (args.text or []) + (read_queries(args.queries) if args.queries else [])
        except TableError as error:
            parser.error(str(error))
        if bool(args.texts) == bool(args.ids):
            parser.error("query needs --text or --queries, or --id (papers like these), and not both")
    return args


def read_queries(path: str) -> list[str]:
    """One query per line of a text file, or the `text` column of a table."""
    if Path(path).suffix == ".txt":
        return [line.strip() for line in open(path) if line.strip()]
    return read_table(path)["text"].astype(str).tolist()


def print_similar(result: dict, as_json: bool):
    if as_json:
        print(json.dumps(result, default=str))
        return
    print(f"papers like: {', '.join(map(str, result['ids']))}")
    for rank, hit in enumerate(result["hits"], 1):
        chance = "" if hit["probability"] is None else f"  P(co-cited) {hit['probability']:.2f}"
        print(f"  {rank:>3}. {hit['score']:.4f}{chance}  {hit['id']}  {hit['domain']}  (closest to {hit['closest']})")


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


def stage_clock():
    """`on_stage(name)`: logs the seconds of each stage as it ends, the first counted from the process's start (the
    imports included): where the whole command's time goes."""
    last = [STARTED]

    def on_stage(stage: str):
        now = time.perf_counter()
        logger.info(f"{now - last[0]:7.1f} s  {stage}")
        last[0] = now

    return on_stage


def index_command(args, options: EncodingOptions) -> dict:
    """Build (or add to) an index on the serving backend, saying which and why first, and timing each stage."""
    if args.add and options.backend is None and options.precision is None:
        options, why = built_options(Path(args.output_dir), options), "--add: as the index was built"
    else:
        options, why = serving_options(options)
    print(f"backend {options.runtime} ({'int8' if options.runtime != 'torch' else options.dtype}): {why}", flush=True)
    settings = IndexSettings(args.index_type, args.nlist, args.pq_m, args.train_size, args.chunk_size,
                             args.classifier_sample)
    clock = stage_clock()
    manifest = build_index(args.papers, Path(args.output_dir), args.model, options, settings, args.add, on_stage=clock)
    clock("the rest (manifest written)")
    logger.info(f"{time.perf_counter() - STARTED:7.1f} s  the whole command")
    return manifest


def main(argv=None):
    show_logs()
    args = parse_args(argv)
    options = EncodingOptions.from_args(args)
    try:
        if args.command == "index":
            return index_command(args, options)
        index = PaperIndex.load(args.index, args.model, options, args.nprobe, args.rerank)
        logger.info(f"backend {args.backend or index.manifest.get('backend', 'torch')}: "
                    + ("as given" if args.backend else "as the index was built"))
        if args.ids:
            result = index.similar_to(args.ids, args.top_k)
            print_similar(result, args.json)
            return result
        results = index.search(args.texts, args.domain, args.top_k)
        print_results(args.texts, results, args.json)
        return results
    except (SearchError, ExportError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
