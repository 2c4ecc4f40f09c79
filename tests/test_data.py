import filecmp
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, needs_shared

from moebert.data.builds import SHARED_CITESEER, SHARED_SYNERGY, build_sample
from moebert.data.cocitation import BuildOptions, build_pairs, cocitation_matrix, format_summary, make_graph, write_pairs
from moebert.data.pairs import DatasetError, load_domain_dataset, parse_dataset_specs, sample_specs
from moebert.data.tables import read_table, read_table_pieces, split_name, table_format


def hand_made_graph():
    papers = pd.DataFrame(
        {
            "id": [f"P{i}" for i in range(1, 8)] + ["P8"],
            "text": [f"abstract {i}" for i in range(1, 8)] + ["  "],
            "domain": ["X"] * 6 + ["Y", "X"],
        }
    )
    citations = pd.DataFrame(
        [
            ("C1", "P1"), ("C1", "P2"), ("C1", "P3"),  # C1 (no text) co-cites 1, 2, 3
            ("C2", "P1"), ("C2", "P2"), ("C2", "P2"),  # C2 co-cites 1, 2 again; a duplicate link
            ("P4", "P5"),  # a direct citation, not a co-citation
            ("P6", "P1"), ("P6", "P7"),  # co-citation across domains X and Y
            ("P3", "P3"),  # self-citation
            ("P5", "UNKNOWN"), ("P5", "P8"),  # cited papers without text
        ],
        columns=["citing", "cited"],
    )
    return make_graph(papers, citations)


def test_cocitation_counts_on_a_hand_made_graph():
    graph = hand_made_graph()
    coo = cocitation_matrix(graph).tocoo()
    found = {(graph.paper_ids[i], graph.paper_ids[j]): int(v) for i, j, v in zip(coo.row, coo.col, coo.data)}
    assert found == {("P1", "P2"): 2, ("P1", "P3"): 1, ("P2", "P3"): 1, ("P1", "P7"): 1}
    assert graph.stats["self_citations_dropped"] == 1
    assert graph.stats["links_to_papers_without_text_dropped"] == 2
    assert graph.stats["duplicate_links_dropped"] == 1
    assert graph.stats["papers_without_text_dropped"] == 1


def test_positives_and_negatives_on_a_hand_made_graph():
    options = BuildOptions(split_fractions=(1.0, 0.0, 0.0), train_negatives=2.0, seed=3)
    tables, summary = build_pairs(hand_made_graph(), options)
    train = tables["X"]["train"].to_pandas()
    positives = train[train.label == 1]
    assert sorted(zip(positives.paper_a, positives.paper_b, positives.cocitation_count)) == [
        ("P1", "P2", 2), ("P1", "P3", 1), ("P2", "P3", 1)
    ]
    negatives = train[train.label == 0]
    assert len(negatives) == 6
    never_allowed = {("P1", "P2"), ("P1", "P3"), ("P2", "P3"), ("P4", "P5"), ("P1", "P6")}
    pairs = set(zip(negatives.paper_a, negatives.paper_b))
    assert len(pairs) == 6 and not pairs & never_allowed
    assert all(a < b for a, b in pairs) and set(negatives.cocitation_count) == {0}
    assert summary["cross_domain_pairs_left_out"] == 1
    assert "Y" not in tables and summary["domains_left_out"]["Y"] == "no co-cited pair among its 1 papers"
    assert (train.a == "abstract " + train.paper_a.str[1:]).all()


def random_graph(n_papers=600, n_citing=300, seed=0):
    rng = np.random.default_rng(seed)
    papers = pd.DataFrame(
        {"id": [f"p{i}" for i in range(n_papers)], "text": [f"text {i}" for i in range(n_papers)],
         "domain": rng.choice(["A", "B"], n_papers)}
    )
    citing = [f"c{k}" for k in range(n_citing) for _ in range(6)]
    cited = [f"p{i}" for i in rng.integers(0, n_papers, 6 * n_citing)]
    return papers, pd.DataFrame({"citing": citing, "cited": cited})


@pytest.mark.parametrize("seed", [0, 1])
def test_paper_split_shares_no_paper_and_balances_eval_splits(seed):
    tables, summary = build_pairs(make_graph(*random_graph(seed=seed)), BuildOptions(seed=seed))
    for domain, splits in tables.items():
        papers = {s: set(t["paper_a"].to_pylist()) | set(t["paper_b"].to_pylist()) for s, t in splits.items()}
        assert not papers["train"] & papers["test"]
        assert not papers["train"] & papers["valid"]
        assert not papers["valid"] & papers["test"]
        for split in ("valid", "test"):
            labels = splits[split]["label"].to_pylist()
            assert labels.count(1) == labels.count(0) > 0
        assert set(splits["train"]["label"].to_pylist()) == {1}
        stats = summary["domains"][domain]
        assert stats["valid"]["positives"] >= 0.1 * (stats["train"]["positives"] + stats["valid"]["positives"])


