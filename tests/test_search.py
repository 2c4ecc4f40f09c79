import json

import numpy as np
import pandas as pd
import pytest

from conftest import HEART, LUNG, collection, requires_faiss

from modeling_moebert import MoEBertModel
from moebert.data.pairs import SAMPLE_DIR
from moebert.data.pairs import sample_papers
from moebert.search import index as search_index
from moebert.search.domain_classifier import DomainClassifier, domain_vectorizer, held_out_accuracy
import search


def run_index(papers_file, model, out, *extra):
    return search.main(["index", "--papers", str(papers_file), "--model", model, "--output_dir", str(out),
                        "--max_seq_length", "32", "--device", "cpu", "--precision", "fp32", *extra])


def run_query(out, *extra):
    return search.main(["query", "--index", str(out), "--max_seq_length", "32", "--device", "cpu", *extra])


@requires_faiss
def test_index_then_query_finds_each_paper_itself_with_and_without_a_domain(moe_folder, tmp_path, capsys):
    papers = collection(12)
    papers.to_csv(tmp_path / "papers.csv.gz", index=False)  # compressed, as shipped
    manifest = run_index(tmp_path / "papers.csv.gz", moe_folder, tmp_path / "index", "--chunk_size", "5")
    assert manifest["papers"] == 24 and manifest["domains"] == ["CVD", "COPD"] and manifest["normalized"]
    assert len(list((tmp_path / "index" / "chunks").glob("*.npy"))) == 5
    for _, paper in papers.iloc[[0, 5, 13, 20]].iterrows():
        for domain in (["--domain", paper["domain"]], []):
            [result] = run_query(tmp_path / "index", "--text", paper["text"], "--top_k", "3", *domain)
            assert result["hits"][0]["id"] == paper["id"] and result["hits"][0]["score"] == pytest.approx(1, abs=1e-5)
            assert result["domain"] == paper["domain"]
    capsys.readouterr()
    run_query(tmp_path / "index", "--text", papers["text"][0], "--json", "--top_k", "2")
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["hits"][0]["id"] == "CVD-0" and len(printed["hits"]) == 2 and printed["domain_probability"] > 0.5


@requires_faiss
def test_the_same_text_in_another_domain_is_embedded_by_that_domains_expert(moe_folder, tmp_path):
    papers = collection(3)
    papers.loc[len(papers)] = {"id": "twin", "text": papers["text"][0], "domain": "COPD"}
    papers.to_json(tmp_path / "papers.jsonl", orient="records", lines=True)
    run_index(tmp_path / "papers.jsonl", moe_folder, tmp_path / "index")
    [result] = run_query(tmp_path / "index", "--text", papers["text"][0], "--domain", "COPD", "--top_k", "1")
    assert result["hits"][0]["id"] == "twin"


@requires_faiss
def test_an_interrupted_index_resumes_from_its_chunks(moe_folder, tmp_path, monkeypatch):
    collection(10).to_csv(tmp_path / "papers.csv", index=False)
    embed, calls = search_index.embed, []

    def embed_then_fail(encoder, texts, domains):
        calls.append(len(texts))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return embed(encoder, texts, domains)

    monkeypatch.setattr(search_index, "embed", embed_then_fail)
    with pytest.raises(KeyboardInterrupt):
        run_index(tmp_path / "papers.csv", moe_folder, tmp_path / "index", "--chunk_size", "4")
    assert len(list((tmp_path / "index" / "chunks").glob("*.parquet"))) == 2
    monkeypatch.setattr(search_index, "embed", lambda *a: (calls.append(len(a[1])), embed(*a))[1])
    manifest = run_index(tmp_path / "papers.csv", moe_folder, tmp_path / "index", "--chunk_size", "4")
    assert calls[3:] == [4, 4, 4] and manifest["papers"] == 20  # 12 papers left, not 20
    assert search_index.PaperIndex.load(tmp_path / "index").papers["id"].tolist() == collection(10)["id"].tolist()


