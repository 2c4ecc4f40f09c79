import json

import numpy as np
import pandas as pd
import pytest
from conftest import DOMAINS, torch_encoder
from datasets import Dataset, DatasetDict

import eval as eval_script
from modeling_moebert import MoEBertModel
from moebert import device
from moebert.encoders import transformer as encoders
from moebert.encoders.baselines import SentenceTransformerEncoder
from moebert.encoders.interface import Encoder
from moebert.evaluation import scoring as evaluation
from moebert.evaluation.metrics import ranking_metrics
from moebert.loading import RemoteCodeError

PAIRS = pd.DataFrame(
    {
        "a": ["heart failure", "heart failure", "lung disease", "skin cancer"],
        "b": ["cardiac arrest", "lung disease", "asthma attack", "heart failure"],
        "label": [1, 0, 1, 0],
    }
)


class CountingEncoder(Encoder):
    """Bag of letters; records every text it is asked to encode."""

    def __init__(self):
        self.seen = []

    def encode(self, texts, domain):
        self.seen += texts
        return np.array([[t.count(c) for c in "aeiourst"] for t in texts], dtype=float) + 0.1


def dataset_of(frame):
    return DatasetDict({s: Dataset.from_pandas(frame) for s in ("train", "valid", "test")})


def test_each_unique_text_is_encoded_once_per_split():
    encoder = CountingEncoder()
    results, scored = evaluation.evaluate_model(encoder, {"CVD": dataset_of(PAIRS)}, "test")
    unique = set(PAIRS.a) | set(PAIRS.b)
    assert len(encoder.seen) == 2 * len(unique)  # valid and test, each text once; retrieval reuses the vectors
    assert set(encoder.seen) == unique
    assert {"f1_max", "roc_auc", "f1_at_valid_threshold", "mrr", "recall_at_10"} <= set(results["CVD"])
    assert set(results) == {"CVD", "mean", "all"}


def test_retrieval_metrics_by_hand():
    split = {"a": ["q", "x"], "b": ["p", "y"], "label": [1, 0]}

    class Fixed:
        texts = ["p", "q", "x", "y"]

        def similarity_matrix(self):
            # q ranks x first, then p; p ranks q first
            return np.array(
                [[1, 0.9, 0.1, 0.0], [0.5, 1, 0.8, 0.1], [0.1, 0.8, 1, 0.2], [0.0, 0.1, 0.2, 1]]
            )

    result = evaluation.retrieval_metrics(split, Fixed())
    assert result["mrr"] == pytest.approx((1 + 1 / 2) / 2)
    assert result["recall_at_10"] == 1.0
    assert result["ndcg_at_10"] == pytest.approx((1 + 1 / np.log2(3)) / 2)


def test_one_class_split_is_reported_not_scored():
    one_class = PAIRS.assign(label=1)
    results, _ = evaluation.evaluate_model(CountingEncoder(), {"CVD": dataset_of(one_class)}, "test")
    assert "all 4 pairs have label 1" in results["CVD"]["error"]