def test_pair_split_reproduces_the_leaky_random_split():
    tables, _ = build_pairs(make_graph(*random_graph()), BuildOptions(split_by="pair"))
    splits = tables["A"]
    train = set(splits["train"]["paper_a"].to_pylist()) | set(splits["train"]["paper_b"].to_pylist())
    test = set(splits["test"]["paper_a"].to_pylist()) | set(splits["test"]["paper_b"].to_pylist())
    assert train & test  # documented: abstracts leak across splits in this mode


def test_build_is_deterministic(tmp_path):
    graph = make_graph(*random_graph())
    for name, seed in (("one", 7), ("two", 7), ("three", 8)):
        write_pairs(*build_pairs(graph, BuildOptions(seed=seed)), tmp_path / name)
    same = filecmp.cmp(tmp_path / "one/A/test.parquet", tmp_path / "two/A/test.parquet", shallow=False)
    other = filecmp.cmp(tmp_path / "one/A/test.parquet", tmp_path / "three/A/test.parquet", shallow=False)
    assert same and not other


def test_make_graph_names_missing_columns():
    papers, citations = random_graph()
    with pytest.raises(ValueError, match=r"papers table lacks columns \['domain'\]"):
        make_graph(papers.drop(columns="domain"), citations)
    with pytest.raises(ValueError, match=r"citations table lacks columns \['cited'\]"):
        make_graph(papers, citations.rename(columns={"cited": "target"}))
    with pytest.raises(ValueError, match="paper ids occur more than once"):
        make_graph(pd.concat([papers, papers.head(1)]), citations)


def split_texts(tables: dict) -> dict:
    """{split: set of texts} over all domains."""
    return {
        split: {t for splits in tables.values() for side in ("a", "b") for t in splits[split][side].to_pylist()}
        for split in ("train", "valid", "test")
    }


def test_split_fractions_hold_on_kept_pairs_and_held_out_pairs_come_from_many_papers():
    papers, citations = random_graph(n_papers=400, n_citing=400, seed=5)  # dense: most papers are co-cited
    tables, summary = build_pairs(make_graph(papers, citations), BuildOptions(split_fractions=(0.7, 0.2, 0.1)))
    for stats in summary["domains"].values():
        kept = sum(stats[s]["positives"] for s in ("train", "valid", "test"))
        for split, share in (("train", 0.7), ("valid", 0.2), ("test", 0.1)):
            assert stats[split]["positives"] / kept == pytest.approx(share, abs=0.02), split
        # many papers, not a compact block: a held-out split holds at least half as many papers as pairs / 3
        assert stats["test"]["papers"] >= stats["test"]["positives"] / 6
    assert 0.3 < summary["kept_share"] < 1
    assert f"{summary['kept_share']:.1%} of the within-domain pairs kept" in format_summary(summary)


