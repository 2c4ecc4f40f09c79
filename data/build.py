"""Build co-citation pair datasets.

    # from a local citation graph: papers (id, text, domain) and citations (citing, cited), csv/tsv/jsonl/parquet,
    # the text formats also compressed (papers.csv.gz)
    python -m data.build graph --papers papers.csv.gz --citations citations.csv.gz --output_dir my_pairs

    # from PubMed (needs internet): one domain per query
    python -m data.build pubmed --domain CVD --query '"cardiovascular diseases"[MeSH] AND 2015:2024[dp]' \
        --output_dir cvd_pairs --cache_dir .pubmed_cache [--api_key KEY]

    # the embedded default, byte for byte, from ../shared/data/synergy (SYNERGY, CC0)
    python -m data.build synergy

    # CiteSeer (computer science) from ../shared/data/citeseer
    python -m data.build citeseer --output_dir data/citeseer

Each writes `<output_dir>/<DOMAIN>/{train,valid,test}.parquet` and `summary.json`, and prints the summary. A domain
that cannot give usable splits (no co-cited pair, or too few never-co-cited pairs for balanced negatives) is left
out with one line saying why; the others are built.
`--push_to_hub ORG/NAME` also publishes the pairs with a dataset card (one config per domain).
"""

import argparse
import json
from pathlib import Path

from moebert.data.builds import SHARED_CITESEER, SHARED_SYNERGY, build_and_write, build_pubmed, build_sample, push_to_hub
from moebert.data.cocitation import BuildOptions, format_summary
from moebert.data.pairs import SAMPLE_DIR
from moebert.data.pubmed import PubMedClient
from moebert.data.tables import read_table
from moebert.logs import show_logs
from moebert.names import public_name


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    graph = commands.add_parser("graph", help="from local papers and citations tables")
    graph.add_argument("--papers", required=True, help="table with columns id, text, domain")
    graph.add_argument("--citations", required=True, help="table with columns citing, cited")
    pubmed = commands.add_parser("pubmed", help="fetch one domain from PubMed E-utilities")
    pubmed.add_argument("--domain", required=True)
    pubmed.add_argument("--query", required=True, help="esearch term, e.g. MeSH term, date range, free full text")
    pubmed.add_argument("--max_papers", type=int, default=None)
    pubmed.add_argument("--cache_dir", type=Path, default=Path(".pubmed_cache"))
    pubmed.add_argument("--api_key", default=None, help="NCBI API key: 10 requests/s instead of 3")
    pubmed.add_argument("--email", default=None)
    pubmed.add_argument("--base_url", default="https://eutils.ncbi.nlm.nih.gov/entrez/eutils/")
    synergy = commands.add_parser("synergy", help="rebuild the embedded default from ../shared/data/synergy")
    synergy.add_argument("--source", type=Path, default=SHARED_SYNERGY)
    citeseer = commands.add_parser("citeseer", help="CiteSeer pairs from ../shared/data/citeseer")
    citeseer.add_argument("--source", type=Path, default=SHARED_CITESEER)
    for sub in (graph, pubmed, synergy, citeseer):
        sub.add_argument("--output_dir", type=Path, default=SAMPLE_DIR if sub is synergy else None, required=sub is not synergy)
        sub.add_argument("--split_by", choices=["paper", "pair"], default="paper")
        sub.add_argument("--split_fractions", default="0.8,0.1,0.1", help="train,valid,test share of co-cited pairs")
        sub.add_argument("--train_negatives", type=float, default=0.0, help="negatives per positive in train")
        sub.add_argument("--seed", type=int, default=42)
        sub.add_argument("--push_to_hub", metavar="ORG/NAME", default=None)
        sub.add_argument("--hub_private_repo", action="store_true")
        sub.add_argument("--hub_token", default=None)
    args = parser.parse_args(argv)
    args.parser = parser
    return args


SAMPLES = ("synergy", "citeseer")  # the samples rebuilt from ../shared


def build(args, options: BuildOptions) -> dict:
    if args.command == "graph":
        provenance = {"kind": "graph", "papers": public_name(args.papers), "citations": public_name(args.citations)}
        return build_and_write(read_table(args.papers), read_table(args.citations), options, args.output_dir, provenance)
    if args.command == "pubmed":
        client = PubMedClient(cache_dir=args.cache_dir, api_key=args.api_key, base_url=args.base_url, email=args.email)
        return build_pubmed(client, args.domain, args.query, args.max_papers, options, args.output_dir)
    return build_sample(args.command, args.source, args.output_dir, options)


def main(argv=None):
    show_logs()
    args = parse_args(argv)
    try:
        options = BuildOptions(
            split_by=args.split_by,
            split_fractions=tuple(float(x) for x in args.split_fractions.split(",")),
            train_negatives=args.train_negatives,
            seed=args.seed,
        )
        summary = build(args, options)
    except ValueError as error:  # bad input: one line that names it, no stack trace
        args.parser.error(str(error))
    except FileNotFoundError as error:  # a table, or ../shared, that is not there
        where = " (../shared is not beside this checkout: pass --source DIR)" if args.command in SAMPLES else ""
        args.parser.error(f"{error.filename}: no such file{where}")
    print(f"{format_summary(summary)}\n\nwritten to {args.output_dir}/")
    if args.push_to_hub:
        address = push_to_hub(args.output_dir, json.loads(json.dumps(summary, default=str)), args.push_to_hub,
                              args.hub_private_repo, args.hub_token)
        print(f"pushed to {address}")


if __name__ == "__main__":
    main()