def test_end_to_end_on_a_tiny_moebert(tiny_bert, tmp_path):
    model, tokenizer = MoEBertModel.from_bert(tiny_bert, domains=DOMAINS[:2])
    model.save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    for domain in ("CVD", "SKIN"):
        folder = tmp_path / "data" / domain
        folder.mkdir(parents=True)
        for split in ("train", "valid", "test"):
            PAIRS.to_csv(folder / f"{split}.csv", index=False)
    out = tmp_path / "out"
    results = eval_script.main(
        [
            "--model", f"moe={tmp_path / 'moe'}", "--model", "tfidf", "--model", "missing=/no/such/model",
            "--dataset", f"CVD={tmp_path / 'data' / 'CVD'}", "--dataset", f"SKIN={tmp_path / 'data' / 'SKIN'}",
            "--output_dir", str(out), "--batch_size", "2",
        ]
    )
    assert "unknown domain 'SKIN'" in results["moe"]["SKIN"]["error"]  # the MoE model knows CVD and COPD only
    assert "f1_max" in results["tfidf"]["SKIN"]
    assert "cannot load /no/such/model" in results["missing"]["all"]["error"]
    assert json.loads((out / "results.json").read_text())["tfidf"]["all"]["f1_max"] == results["tfidf"]["all"]["f1_max"]
    predictions = pd.read_csv(out / "predictions.csv")
    assert set(predictions.model) == {"moe", "tfidf"} and len(predictions) == 3 * len(PAIRS)
    from sklearn.metrics import roc_auc_score

    moe_cvd = predictions[(predictions.model == "moe") & (predictions.domain == "CVD")]
    assert moe_cvd.label.tolist() == PAIRS.label.tolist()  # the MoE scored the domain it knows, pair by pair
    assert results["moe"]["CVD"]["roc_auc"] == pytest.approx(roc_auc_score(moe_cvd.label, moe_cvd.cosine), abs=1e-6)
    assert "| moe |" in (out / "results.md").read_text()
    for metric in ("roc_auc", "f1_max", "mrr", "f1_at_valid_threshold"):  # the macro average: each domain once
        expected = np.mean([results["tfidf"][d][metric] for d in ("CVD", "SKIN")])
        assert results["tfidf"]["mean"][metric] == pytest.approx(expected)
    assert not {"f1_max_threshold", "valid_threshold"} & set(results["tfidf"]["mean"])
    for name in ("hist_moe_CVD.png", "hist_tfidf_SKIN.png", "roc_CVD.png", "roc_SKIN.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_sentence_transformers_models_keep_their_own_pooling(tiny_bert, tmp_path):
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models
    from transformers import AutoModel, AutoTokenizer

    transformer = models.Transformer(tiny_bert, max_seq_length=32)
    cls_pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode="cls")
    SentenceTransformer(modules=[transformer, cls_pooling]).save(str(tmp_path / "st"))
    encoder = torch_encoder(tmp_path / "st", 32, 2)
    assert isinstance(encoder, SentenceTransformerEncoder)
    texts = ["heart failure with preserved ejection fraction", "asthma"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(tiny_bert)(**tokenizer(texts, padding=True, return_tensors="pt")).last_hidden_state
    np.testing.assert_allclose(encoder.encode(texts, "CVD"), hidden[:, 0].numpy(), atol=1e-5)  # CLS, not the mean
    assert isinstance(torch_encoder(tiny_bert, 32, 2), encoders.TransformerEncoder)  # no modules.json


def test_models_run_on_the_accelerator_when_there_is_one(tiny_bert, monkeypatch):
    from moebert.encoders.loader import load_encoder
    from moebert.encoders.options import EncodingOptions

    monkeypatch.setattr(device.torch.cuda, "is_available", lambda: True)
    assert device.default_device() == "cuda"
    assert EncodingOptions.from_args(eval_script.parse_args(["--model", "tfidf"])).device == "cuda"
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # told to stay on the CPU (accelerate launch's CPU processes)
    assert device.default_device() == "cpu"
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    monkeypatch.setattr(device.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device.torch.backends.mps, "is_available", lambda: False)
    assert device.default_device() == "cpu"
    meta = load_encoder(tiny_bert, EncodingOptions(max_seq_length=32, device="meta"))  # any device but the CPU
    assert meta.model.device.type == "meta"


def write_pair_folders(root, domains, frame):
    for domain in domains:
        (root / domain).mkdir(parents=True)
        for split in ("train", "valid", "test"):
            frame.to_csv(root / domain / f"{split}.csv", index=False)
    return [f"--dataset={d}={root / d}" for d in domains]


def test_bootstrap_gains_are_written_and_printed(tmp_path, capsys):
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    rows = [(" ".join(rng.choice(words, 6)), " ".join(rng.choice(words, 6)), int(rng.integers(0, 2))) for _ in range(40)]
    datasets = write_pair_folders(tmp_path / "data", ("CVD", "SKIN"), pd.DataFrame(rows, columns=["a", "b", "label"]))
    out = tmp_path / "out"
    args = ["--model", "tfidf", "--model", "again=tfidf", *datasets, "--output_dir", str(out), "--bootstrap", "50"]
    results = eval_script.main([*args, "--reference", "tfidf"])
    gain = json.loads((out / "results.json").read_text())["again"]["bootstrap"]
    assert gain["resamples"] == 50 and gain["vs tfidf"]["mean"]["roc_auc"] == {"gain": 0.0, "low": 0.0, "high": 0.0}
    assert gain["vs tfidf"]["SKIN"]["roc_auc"] == {"gain": 0.0, "low": 0.0, "high": 0.0}
    printed = capsys.readouterr().out
    assert "bootstrap" not in results["tfidf"] and "| again vs tfidf | +0.000 [+0.000, +0.000]" in printed
    assert "| roc_auc gain per domain (95% CI) | CVD | SKIN |" in printed
    with pytest.raises(SystemExit):
        eval_script.main([*args, "--reference", "nosuchmodel"])
    assert "--reference 'nosuchmodel' is not one of the models" in capsys.readouterr().err


def test_bf16_is_used_only_where_it_is_native(monkeypatch, tmp_path, caplog):
    caplog.set_level("INFO", logger="moebert")
    cpuinfo = tmp_path / "cpuinfo"
    real_path = device.Path
    monkeypatch.setattr(device, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p))
    cpuinfo.write_text("flags\t\t: fpu sse2 avx2 avx512f\n")
    assert not device.bf16_is_native("cpu")
    with device.autocast("cpu", "auto"):
        assert not device.torch.is_autocast_enabled("cpu")
    assert "encoding in fp32: bf16 is not native on cpu" in caplog.text
    cpuinfo.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert device.bf16_is_native("cpu")
    with device.autocast("cpu", "auto"):
        assert device.torch.is_autocast_enabled("cpu") and device.torch.get_autocast_dtype("cpu") == device.torch.bfloat16
    with device.autocast("cpu", "fp32"):
        assert not device.torch.is_autocast_enabled("cpu")


