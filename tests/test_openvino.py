"""The OpenVINO backend: each domain's graph read by OpenVINO, int8 by NNCF calibrated on the domain's own training
texts, cached like the ONNX export, and served to eval.py and search.py by `--backend openvino`."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, TEXTS, requires, python_path
from test_onnx import cosines, real_abstracts, saved_moe, torch_vectors

import eval as eval_script
from moebert.__main__ import main as moebert_command
from moebert.data.pairs import SAMPLE_NAME as SHIPPED_SAMPLE
from moebert.data.pairs import load_domain_dataset
from moebert.data.pairs import text_sample
from moebert.encoders.export import cache as exports
from moebert.encoders.export.cache import load_export_encoder
from moebert.encoders.export.manifest import ExportError
from moebert.encoders.export.openvino_runtime import CALIBRATION_TEXTS, OpenVinoEncoder
from moebert.encoders.loader import encoder_of_model
from moebert.encoders.options import EncodingOptions
from moebert.loading import load_moebert

pytestmark = requires("openvino", "the OpenVINO backend needs openvino and nncf")


@pytest.fixture(autouse=True)
def export_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEBERT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def graph_of(folder, domain: str):
    manifest = json.loads((folder / "export_manifest.json").read_text())
    import openvino

    return openvino.Core().read_model(str(folder / manifest["graphs"][domain]))


def with_training_data(folder, datasets: dict) -> str:
    """A saved model whose training_state.json names its training data, as train.py writes it."""
    (folder / "training_state.json").write_text(json.dumps({"datasets": datasets}))
    return str(folder)


def test_the_fp32_graph_computes_what_the_trained_moe_computes_for_each_domain(minilm, tmp_path):
    folder = saved_moe(minilm, tmp_path / "moe", moe_layers="top2")
    out = moebert_command(["export", "--model", folder, "--output_dir", str(tmp_path / "fp32"), "--runtime", "openvino",
                           "--quantize", "none"])
    encoder = load_export_encoder(str(out), 256, 8)
    assert isinstance(encoder, OpenVinoEncoder) and encoder.name == "openvino-none"
    texts = real_abstracts()
    for domain in ("CVD", "COPD"):
        assert np.abs(encoder.encode(texts, domain) - torch_vectors(folder, texts, domain)).max() < 1e-4
    assert np.abs(encoder.encode(texts, "CVD") - torch_vectors(folder, texts, "COPD")).max() > 1e-3  # its own expert


def test_int8_is_calibrated_on_the_domains_training_texts_and_keeps_the_vectors_direction(minilm, tiny_data, tmp_path,
                                                                                         capsys, monkeypatch):
    from dataclasses import replace

    from moebert.encoders.export import runtimes

    calibration_texts = 60  # a fifth of the 300 an export draws: the same sampling, a fifth of NNCF's time
    monkeypatch.setitem(runtimes.RUNTIMES, "openvino", replace(runtimes.RUNTIMES["openvino"],
                                                               calibration_texts=calibration_texts))
    saved_moe(minilm, tmp_path / "moe", moe_layers="top2")
    folder = with_training_data(tmp_path / "moe", {"COPD": str(tiny_data / "COPD"), "CVD": "no/such-dataset"})
    out = moebert_command(["export", "--model", folder, "--output_dir", str(tmp_path / "int8"), "--runtime", "openvino"])
    graph = graph_of(out, "COPD")
    own = {*train_texts(tiny_data / "COPD")}  # a few toy texts: every one, topped up from the shipped sample
    assert graph.get_rt_info(["moebert", "calibration_texts"]).astype(str) == (
        f"{tiny_data / 'COPD'} + {calibration_texts - len(own)} texts of {SHIPPED_SAMPLE}")
    assert sum(op.get_type_name() == "FakeQuantize" for op in graph.get_ops()) >= 24  # activations and weights int8
    assert graph_of(out, "CVD").get_rt_info(["moebert", "calibration_texts"]).astype(str) == SHIPPED_SAMPLE
    assert f"calibrating CVD on {SHIPPED_SAMPLE}: its training data cannot be loaded here" in capsys.readouterr().err
    texts = real_abstracts()  # abstracts, as the shipped sample CVD was calibrated on (COPD's toy texts are not)
    quantized = load_export_encoder(str(out), 256, 8).encode(texts, "CVD")
    expected = torch_vectors(folder, texts, "CVD")
    assert cosines(quantized, expected).min() > 0.98 and np.abs(quantized - expected).max() > 1e-4  # close, quantized


def train_texts(folder):
    train = load_domain_dataset(str(folder), splits=("train",))["train"]
    return [*train["a"], *train["b"]]


def test_a_domain_calibrates_on_its_own_texts_topped_up_from_the_shipped_sample_when_it_has_few():
    large, small = (f"{ROOT}/data/synergy/{d}" for d in ("Jeyaraman_2020", "Sep_2021"))  # 457 and 35 training texts
    texts, source = text_sample("Jeyaraman_2020", large, CALIBRATION_TEXTS)
    assert len(texts) == CALIBRATION_TEXTS and set(texts) <= set(train_texts(large)) and source == large
    own = set(train_texts(small))
    texts, source = text_sample("Sep_2021", small, CALIBRATION_TEXTS)
    assert len(texts) == len(set(texts)) == CALIBRATION_TEXTS and own <= set(texts)
    assert source == f"{small} + {CALIBRATION_TEXTS - len(own)} texts of {SHIPPED_SAMPLE}"


def test_a_model_is_exported_once_per_runtime_into_the_cache(tiny_bert, tmp_path, monkeypatch, export_cache):
    folder = saved_moe(tiny_bert, tmp_path / "moe")
    first = load_export_encoder(folder, 64, 4, runtime="openvino")
    assert isinstance(first, OpenVinoEncoder) and first.folder.parent == export_cache / "openvino"
    vectors = first.encode(TEXTS, "CVD")
    onnx = load_export_encoder(folder, 64, 4, runtime="onnx")
    assert onnx.folder.parent == export_cache / "onnx"
    assert cosines(onnx.encode(TEXTS, "CVD"), vectors).min() > 0.95  # two int8 runtimes of one model
    monkeypatch.setattr(exports, "export", lambda *a, **k: pytest.fail("exported again"))
    again = load_export_encoder(folder, 64, 4, runtime="openvino")
    assert again.folder == first.folder and np.array_equal(again.encode(TEXTS, "CVD"), vectors)


def test_a_graph_of_another_model_is_refused_in_one_line(tiny_bert, tmp_path):
    first = moebert_command(["export", "--model", saved_moe(tiny_bert, tmp_path / "a"), "--output_dir",
                             str(tmp_path / "export-a"), "--runtime", "openvino", "--quantize", "none"])
    other = moebert_command(["export", "--model", saved_moe(tiny_bert, tmp_path / "b", seed=1), "--output_dir",
                             str(tmp_path / "export-b"), "--runtime", "openvino", "--quantize", "none"])
    graph = json.loads((first / "export_manifest.json").read_text())["graphs"]["CVD"]
    for suffix in (".xml", ".bin"):  # the same domain's graph, of another model
        shutil.copy((other / graph).with_suffix(suffix), (first / graph).with_suffix(suffix))
    with pytest.raises(ExportError, match=r"is not the graph this export made for domain 'CVD' \(its fingerprint differ"):
        OpenVinoEncoder(first, 64, 4).encode(TEXTS, "CVD")
    (first / graph).with_suffix(".bin").write_bytes(b"cut short")
    with pytest.raises(ExportError, match=r"cannot be read .*; export again: python -m moebert export"):
        OpenVinoEncoder(first, 64, 4).encode(TEXTS, "CVD")


def test_eval_and_search_run_on_openvino(tiny_bert, tiny_data, tmp_path, export_cache):
    from test_search import collection, run_index, run_query

    folder = saved_moe(tiny_bert, tmp_path / "moe")
    common = ["--dataset", f"CVD={tiny_data / 'CVD'}", "--dataset", f"COPD={tiny_data / 'COPD'}", "--max_seq_length",
              "64", "--device", "cpu"]
    results = eval_script.main(["--model", f"torch={folder}", "--model", f"ov={folder}", "--backend", "openvino",
                                "--output_dir", str(tmp_path / "eval"), *common])
    assert results["ov"]["all"]["roc_auc"] == pytest.approx(results["torch"]["all"]["roc_auc"], abs=0.05)
    papers = collection(6)
    papers.to_csv(tmp_path / "papers.csv", index=False)
    manifest = run_index(tmp_path / "papers.csv", folder, tmp_path / "index", "--backend", "openvino")
    assert manifest["backend"] == "openvino"
    [result] = run_query(tmp_path / "index", "--text", papers["text"][3], "--top_k", "2")  # openvino, as built
    assert result["hits"][0]["id"] == papers["id"][3] and result["hits"][0]["score"] == pytest.approx(1, abs=1e-5)
    model, tokenizer = load_moebert(folder)  # a model built in memory (search's embedded default) is exported too
    options = EncodingOptions(backend="openvino", max_seq_length=64)
    in_memory = encoder_of_model(lambda: (model, tokenizer), "in-memory", options, "tiny")
    assert isinstance(in_memory, OpenVinoEncoder) and in_memory.folder.parent == export_cache / "openvino"

    def not_needed():
        raise AssertionError("the export is cached: no model needs making")

    assert encoder_of_model(not_needed, "in-memory", options, "tiny").folder == in_memory.folder


def test_nncf_sends_no_usage_data(tmp_path):
    """NNCF reports to Google Analytics unless told not to; outside pytest (which it detects) it is told by us."""
    probe = ("from moebert.encoders.export.openvino_runtime import import_nncf; import_nncf(); import nncf.telemetry.wrapper as w; "
             "print(isinstance(w.telemetry, w.NNCFTelemetry))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNCF_")} | {"HOME": str(tmp_path),
                                                                                "PYTHONPATH": python_path()}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"  # NNCF's stub, which sends nothing