@requires_faiss
def test_add_appends_papers_and_a_rerun_without_add_refuses_another_collection(moe_folder, tmp_path):
    collection(6).to_csv(tmp_path / "first.csv", index=False)
    more = collection(3, start=100)
    more.to_csv(tmp_path / "more.csv", index=False)
    run_index(tmp_path / "first.csv", moe_folder, tmp_path / "index")
    with pytest.raises(SystemExit, match="pass --add"):
        run_index(tmp_path / "more.csv", moe_folder, tmp_path / "index")
    manifest = run_index(tmp_path / "more.csv", moe_folder, tmp_path / "index", "--add")
    assert manifest["papers"] == 18
    [result] = run_query(tmp_path / "index", "--text", more["text"][4], "--top_k", "1")
    assert result["hits"][0]["id"] == more["id"][4]
    again = run_index(tmp_path / "more.csv", moe_folder, tmp_path / "index", "--add")  # nothing new: no duplicates
    assert again["papers"] == 18


@requires_faiss
def test_a_wrong_model_or_an_unknown_domain_is_refused_in_one_line(moe_folder, tiny_bert, tmp_path):
    collection(4).to_csv(tmp_path / "papers.csv", index=False)
    run_index(tmp_path / "papers.csv", moe_folder, tmp_path / "index")
    other, tokenizer = MoEBertModel.from_bert(tiny_bert, domains=["CVD", "COPD"])  # same shape, other weights
    other.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    with pytest.raises(SystemExit, match="was built with the model .*moe, not .*other"):
        run_query(tmp_path / "index", "--text", "heart", "--model", str(tmp_path / "other"))
    with pytest.raises(SystemExit, match="was built with the model"):
        run_index(tmp_path / "papers.csv", str(tmp_path / "other"), tmp_path / "index", "--add")
    with pytest.raises(SystemExit, match=r"unknown domain 'SKIN': this index's model knows \['CVD', 'COPD'\]"):
        run_query(tmp_path / "index", "--text", "heart", "--domain", "SKIN")
    pd.DataFrame({"id": ["x"], "text": ["melanoma"], "domain": ["SKIN"]}).to_csv(tmp_path / "skin.csv", index=False)
    with pytest.raises(SystemExit, match="domain 'SKIN' is not one of the model's domains"):
        run_index(tmp_path / "skin.csv", moe_folder, tmp_path / "index", "--add")
    with pytest.raises(SystemExit, match="lacks columns \\['domain'\\]"):
        pd.DataFrame({"id": ["x"], "text": ["t"]}).to_csv(tmp_path / "bad.csv", index=False)
        run_index(tmp_path / "bad.csv", moe_folder, tmp_path / "fresh")
    with pytest.raises(SystemExit, match="holds no search index"):
        run_query(tmp_path / "nowhere", "--text", "heart")


def test_the_domain_classifier_is_stored_without_pickle_and_predicts_held_out_papers(tmp_path):
    papers = collection(40)
    held_out = papers.index % 5 == 0
    classifier = DomainClassifier.fit(papers["text"][~held_out].tolist(), papers["domain"][~held_out].tolist())
    classifier.save(tmp_path)
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.joblib"))
    loaded = DomainClassifier.load(tmp_path)
    predicted, probability = loaded.predict(papers["text"][held_out].tolist())
    assert predicted == papers["domain"][held_out].tolist() and (probability > 0.5).all()
    assert held_out_accuracy(papers["text"].tolist(), papers["domain"].tolist()) == 1.0


def test_two_domain_probabilities_are_the_regressions_own():
    from sklearn.linear_model import LogisticRegression

    papers = sample_papers()
    papers = papers[papers.domain.isin(["Oud_2018", "Chou_2004"])].iloc[::4]
    texts, domains = papers["text"].tolist(), papers["domain"].tolist()
    classifier = DomainClassifier.fit(texts[20:], domains[20:])
    vectorizer = domain_vectorizer()
    regression = LogisticRegression(max_iter=1000, C=10.0).fit(vectorizer.fit_transform(texts[20:]), domains[20:])
    expected = regression.predict_proba(vectorizer.transform(texts[:20]))
    predicted, probability = classifier.predict(texts[:20])
    assert predicted == [regression.classes_[i] for i in expected.argmax(axis=1)]
    np.testing.assert_allclose(probability, expected.max(axis=1), rtol=1e-6)  # sigmoid(z), not sigmoid(2z)


def test_the_shipped_collection_is_every_synergy_paper_once():
    papers = sample_papers()
    assert papers["id"].is_unique and set(papers["domain"]) == {p.name for p in SAMPLE_DIR.iterdir() if p.is_dir()}
    assert len(papers) > 1000 and (papers["text"].str.len() > 0).all()


