import json
import shutil

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from packaging.version import Version

import eval as eval_script
from conftest import DOMAINS, TEXTS, torch_encoder, requires_faiss
from modeling_moebert import MoEBertModel
from moebert.__main__ import main as moebert_command
from moebert.encoders.export import cache as exports
from moebert.encoders.export.cache import load_export_encoder
from moebert.encoders.export.manifest import ExportError
from moebert.encoders.export.onnx_runtime import OnnxEncoder
from moebert.loading import load_moebert, model_fingerprint


@pytest.fixture(autouse=True)
def onnx_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEBERT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def trained_like(model, seed=0):
    """Experts that differ from the base and from each other, as after training."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in model.config.moe_layers:
            for expert in model.encoder.layer[layer].experts:
                for parameter in expert.parameters():
                    parameter.add_(0.05 * parameter.abs().mean() * torch.randn_like(parameter))
    return model


def saved_moe(base, folder, domains=("CVD", "COPD"), seed=0, **kwargs):
    model, tokenizer = MoEBertModel.from_bert(base, domains=list(domains), **kwargs)
    trained_like(model, seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def real_abstracts(count=12):
    """SYNERGY abstracts of both lengths: most are cut at 256 tokens, some are shorter."""
    from moebert.data.pairs import sample_papers

    return sample_papers()["text"].head(count).tolist()


def cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def torch_vectors(folder, texts, domain, max_seq_length=256):
    return torch_encoder(folder, max_seq_length, 8).encode(texts, domain)


def test_the_exported_graph_computes_what_the_trained_moe_computes_for_each_domain(minilm, tmp_path):
    folder = saved_moe(minilm, tmp_path / "moe", moe_layers="top2")
    out = moebert_command(["export", "--model", folder, "--output_dir", str(tmp_path / "fp32"), "--quantize", "none"])
    encoder = OnnxEncoder(out, 256, 8)
    texts = real_abstracts()
    for domain in ("CVD", "COPD"):
        expected = torch_vectors(folder, texts, domain)
        assert np.abs(encoder.encode(texts, domain) - expected).max() < 1e-4
    other = torch_vectors(folder, texts, "COPD")
    assert np.abs(encoder.encode(texts, "CVD") - other).max() > 1e-3  # each domain runs its own expert


def test_int8_weights_keep_the_vectors_direction(minilm, tmp_path):
    folder = saved_moe(minilm, tmp_path / "moe", moe_layers="top2")
    out = moebert_command(["export", "--model", folder, "--output_dir", str(tmp_path / "int8"), "--domains", "COPD"])
    graph = onnx.load(str(out / json.loads((out / "export_manifest.json").read_text())["graphs"]["COPD"]))
    operators = {node.op_type for node in graph.graph.node}
    assert "MatMulInteger" in operators  # int8 matrix products
    if Version(onnxruntime.__version__) >= Version("1.32"):  # the pinned one fuses attention, 1.30 does not (warned)
        assert "QAttention" in operators
    texts = real_abstracts()
    quantized = OnnxEncoder(out, 256, 8).encode(texts, "COPD")
    expected = torch_vectors(folder, texts, "COPD")
    assert cosines(quantized, expected).min() > 0.98 and np.abs(quantized - expected).max() > 1e-4  # close, and really quantized


def test_an_onnxruntime_that_fuses_no_attention_is_warned_of(tiny_bert, tmp_path, monkeypatch, capsys):
    import onnxruntime.transformers.optimizer as optimizer

    optimize_model = optimizer.optimize_model

    def as_onnxruntime_1_30(*args, **kwargs):  # its optimizer does not fuse this graph's attention
        optimized = optimize_model(*args, **kwargs)
        optimized.get_fused_operator_statistics = lambda: {"Attention": 0}
        return optimized

    monkeypatch.setattr(optimizer, "optimize_model", as_onnxruntime_1_30)
    moebert_command(["export", "--model", saved_moe(tiny_bert, tmp_path / "moe"), "--output_dir", str(tmp_path / "x"),
                     "--domains", "CVD"])
    warned = capsys.readouterr().err  # as the command shows the library's messages
    assert f"onnxruntime {onnxruntime.__version__} fused no attention in CVD's graph: it runs unfused" in warned


def test_a_model_is_exported_once_into_the_cache_keyed_by_its_weights(tiny_bert, tmp_path, monkeypatch, onnx_cache):
    folder = saved_moe(tiny_bert, tmp_path / "moe", domains=DOMAINS)
    first = load_export_encoder(folder, 64, 4)
    assert first.folder.parent == onnx_cache / "onnx" and first.fingerprint == model_fingerprint(folder)
    vectors = first.encode(TEXTS, "SKIN")
    monkeypatch.setattr(exports, "export", lambda *a, **k: pytest.fail("exported again"))
    again = load_export_encoder(folder, 64, 4)
    assert again.folder == first.folder and np.array_equal(again.encode(TEXTS, "SKIN"), vectors)


def test_a_domain_added_after_the_export_gets_a_new_export_and_the_old_one_refuses_it(tiny_bert, tmp_path):
    folder = saved_moe(tiny_bert, tmp_path / "moe")
    old = load_export_encoder(folder, 64, 4)
    model, tokenizer = load_moebert(folder)
    model.add_domain("SKIN", tokenizer, init_from="CVD")
    trained_like(model, seed=2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    new = load_export_encoder(folder, 64, 4)
    assert new.folder != old.folder
    assert cosines(new.encode(TEXTS, "SKIN"), torch_vectors(folder, TEXTS, "SKIN", 64)).min() > 0.98
    with pytest.raises(ExportError, match=r"^domain 'SKIN' is not in the export .*added to the model later; export again"):
        OnnxEncoder(old.folder, 64, 4).encode(TEXTS, "SKIN")


def test_a_missing_graph_or_a_graph_of_another_model_is_refused_in_one_line(tiny_bert, tmp_path):
    first = moebert_command(["export", "--model", saved_moe(tiny_bert, tmp_path / "a"), "--output_dir",
                               str(tmp_path / "export-a"), "--domains", "CVD", "--quantize", "none"])
    with pytest.raises(ExportError, match=r"^domain 'COPD' is not in the export .*it has \['CVD'\]"):
        OnnxEncoder(first, 64, 4).encode(TEXTS, "COPD")
    other = moebert_command(["export", "--model", saved_moe(tiny_bert, tmp_path / "b", seed=1), "--output_dir",
                               str(tmp_path / "export-b"), "--quantize", "none"])
    graphs = json.loads((first / "export_manifest.json").read_text())["graphs"]
    shutil.copy(other / graphs["CVD"], first / graphs["CVD"])  # the same domain's graph, of another model
    with pytest.raises(ExportError, match=r"is not the graph this export made for domain 'CVD' \(its fingerprint differ"):
        OnnxEncoder(first, 64, 4).encode(TEXTS, "CVD")
    (first / graphs["CVD"]).unlink()
    with pytest.raises(ExportError, match=r"the graph of domain 'CVD', is missing; export again"):
        OnnxEncoder(first, 64, 4).encode(TEXTS, "CVD")


def test_what_is_no_moebert_or_no_export_is_refused(tiny_bert, tmp_path):
    with pytest.raises(ExportError, match="is no MoE-BERT and no export of one"):
        load_export_encoder(tiny_bert, 64, 4)
    with pytest.raises(SystemExit, match="is no MoE-BERT"):
        moebert_command(["export", "--model", tiny_bert, "--output_dir", str(tmp_path / "x")])
    with pytest.raises(ExportError, match="is no export of a MoE-BERT"):
        OnnxEncoder(tmp_path, 64, 4)
    assert not (tmp_path / "x").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "onnx_manifest.json").write_text('{"format": 1}')  # what the first exporter wrote
    with pytest.raises(ExportError, match=r"old was written by an earlier version of the exporter \(format 1, "
                                          r"onnx_manifest.json\): export the model again"):
        load_export_encoder(str(tmp_path / "old"), 64, 4)


def test_the_calibrated_probability_is_the_models_own(tiny_bert, tmp_path):
    folder = saved_moe(tiny_bert, tmp_path / "moe")
    model = MoEBertModel.from_pretrained(folder)
    model.config.calibration = {"method": "platt", "fitted_on": "valid", "parameters": {"CVD": [6.0, -4.0]}}
    model.save_pretrained(folder)
    encoder = load_export_encoder(folder, 64, 4)
    assert encoder.cocitation_probability(0.7, "CVD") == pytest.approx(float(model.cocitation_probability(0.7, "CVD")))
    with pytest.raises(ValueError, match="no calibration for domain 'COPD'"):
        encoder.cocitation_probability(0.7, "COPD")


@requires_faiss
def test_search_indexes_and_queries_with_the_onnx_backend(tiny_bert, tmp_path):
    from test_search import collection, run_index, run_query

    folder = saved_moe(tiny_bert, tmp_path / "moe")
    papers = collection(6)
    papers.to_csv(tmp_path / "papers.csv", index=False)
    manifest = run_index(tmp_path / "papers.csv", folder, tmp_path / "index", "--backend", "onnx")
    assert manifest["backend"] == "onnx" and manifest["fingerprint"] == model_fingerprint(folder)
    torch_manifest = run_index(tmp_path / "papers.csv", folder, tmp_path / "torch-index")  # the default
    stored = np.concatenate([np.load(f) for f in sorted((tmp_path / "index" / "chunks").glob("*.npy"))])
    expected = np.concatenate([np.load(f) for f in sorted((tmp_path / "torch-index" / "chunks").glob("*.npy"))])
    assert torch_manifest["backend"] == "torch" and cosines(stored, expected).min() > 0.99  # int8 weights
    [result] = run_query(tmp_path / "index", "--text", papers["text"][3], "--top_k", "2")  # onnx, as built
    assert result["hits"][0]["id"] == papers["id"][3] and result["hits"][0]["score"] == pytest.approx(1, abs=1e-5)
    with pytest.raises(SystemExit, match="is no MoE-BERT: search routes each paper to its domain's expert"):
        run_query(tmp_path / "index", "--text", "heart", "--model", tiny_bert, "--backend", "onnx")


def test_eval_scores_an_export_beside_its_model_and_refuses_a_domain_it_lacks(tiny_bert, tiny_data, tmp_path):
    folder = saved_moe(tiny_bert, tmp_path / "moe")
    export = moebert_command(["export", "--model", folder, "--output_dir", str(tmp_path / "export"), "--quantize", "none"])
    common = ["--dataset", f"CVD={tiny_data / 'CVD'}", "--dataset", f"COPD={tiny_data / 'COPD'}", "--max_seq_length", "64",
              "--device", "cpu"]
    results = eval_script.main(["--model", f"torch={folder}", "--model", f"onnx={export}", "--output_dir",
                                str(tmp_path / "eval"), *common])
    assert results["onnx"]["all"]["roc_auc"] == pytest.approx(results["torch"]["all"]["roc_auc"], abs=1e-6)
    via_flag = eval_script.main(["--model", f"onnx={folder}", "--backend", "onnx", "--output_dir", str(tmp_path / "e2"), *common])
    assert isinstance(torch_encoder(folder, 64, 4, backend="onnx"), OnnxEncoder)
    assert via_flag["onnx"]["all"]["roc_auc"] == pytest.approx(results["torch"]["all"]["roc_auc"], abs=1e-6)
    partial = moebert_command(["export", "--model", folder, "--output_dir", str(tmp_path / "cvd"), "--domains", "CVD"])
    skipped = eval_script.main(["--model", f"onnx={partial}", "--output_dir", str(tmp_path / "e3"), *common])
    assert skipped["onnx"]["COPD"]["error"].startswith("domain 'COPD' is not in the export")
    assert skipped["onnx"]["CVD"]["roc_auc"] == pytest.approx(results["torch"]["CVD"]["roc_auc"], abs=0.05)


def test_two_models_of_the_same_weights_with_other_domains_get_their_own_exports(tiny_bert, tmp_path):
    first = saved_moe(tiny_bert, tmp_path / "a", domains=("Chou_2004", "Oud_2018"))
    second = saved_moe(tiny_bert, tmp_path / "b", domains=("Nelson_2002", "Oud_2018"))
    assert model_fingerprint(first) == model_fingerprint(second)  # upcycled alike: the same weight files
    load_export_encoder(first, 64, 4).encode(TEXTS, "Chou_2004")
    encoder = load_export_encoder(second, 64, 4)
    assert encoder.config.domains == ["Nelson_2002", "Oud_2018"]
    np.testing.assert_allclose(encoder.encode(TEXTS, "Nelson_2002"), torch_vectors(second, TEXTS, "Nelson_2002", 64),
                               atol=0.05)


def test_a_recalibrated_model_gives_its_new_probabilities_through_its_cached_export(tiny_bert, tiny_data, tmp_path):
    folder = saved_moe(tiny_bert, tmp_path / "moe")
    model = MoEBertModel.from_pretrained(folder)
    model.config.calibration = {"method": "platt", "fitted_on": "valid", "parameters": {"CVD": [6.0, -4.0]}}
    model.save_pretrained(folder)
    assert load_export_encoder(folder, 64, 4).cocitation_probability(0.7, "CVD") == pytest.approx(0.5498, abs=1e-4)
    eval_script.main(["calibrate", "--model", folder, "--dataset", f"CVD={tiny_data / 'CVD'}", "--dataset",
                      f"COPD={tiny_data / 'COPD'}", "--max_seq_length", "64", "--device", "cpu"])
    recalibrated = MoEBertModel.from_pretrained(folder)
    encoder = load_export_encoder(folder, 64, 4)
    for domain in ("CVD", "COPD"):
        assert encoder.cocitation_probability(0.7, domain) == pytest.approx(
            float(recalibrated.cocitation_probability(0.7, domain)), abs=1e-6)