def test_a_dense_domain_and_an_empty_domain_are_left_out_with_one_line_each(tmp_path, capsys):
    from data.build import main

    papers, citations = random_graph(seed=2)
    dense = pd.DataFrame({"id": [f"d{i}" for i in range(12)], "text": [f"dense {i}" for i in range(12)], "domain": "D"})
    empty = pd.DataFrame({"id": [f"e{i}" for i in range(5)], "text": [f"lonely {i}" for i in range(5)], "domain": "E"})
    # one review cites all of D: every pair of D is co-cited, so valid and test can get no negative pair
    clique = pd.DataFrame({"citing": "review", "cited": dense["id"]})
    pd.concat([papers, dense, empty]).to_csv(tmp_path / "papers.csv", index=False)
    pd.concat([citations, clique]).to_csv(tmp_path / "citations.csv", index=False)
    main(["graph", "--papers", str(tmp_path / "papers.csv"), "--citations", str(tmp_path / "citations.csv"),
          "--output_dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if line.startswith("Domain D left out: ")]) == 1
    assert "Traceback" not in out
    assert "Domain E left out: no co-cited pair among its 5 papers." in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == ["A", "B"]
    assert load_domain_dataset(str(tmp_path / "out" / "B"))["test"].num_rows > 0


@pytest.mark.parametrize("suffix", [".csv.gz", ".tsv.gz", ".jsonl.gz", ".csv.bz2", ".parquet"])
def test_tables_are_read_as_shipped_also_compressed(tmp_path, suffix):
    papers, _ = random_graph(n_papers=20)
    path = tmp_path / f"papers{suffix}"
    if ".jsonl" in suffix:
        papers.to_json(path, orient="records", lines=True)
    elif ".parquet" in suffix:
        papers.to_parquet(path)
    else:
        papers.to_csv(path, sep="\t" if ".tsv" in suffix else ",", index=False)
    pd.testing.assert_frame_equal(read_table(path), papers)


def write_table(frame: pd.DataFrame, path):
    if ".jsonl" in path.name:
        frame.to_json(path, orient="records", lines=True)
    elif ".parquet" in path.name:
        frame.to_parquet(path)
    else:
        frame.to_csv(path, sep="\t" if ".tsv" in path.name else ",", index=False)


@pytest.mark.parametrize("suffix", [".csv.gz", ".tsv", ".jsonl.xz", ".parquet"])
def test_a_table_read_in_pieces_gives_the_rows_read_whole_in_their_order(tmp_path, suffix):
    papers, _ = random_graph(n_papers=20)
    write_table(papers, tmp_path / f"papers{suffix}")
    pieces = list(read_table_pieces(tmp_path / f"papers{suffix}", 7))
    assert [len(p) for p in pieces] == [7, 7, 6]
    pd.testing.assert_frame_equal(pd.concat(pieces, ignore_index=True), read_table(tmp_path / f"papers{suffix}"))


@pytest.mark.parametrize("suffix", [".csv.gz", ".tsv", ".jsonl", ".parquet"])
def test_pair_datasets_load_from_split_files_in_any_table_format(tmp_path, suffix):
    pairs = pd.DataFrame({"a": ["x one", "y two"], "b": ["p three", "q four"], "label": [1, 0]})
    (tmp_path / "CVD").mkdir()
    for split in ("train", "valid", "test"):
        write_table(pairs, tmp_path / "CVD" / f"{split}{suffix}")
    loaded = load_domain_dataset(str(tmp_path / "CVD"))
    assert {s: (d["a"], d["label"]) for s, d in loaded.items()} == {s: (["x one", "y two"], [1, 0]) for s in loaded}
    assert list(loaded) == ["train", "valid", "test"]


def test_table_formats_come_from_the_file_name():
    assert split_name("train.csv.gz") == ("train", ".csv", ".gz") and split_name("a.b.jsonl") == ("a.b", ".jsonl", None)
    assert split_name("papers.parquet.gz")[1] is None and split_name("notes.txt")[1] is None
    assert table_format("x.tsv.zst") == ".tsv"


def test_an_unsupported_table_format_is_named():
    with pytest.raises(ValueError, match=r"unsupported table format '\.xlsx'; use \.csv"):
        read_table("papers.xlsx")
    with pytest.raises(ValueError, match=r"unsupported table format '\.parquet\.gz'"):
        list(read_table_pieces("papers.parquet.gz", 10))


def test_identical_texts_under_two_ids_are_merged_before_splitting():
    papers, citations = random_graph(seed=4)
    # each of 40 papers gets a twin: the same abstract (other whitespace) under another id, cited on its own
    twins = papers.head(40).assign(id=lambda f: f["id"] + "-twin", text=lambda f: "  " + f["text"].str.replace(" ", "   "))
    twin_links = pd.DataFrame({"citing": [f"t{k // 3}" for k in range(120)], "cited": list(twins["id"]) * 3})
    graph = make_graph(pd.concat([papers, twins]), pd.concat([citations, twin_links]))
    assert graph.stats["duplicate_texts_merged"] == 40 and len(graph.paper_ids) == len(papers)
    assert not any(i.endswith("-twin") for i in graph.paper_ids)
    # the twins' citations now count for the kept paper
    assert graph.stats["citing_papers"] == citations["citing"].nunique() + 40
    texts = split_texts(build_pairs(graph, BuildOptions(seed=4))[0])
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["valid"] and not texts["valid"] & texts["test"]


def test_summary_and_card_record_paths_as_typed_never_absolute(tmp_path, monkeypatch):
    from data.build import main

    papers, citations = random_graph()
    papers.to_csv(tmp_path / "papers.csv", index=False)
    citations.to_csv(tmp_path / "citations.csv.gz", index=False)
    monkeypatch.chdir(tmp_path)
    main(["graph", "--papers", str(tmp_path / "papers.csv"), "--citations", "citations.csv.gz", "--output_dir", "out"])
    summary = (tmp_path / "out" / "summary.json").read_text()
    assert str(tmp_path) not in summary
    assert '"papers": "papers.csv"' in summary and '"citations": "citations.csv.gz"' in summary


def test_embedded_default_rebuilds_byte_for_byte(tmp_path):
    needs_shared(SHARED_SYNERGY)
    summary = build_sample("synergy", SHARED_SYNERGY, tmp_path, BuildOptions())
    committed = ROOT / "data" / "synergy"
    files = sorted(p.relative_to(committed) for p in committed.rglob("*") if p.is_file())
    assert len(files) == 3 * len(summary["domains"]) + 2 and len(summary["domains"]) >= 8
    for name in files:
        assert (tmp_path / name).read_bytes() == (committed / name).read_bytes(), name
    assert list(summary["domains_left_out"]) == ["Menon_2022"]


def test_no_text_of_valid_or_test_occurs_in_train_of_the_embedded_default():
    datasets = {d: load_domain_dataset(source, domain=d) for d, source in sample_specs().items()}
    tables = {d: {s: ds[s].data.table for s in ds} for d, ds in datasets.items()}
    texts = split_texts(tables)
    assert not texts["train"] & texts["valid"] and not texts["train"] & texts["test"] and not texts["valid"] & texts["test"]


def test_citeseer_duplicate_abstracts_no_longer_leak(tmp_path):
    needs_shared(SHARED_CITESEER)
    summary = build_sample("citeseer", SHARED_CITESEER, tmp_path, BuildOptions())
    assert sorted(summary["domains"]) == ["AI", "Agents", "DB", "HCI", "IR", "ML"]
    assert summary["graph"]["duplicate_texts_merged"] >= 2  # DB 40513 / AI 28223, AI 95810 / Agents suryadi99learning
    tables = {d: {s: pq.read_table(tmp_path / d / f"{s}.parquet") for s in ("train", "valid", "test")}
              for d in summary["domains"]}
    texts = split_texts(tables)
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["valid"]


@pytest.mark.parametrize("required", ["", "1"])
def test_a_missing_shared_input_fails_where_shared_is_required(tmp_path, monkeypatch, required):
    monkeypatch.setenv("MOEBERT_REQUIRE_SHARED", required)
    with pytest.raises((pytest.fail.Exception, pytest.skip.Exception)) as outcome:
        needs_shared(tmp_path / "no-such-input")
    assert outcome.type is (pytest.fail.Exception if required else pytest.skip.Exception)


@pytest.mark.parametrize("command", ["synergy", "graph"])
def test_a_missing_input_of_a_build_is_named_in_one_line(tmp_path, capsys, command):
    from data.build import main

    missing = tmp_path / "nowhere"
    argv = ([command, "--source", str(missing), "--output_dir", str(tmp_path / "out")] if command == "synergy" else
            [command, "--papers", str(missing / "papers.csv"), "--citations", str(missing / "c.csv"), "--output_dir",
             str(tmp_path / "out")])
    with pytest.raises(SystemExit):
        main(argv)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    hint = " (../shared is not beside this checkout: pass --source DIR)" if command == "synergy" else ""
    assert last.endswith(f"{missing}/papers{'.csv.gz' if command == 'synergy' else '.csv'}: no such file{hint}")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ loading


def test_sample_loads_with_all_splits():
    specs = parse_dataset_specs(None)
    assert specs == sample_specs() and len(specs) == 9 and "Jeyaraman_2020" in specs
    dataset = load_domain_dataset(specs["Chou_2004"], domain="Chou_2004")
    assert set(dataset) == {"train", "valid", "test"}
    assert {"a", "b", "label"} <= set(dataset["test"].column_names)


def _write_splits(folder: Path, frames: dict, suffix=".csv"):
    folder.mkdir(parents=True, exist_ok=True)
    for split, frame in frames.items():
        if suffix == ".csv":
            frame.to_csv(folder / f"{split}.csv", index=False)
        else:
            frame.to_json(folder / f"{split}.jsonl", orient="records", lines=True)


GOOD = pd.DataFrame({"a": ["x one", "y two"], "b": ["x three", "z four"], "label": [1, 0]})


def test_loader_reads_csv_jsonl_and_saved_folders(tmp_path):
    _write_splits(tmp_path / "csv", {s: GOOD for s in ("train", "valid", "test")})
    _write_splits(tmp_path / "jsonl", {s: GOOD for s in ("train", "valid", "test")}, suffix=".jsonl")
    for folder in ("csv", "jsonl"):
        dataset = load_domain_dataset(str(tmp_path / folder))
        assert dataset["valid"]["label"] == [1, 0]
    dataset.save_to_disk(str(tmp_path / "saved"))
    assert load_domain_dataset(str(tmp_path / "saved"))["train"]["a"] == ["x one", "y two"]


@pytest.mark.parametrize(
    "frames, message",
    [
        ({"train": GOOD, "valid": GOOD}, r"lacks splits \['test'\]; it has \['train', 'valid'\]"),
        ({"train": GOOD, "valid": GOOD, "test": GOOD.drop(columns="label")}, r"split 'test', lacks columns \['label'\]"),
        ({"train": GOOD.assign(label=[1, 2]), "valid": GOOD, "test": GOOD}, r"label must be 0 or 1, found \[2\]"),
        ({"train": GOOD.assign(b=["ok", " "]), "valid": GOOD, "test": GOOD}, r"1 rows have an empty or missing 'b' text"),
    ],
)
def test_loader_names_what_is_wrong(tmp_path, frames, message):
    _write_splits(tmp_path, frames)
    with pytest.raises(DatasetError, match=message):
        load_domain_dataset(str(tmp_path), domain="CVD")


def test_loader_errors_for_bad_specs_and_unreachable_sources(tmp_path):
    with pytest.raises(DatasetError, match="write DOMAIN=SOURCE"):
        parse_dataset_specs(["CVD"])
    with pytest.raises(DatasetError, match="names domain 'CVD' twice"):
        parse_dataset_specs(["CVD=a", "CVD=b"])
    with pytest.raises(DatasetError, match="could not be loaded from the Hub"):
        load_domain_dataset("nobody/no_such_dataset_offline")
    with pytest.raises(DatasetError, match="no split files found"):
        load_domain_dataset(str(tmp_path))


def test_build_command_writes_pairs_and_summary_from_tables(tmp_path, capsys):
    from data.build import main
    from moebert.data.builds import dataset_card

    papers, citations = random_graph()
    papers.to_parquet(tmp_path / "papers.parquet")
    citations.to_csv(tmp_path / "citations.csv", index=False)
    main(["graph", "--papers", str(tmp_path / "papers.parquet"), "--citations", str(tmp_path / "citations.csv"),
          "--output_dir", str(tmp_path / "out"), "--train_negatives", "1"])
    assert "| A |" in capsys.readouterr().out
    dataset = load_domain_dataset(str(tmp_path / "out" / "A"))
    assert set(dataset["train"]["label"]) == {0, 1}
    import json

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["options"]["split_by"] == "paper"
    card = dataset_card(summary, "org/pairs")
    assert "no abstract shared between splits" in card and "| B |" in card


def test_push_to_hub_uploads_the_card_then_one_config_per_domain(tmp_path, monkeypatch):
    from unittest import mock

    import datasets
    import huggingface_hub

    from moebert.data.builds import push_to_hub

    tables, summary = build_pairs(make_graph(*random_graph()), BuildOptions())
    write_pairs(tables, summary, tmp_path)
    api = mock.MagicMock()
    pushed = []
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: api)
    monkeypatch.setattr(
        datasets.DatasetDict, "push_to_hub", lambda self, repo, config_name, token: pushed.append((repo, config_name, dict(self.num_rows)))
    )
    summary = {"source": {"kind": "graph"}} | summary
    push_to_hub(tmp_path, summary, "org/pairs", private=True, token="t")
    api.create_repo.assert_called_once_with("org/pairs", repo_type="dataset", private=True, exist_ok=True)
    card = api.upload_file.call_args.kwargs
    assert card["path_in_repo"] == "README.md" and b"Split policy: `paper`" in card["path_or_fileobj"]
    assert [(repo, config) for repo, config, _ in pushed] == [("org/pairs", "A"), ("org/pairs", "B")]
    assert pushed[0][2] == {s: summary["domains"]["A"][s]["pairs"] for s in ("train", "valid", "test")}


def test_hub_source_with_a_config_loads_that_config(monkeypatch):
    import datasets

    import moebert.data.pairs

    calls = []

    def fake_load_dataset(name, config=None):
        calls.append((name, config))
        return datasets.DatasetDict({s: datasets.Dataset.from_pandas(GOOD) for s in ("train", "valid", "test")})

    monkeypatch.setattr(moebert.data.pairs, "load_dataset", fake_load_dataset)
    load_domain_dataset("org/pairs:IR")
    load_domain_dataset("GleghornLab/abstract_domain_cvd")
    assert calls == [("org/pairs", "IR"), ("GleghornLab/abstract_domain_cvd", None)]