@requires_faiss
def test_an_ivfpq_index_is_built_searched_and_refused_when_too_small(moe_folder, tmp_path):
    small = collection(5)
    small.to_csv(tmp_path / "small.csv", index=False)
    with pytest.raises(SystemExit, match="ivfpq needs at least 256 papers to train on, this collection has 10"):
        run_index(tmp_path / "small.csv", moe_folder, tmp_path / "small", "--index_type", "ivfpq", "--pq_m", "8")
    with pytest.raises(SystemExit, match="--pq_m 48 must divide the embedding dimension 32"):
        run_index(tmp_path / "small.csv", moe_folder, tmp_path / "small2", "--index_type", "ivfpq")
    papers = collection(150)
    papers.to_csv(tmp_path / "papers.csv", index=False)
    manifest = run_index(tmp_path / "papers.csv", moe_folder, tmp_path / "index", "--index_type", "ivfpq", "--pq_m", "8")
    assert manifest["index_type"] == "ivfpq" and manifest["papers"] == 300
    vectors = np.random.default_rng(0).standard_normal((300, 32)).astype(np.float32)
    assert not search_index.ivfpq_index(vectors, 8, 8).do_polysemous_training  # FAISS's default: 30x the training time
    [compressed] = run_query(tmp_path / "index", "--text", papers["text"][7], "--domain", "CVD", "--top_k", "20",
                             "--nprobe", "8", "--rerank", "0")
    assert "CVD-7" in [hit["id"] for hit in compressed["hits"]]  # approximate: near the top, not always first


@requires_faiss
def test_ivfpq_candidates_are_rescored_exactly_from_the_stored_vectors(moe_folder, tmp_path):
    papers = collection(150)
    papers.to_csv(tmp_path / "papers.csv", index=False)
    # torch: int8 activations are scaled per batch, so ONNX vectors move by ~1e-5 with their chunk's other papers
    run_index(tmp_path / "papers.csv", moe_folder, tmp_path / "index", "--index_type", "ivfpq", "--pq_m", "8",
              "--chunk_size", "64", "--backend", "torch")
    flat = tmp_path / "flat"
    run_index(tmp_path / "papers.csv", moe_folder, flat, "--backend", "torch")
    for row in (7, 160, 299):
        query = ["--text", papers["text"][row], "--domain", papers["domain"][row], "--top_k", "5"]
        [exact] = run_query(flat, *query)
        [reranked] = run_query(tmp_path / "index", *query, "--nprobe", "8", "--rerank", "20")  # every list, 100 candidates
        assert [h["id"] for h in reranked["hits"]] == [h["id"] for h in exact["hits"]]
        assert [h["score"] for h in reranked["hits"]] == pytest.approx([h["score"] for h in exact["hits"]], abs=1e-6)
    for chunk in (tmp_path / "index" / "chunks").glob("000004.*"):
        chunk.unlink()
    with pytest.raises(SystemExit, match="holds 256 vectors but the index 300: .* query with --rerank 0"):
        run_query(tmp_path / "index", "--text", "heart", "--domain", "CVD")


def test_search_without_faiss_is_refused_in_one_line_before_any_work(moe_folder, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "faiss", None)  # as where faiss-cpu is not installed: import faiss fails
    collection(3).to_csv(tmp_path / "papers.csv", index=False)
    with pytest.raises(SystemExit, match=r"^error: search needs FAISS, which is not installed here: pip install "
                                         r"faiss-cpu"):
        search.main(["index", "--papers", str(tmp_path / "papers.csv"), "--model", moe_folder, "--output_dir",
                     str(tmp_path / "index"), "--max_seq_length", "16", "--device", "cpu"])
    assert not (tmp_path / "index").exists()  # refused before a chunk was embedded


def cocited_collection() -> tuple[pd.DataFrame, dict]:
    """Six pairs of papers co-cited with each other, each pair's two abstracts on one narrow subject (most words
    shared), the pairs on different subjects; {id: its co-cited partner}."""
    rng = np.random.default_rng(1)
    words = np.array(HEART + LUNG)
    rows, partner = [], {}
    for i in range(6):
        subject = " ".join(rng.choice(words, 10))
        domain = ("CVD", "COPD")[i % 2]
        for side in ("a", "b"):
            rows.append({"id": f"P{i}{side}", "text": f"{subject} report {side}", "domain": domain})
        partner |= {f"P{i}a": f"P{i}b", f"P{i}b": f"P{i}a"}
    return pd.DataFrame(rows), partner


