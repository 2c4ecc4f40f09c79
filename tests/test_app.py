"""The search page: what it calls (moebert.search.service), and app.py served on loopback, driven through its HTTP
API as a client would, bad input included."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.app_server import free_port, serve
from conftest import requires, requires_faiss
from moebert.encoders.interface import embed
from moebert.search.index import PaperIndex
from moebert.search.service import MAX_QUERY_CHARS, QueryError, SearchService, checked_text, parse_ids, title_and_snippet
from test_search import cocited_collection, run_index

ROOT = Path(__file__).resolve().parents[1]
requires_gradio = requires("gradio", "the search page is a Gradio app (gradio, gradio_client)")
BAD_INPUTS = {  # input -> what its message must say
    "": "the query is empty",
    "x" * 100_000: "the query is 100,000 characters: paste at most",
    "\x00\x01\x02binary\x03\x04\x05\x06\x07" * 50: "holds binary data",
}


@pytest.fixture
def tiny_index(moe_folder, tmp_path):
    papers, partner = cocited_collection()
    papers["text"] = [f"Title of {i}. {text} and a longer abstract after it" for i, text in zip(papers.id, papers.text)]
    papers.to_csv(tmp_path / "papers.csv", index=False)
    run_index(tmp_path / "papers.csv", moe_folder, tmp_path / "index", "--backend", "torch")
    return tmp_path / "index", papers.set_index("id")["text"].to_dict(), partner


def test_inputs_are_checked_with_a_message_that_names_the_fix():
    for text, message in BAD_INPUTS.items():
        with pytest.raises(QueryError, match=re.escape(message)):
            checked_text(text)
    with pytest.raises(QueryError, match="must be text, not bytes"):
        checked_text(b"heart failure")
    assert checked_text("  Heart failure\ttrial\n") == "Heart failure\ttrial"
    assert len(checked_text("y" * MAX_QUERY_CHARS)) == MAX_QUERY_CHARS
    assert parse_ids("W1, W2;W3  W4\n") == ["W1", "W2", "W3", "W4"]
    with pytest.raises(QueryError, match="give at least one paper id"):
        parse_ids(" , ")
    assert title_and_snippet("Baclofen in stroke. We studied 40 patients.") == ("Baclofen in stroke",
                                                                                 "We studied 40 patients.")
    title, snippet = title_and_snippet("A title. " + "word " * 100)
    assert title == "A title" and snippet.endswith(" ...") and len(snippet) <= 250


@requires_faiss
def test_the_service_answers_text_ids_and_two_abstracts_in_rows_with_titles(tiny_index):
    folder, texts, partner = tiny_index
    service = SearchService(PaperIndex.load(folder, options=None))
    result = service.search(texts["P2a"], "CVD", 3)
    assert result["domain"] == "CVD" and result["domain_probability"] is None
    top = result["hits"][0]
    assert top["rank"] == 1 and top["title"] == "Title of P2a" and top["snippet"].endswith("a longer abstract after it")
    predicted = service.search("heart cardiac atrial", top_k=2)
    assert predicted["domain"] in ("CVD", "COPD") and 0.5 <= predicted["domain_probability"] <= 1
    like = service.like("P4a", 1)
    assert [(h["id"], h["closest"]) for h in like["hits"]] == [(partner["P4a"], "P4a")]
    a, b = "Title. Heart failure after infarction.", "Title. Atrial fibrillation and stroke."
    compared = service.compare(a, b, "CVD")
    vectors = embed(service.index.encoder, [a, b], ["CVD", "CVD"])
    assert compared["cosine"] == pytest.approx(float(vectors[0] @ vectors[1]), abs=1e-6)
    assert compared["probability"] is None  # the test model is not calibrated
    for call, message in [(lambda: service.search("heart", "SKIN"), "unknown domain 'SKIN': choose one of"),
                          (lambda: service.like("P0a, nope"), "unknown paper id 'nope'"),
                          (lambda: service.search("heart", top_k=0), "between 1 and 100"),
                          (lambda: service.compare("heart", "", "CVD"), "the second abstract is empty")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            call()


@pytest.fixture
def served(tiny_index):
    """app.py on loopback over the tiny index: (client, texts by id, partner map, the server process)."""
    from gradio_client import Client

    folder, texts, partner = tiny_index
    port = free_port()
    server = serve(str(folder), port)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False), texts, partner, server
    finally:
        server.terminate()
        server.wait(timeout=30)


@requires_faiss
@requires_gradio
def test_the_page_is_served_on_loopback_and_answers_its_http_api_bad_input_included(served):
    from gradio_client.exceptions import AppError

    client, texts, partner, server = served
    found, table = client.predict(texts["P3b"], "COPD", 2, api_name="/search")
    assert found == "Domain **COPD** (chosen)."
    assert table["headers"][:3] == ["rank", "title", "snippet"] and table["data"][0][6] == "P3b"
    found, table = client.predict("P0a", 1, api_name="/like")
    assert found == "Papers likely co-cited with P0a." and table["data"][0][6] == partner["P0a"]
    verdict = client.predict("Title. Heart failure.", "Title. Atrial fibrillation.", "CVD", api_name="/compare")
    assert verdict.startswith("Domain **CVD** (chosen): cosine **") and "no calibration in this model" in verdict
    bad = {**BAD_INPUTS, "unknown domain": "unknown domain 'SKIN': choose one of ['CVD', 'COPD'], or 'predict'",
           "unknown id": "unknown paper id 'nope'"}
    for text, message in bad.items():
        with pytest.raises(AppError, match=re.escape(message)):
            if text == "unknown domain":
                client.predict("heart", "SKIN", 2, api_name="/search")
            elif text == "unknown id":
                client.predict("nope", 2, api_name="/like")
            else:
                client.predict(text, "predict", 2, api_name="/search")
        assert client.predict(texts["P4a"], "CVD", 1, api_name="/search")[1]["data"][0][6] == "P4a"
    assert server.poll() is None  # still serving
    tracebacks = [i for i, line in enumerate(server.output) if "Traceback" in line]
    assert not tracebacks, "".join(server.output[tracebacks[0]:][:40]) if tracebacks else ""  # a bad input is no crash


@requires_faiss
@requires_gradio
def test_without_an_index_the_app_refuses_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "app.py", "--index", str(tmp_path / "none")], cwd=ROOT,
                            capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'none'} "
                                                                                     "holds no search index")
    assert "Traceback" not in result.stderr

