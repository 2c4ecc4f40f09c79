"""Building pair datasets: from a citation graph, from PubMed, and the embedded samples from ../shared, each with
its dataset card; what `python -m data.build` runs."""

from pathlib import Path

import pandas as pd

from moebert.data.cocitation import BuildOptions, build_pairs, format_summary, make_graph, write_pairs
from moebert.data.tables import read_table


SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"  # ../shared beside the checkout
SHARED_CITESEER = SHARED_DATA / "citeseer"
SHARED_SYNERGY = SHARED_DATA / "synergy"


def read_citeseer(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """CiteSeer with text: three lines per paper (id, title + abstract, label); `<cited> <citing>` per link."""
    lines = (folder / "citeseer_texts.txt").read_text(encoding="utf-8").split("\n")
    lines = lines[: len(lines) - len(lines) % 3]
    papers = pd.DataFrame({"id": lines[0::3], "text": lines[1::3], "domain": lines[2::3]})
    links = pd.read_csv(folder / "citeseer.cites", sep=r"\s+", header=None, names=["cited", "citing"], dtype=str)
    return papers, links


def build_and_write(papers, citations, options: BuildOptions, output_dir: Path, provenance: dict) -> dict:
    tables, summary = build_pairs(make_graph(papers, citations), options)
    summary = {"source": provenance} | summary
    write_pairs(tables, summary, output_dir)
    return summary


SAMPLE_README = """# {title}

Pairs of abstracts labelled co-cited (1: both cited by a third paper of the collection) or not (0), one folder
per domain. Files: `<DOMAIN>/{{train,valid,test}}.parquet` with columns `a`, `b`, `label`, `domain`, `paper_a`,
`paper_b`, `cocitation_count`; `summary.json` holds the statistics below.

{source}

Built with `python -m data.build {command}`, which rebuilds these files byte for byte from
`../shared/data/{command}`: split by paper, so no abstract of `test` or `valid` occurs in `train` (papers with the
same text are merged first); `valid` and `test` are random papers of the domain, chosen until each holds its share
of the kept co-cited pairs; co-cited pairs across domains and pairs straddling two splits are left out; `valid` and
`test` are balanced with random never-co-cited, non-citing pairs of the same split; `train` holds positives only
(negatives come from the batch); seed {seed}.

{table}
"""

SYNERGY_SOURCE = """The default dataset of `train.py` and `eval.py`. Source: SYNERGY (De Bruin, Ma, Ferdinands, Teijema & van de
Schoot, "SYNERGY - Open machine learning dataset on study selection in systematic reviews", DataverseNL 2023,
doi:10.34894/HE6NAQ), released under CC0 1.0; its records are OpenAlex metadata (CC0). Each domain is one
systematic review (all its screened candidate papers): Chou_2004 skeletal muscle relaxants, Donners_2021
emicizumab in haemophilia A, Jeyaraman_2020 mesenchymal stem cells for knee cartilage, Meijboom_2021 switching
back from biosimilar TNF inhibitors, Muthu_2022 cellular therapy for rotator cuff tears, Nelson_2002 hormone
replacement therapy, Oud_2018 psychotherapies for borderline personality disorder, Sep_2021 the rodent
object-in-context task, van_der_Valk_2021 hair cortisol and body weight. Text: title + abstract (rebuilt from
OpenAlex's inverted index); citations: OpenAlex `referenced_works` within the collection."""

CITESEER_SOURCE = """Computer-science abstracts, one domain per subject label. Source: the CiteSeer collection of the LINQS group
(Sen et al., "Collective classification in network data", AI Magazine 2008), in the text-attributed version
distributed with the TAPE project (He et al., 2023): 3,186 papers with title + abstract, 6 subject labels, 4,732
citation links. The collection states no separate data licence; cite both works when you use these pairs."""


def build_sample(command: str, source: Path, output_dir: Path, options: BuildOptions) -> dict:
    """Build a sample from the shared files and write its README (the dataset card)."""
    if command == "synergy":
        papers = read_table(source / "papers.csv.gz")
        links = read_table(source / "citations.csv.gz")
        files, title, text = "papers.csv.gz, citations.csv.gz", "SYNERGY co-citation pairs (embedded default)", SYNERGY_SOURCE
    else:
        papers, links = read_citeseer(source)
        files, title, text = "citeseer_texts.txt, citeseer.cites", "CiteSeer co-citation pairs", CITESEER_SOURCE
    summary = build_and_write(papers, links, options, output_dir, {"kind": command, "files": files})
    readme = SAMPLE_README.format(title=title, source=text, command=command, seed=options.seed, table=format_summary(summary))
    (output_dir / "README.md").write_text(readme)
    return summary


def build_pubmed(client, domain: str, query: str, max_papers: int | None, options: BuildOptions,
                 output_dir: Path) -> dict:
    """One domain's pairs from the PubMed papers of `query` (moebert.data.pubmed.PubMedClient)."""
    from moebert.data.pubmed import fetch_domain

    papers, citations = fetch_domain(client, domain, query, max_papers=max_papers)
    provenance = {"kind": "pubmed", "domain": domain, "query": query, "max_papers": max_papers}
    return build_and_write(papers, citations, options, output_dir, provenance)


def push_to_hub(output_dir: Path, summary: dict, repo_id: str, private: bool, token: str | None) -> str:
    """Push every domain as a config of one Hub dataset, with its card; returns the dataset's address."""
    from datasets import load_dataset
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_file(
        path_or_fileobj=dataset_card(summary, repo_id).encode(),
        path_in_repo="README.md",
        repo_id=repo_id,
        repo_type="dataset",
    )
    for domain in summary["domains"]:
        files = {s: str(output_dir / domain / f"{s}.parquet") for s in ("train", "valid", "test")}
        load_dataset("parquet", data_files=files).push_to_hub(repo_id, config_name=domain, token=token)
    return f"{api.endpoint}/datasets/{repo_id}"


def dataset_card(summary: dict, repo_id: str) -> str:
    source = summary["source"]
    query = f"PubMed query: `{source['query']}`" if source.get("kind") == "pubmed" else f"Source: {source}"
    options = summary["options"]
    return f"""---
license: other
task_categories:
- sentence-similarity
tags:
- co-citation
- moebert
---
# {repo_id}

Pairs of abstracts labelled co-cited (1: both cited by a third paper) or not (0), built with MoEBERT's
`data/build.py`. Load one domain with `datasets.load_dataset("{repo_id}", "<DOMAIN>")`.

{query}

Split policy: `{options['split_by']}` ({'no abstract shared between splits' if options['split_by'] == 'paper' else
'random pair split: abstracts may occur in several splits'}); `valid`/`test` balanced 50/50; train negatives per
positive: {options['train_negatives']}; seed {options['seed']}.

{format_summary(summary)}

Licence: the abstracts keep their publishers' terms (PubMed abstracts are not all openly licensed; check them before
redistribution). The pairing itself is released with no further restriction.
"""