@requires_faiss
@pytest.mark.parametrize("index_type", ["flat", "ivfpq"])
def test_query_by_ids_ranks_co_cited_partners_first_and_leaves_the_given_papers_out(moe_folder, tmp_path, capsys,
                                                                                    index_type):
    papers, partner = cocited_collection()
    if index_type == "ivfpq":  # IVF-PQ trains on 256 papers at least: the pairs among unrelated papers
        papers = pd.concat([papers, collection(130)], ignore_index=True)
    papers.to_csv(tmp_path / "papers.csv", index=False)
    run_index(tmp_path / "papers.csv", moe_folder, tmp_path / "index", "--backend", "torch", "--index_type", index_type,
              *(["--pq_m", "8"] if index_type == "ivfpq" else []))
    for paper in ("P0a", "P3b", "P4a"):
        result = run_query(tmp_path / "index", "--id", paper, "--top_k", "3")
        assert result["hits"][0]["id"] == partner[paper] and result["hits"][0]["closest"] == paper
        assert paper not in [hit["id"] for hit in result["hits"]]
    both = run_query(tmp_path / "index", "--id", "P1a", "--id", "P2b", "--top_k", "2")
    assert {hit["id"] for hit in both["hits"]} == {"P1b", "P2a"}
    assert {(hit["id"], hit["closest"]) for hit in both["hits"]} == {("P1b", "P1a"), ("P2a", "P2b")}
    capsys.readouterr()
    run_query(tmp_path / "index", "--id", "P5b", "--json", "--top_k", "1")
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["hits"][0]["id"] == "P5a"


@requires_faiss
def test_query_by_an_unknown_id_or_by_text_and_ids_at_once_is_refused_in_one_line(moe_folder, tmp_path, capsys):
    papers, _ = cocited_collection()
    papers.to_csv(tmp_path / "papers.csv", index=False)
    run_index(tmp_path / "papers.csv", moe_folder, tmp_path / "index", "--backend", "torch")
    with pytest.raises(SystemExit, match="unknown paper id 'P9z': this index holds 12 papers"):
        run_query(tmp_path / "index", "--id", "P0a", "--id", "P9z")
    with pytest.raises(SystemExit):
        run_query(tmp_path / "index", "--id", "P0a", "--text", "heart")
    assert "--id (papers like these), and not both" in capsys.readouterr().err


def test_search_serves_on_int8_onnx_on_a_cpu_and_torch_bf16_where_native_unless_told():
    from moebert.encoders.options import EncodingOptions, serving_options

    cpu, why = serving_options(EncodingOptions(device="cpu"))
    assert (cpu.runtime, cpu.dtype) == ("onnx", "fp32") and "meets every quality target" in why
    gpu, why = serving_options(EncodingOptions(device="cuda"))
    assert (gpu.runtime, gpu.precision) == ("torch", "auto") and "bf16 where it is native" in why
    assert serving_options(EncodingOptions(device="cpu", precision="fp32"))[0].runtime == "torch"
    given = EncodingOptions(backend="openvino", device="cpu")
    assert serving_options(given) == (given, "--backend openvino, as given")


@requires_faiss
def test_index_by_default_runs_onnx_on_a_cpu_says_so_first_and_adds_alike(moe_folder, tmp_path, capsys):
    collection(4).to_csv(tmp_path / "papers.csv", index=False)
    out = tmp_path / "index"
    manifest = search.main(["index", "--papers", str(tmp_path / "papers.csv"), "--model", moe_folder, "--output_dir",
                            str(out), "--device", "cpu"])
    assert manifest["backend"] == "onnx"
    printed = capsys.readouterr()
    assert printed.out.startswith("backend onnx (int8): a CPU: int8 ONNX Runtime")
    stages = [line for line in printed.err.splitlines() if line.endswith((" s  model loaded", " s  the whole command"))]
    assert len(stages) == 2 and float(stages[-1].split()[0]) > 0  # each stage's seconds, then the command's
    collection(2, start=10).to_csv(tmp_path / "more.csv", index=False)
    added = search.main(["index", "--papers", str(tmp_path / "more.csv"), "--model", moe_folder, "--output_dir",
                         str(out), "--device", "cpu", "--add"])
    assert added["backend"] == "onnx" and added["papers"] == 12
    assert "--add: as the index was built" in capsys.readouterr().out