def test_ranking_metrics_by_hand_with_excluded_candidates():
    similarity = np.array([[1.0, 0.2, 0.9, 0.5], [0.2, 1.0, 0.1, 0.3], [0.9, 0.1, 1.0, 0.4], [0.5, 0.3, 0.4, 1.0]])
    partners = {0: {1}, 1: {0, 3}}
    metrics = ranking_metrics(similarity, partners, recall_ks=(1, 2))
    # query 0 ranks 2, 3, 1: its partner third; query 1 ranks 3, 0, 2: both partners in the first two
    assert metrics["mrr"] == pytest.approx((1 / 3 + 1) / 2)
    assert (metrics["recall_at_1"], metrics["recall_at_2"]) == (pytest.approx(0.25), pytest.approx(0.5))
    excluded = np.where([[True, True, False, False]] * 4, similarity, -np.inf)  # query 0 may not see papers 2, 3
    assert ranking_metrics(excluded, {0: {1}})["mrr"] == 1.0


def test_model_folders_never_run_their_own_code_unasked(tiny_moe, tmp_path, capsys):
    import torch

    from moebert.encoders.options import EncodingOptions
    from moebert.models.builder import build_model
    from moebert.search.index import index_encoder

    model, tokenizer = tiny_moe
    folder, marker = tmp_path / "moe", tmp_path / "planted-code-ran"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    planted = f"open({str(marker)!r}, 'w').write('ran')\n"
    for name in ("modeling_moebert.py", "configuration_moebert.py"):
        (folder / name).write_text(planted)  # a folder from someone else, with code of their own
    # evaluation, search and continued training all load it with this project's classes
    encoder = torch_encoder(folder, 32, 2)
    search_encoder, _, _ = index_encoder(str(folder), EncodingOptions(max_seq_length=32, device="cpu"))
    continued, _ = build_model(str(folder), ["CVD"])  # as train.py does
    assert not marker.exists()
    batch = tokenizer(model.prepend_domain_token(["asthma attack"], "COPD"), return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).pooler_output.numpy()
        torch.testing.assert_close(continued.eval()(**batch).pooler_output, torch.from_numpy(expected))
    for loaded in (encoder, search_encoder):
        np.testing.assert_allclose(loaded.encode(["asthma attack"], "COPD"), expected, atol=1e-6)

    # a model that is no MoE-BERT and needs its own code: refused in one line that names the flag
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({"model_type": "planted", "auto_map": {
        "AutoConfig": "configuration_planted.PlantedConfig", "AutoModel": "modeling_planted.PlantedModel"}}))
    for name in ("configuration_planted.py", "modeling_planted.py"):
        (custom / name).write_text(planted)
    with pytest.raises(RemoteCodeError, match="pass --trust_remote_code if you trust it"):
        torch_encoder(custom, 32, 2)
    datasets = write_pair_folders(tmp_path / "data", ("CVD",), PAIRS)
    with pytest.raises(SystemExit):
        eval_script.main(["--model", f"x={custom}", *datasets, "--output_dir", str(tmp_path / "out")])
    assert "needs Python code from its own repository" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("capability, device, native", [((7, 0), "cuda", False), ((7, 5), "cuda:1", False),
                                                         ((8, 0), "cuda", True), ((9, 0), "cuda:1", True)])
def test_cuda_bf16_is_native_from_ampere_on_the_device_used(monkeypatch, capability, device, native):
    from moebert import device as device_module

    asked = []
    monkeypatch.setattr(device_module.torch.cuda, "get_device_capability", lambda d: asked.append(d) or capability)
    monkeypatch.setattr(device_module.torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # counts emulation
    assert device_module.bf16_is_native(device) is native
    assert asked == [device_module.torch.device(device)]
