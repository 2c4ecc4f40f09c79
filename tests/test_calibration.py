"""Calibrated co-citation probabilities: the fit, the metrics, and the model that carries them."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TEXTS, requires_faiss

import eval as eval_script
from moebert.evaluation import scoring as evaluation
from moebert.evaluation.calibration import (calibration_metrics, calibration_report, describe, fit_calibration, fit_platt, platt,
                                 reliability_curve)
from modeling_moebert import MoEBertModel


def test_platt_scaling_recovers_known_parameters_and_is_monotone():
    rng = np.random.default_rng(0)
    scores = rng.uniform(-1, 1, 100_000)
    labels = (rng.random(scores.size) < platt(scores, 6.0, -1.0)).astype(int)
    a, b = fit_platt(scores, labels)
    assert a == pytest.approx(6.0, abs=0.15) and b == pytest.approx(-1.0, abs=0.05)
    grid = np.linspace(-1, 1, 101)
    assert (np.diff(platt(grid, a, b)) > 0).all()


def test_expected_calibration_error_and_brier_by_hand():
    probabilities = np.array([0.05, 0.05, 0.95, 0.95, 0.55, 0.55, 0.55, 0.55])
    labels = np.array([0, 0, 1, 0, 1, 1, 0, 0])
    # bins: [0.0, 0.1): predicted 0.05, observed 0 -> 0.05 * 2/8; [0.9, 1.0]: 0.95 vs 0.5 -> 0.45 * 2/8;
    # [0.5, 0.6): 0.55 vs 0.5 -> 0.05 * 4/8
    metrics = calibration_metrics(probabilities, labels)
    assert metrics["ece"] == pytest.approx(0.05 * 0.25 + 0.45 * 0.25 + 0.05 * 0.5)
    assert metrics["brier"] == pytest.approx(np.mean((probabilities - labels) ** 2))
    predicted, observed, pairs = reliability_curve(probabilities, labels)
    assert predicted.tolist() == pytest.approx([0.05, 0.55, 0.95]) and observed.tolist() == [0.0, 0.5, 0.5]
    assert pairs.tolist() == [2, 4, 2]


@pytest.fixture
def calibrated_moe(tiny_moe):
    model, tokenizer = tiny_moe
    model.config.calibration = {"method": "platt", "fitted_on": "valid",
                                "parameters": {"CVD": [8.0, -4.0], "COPD": [5.0, -2.0]}}
    return model, tokenizer


def test_probabilities_are_the_domains_own_map_and_refused_where_there_is_none(calibrated_moe, tiny_bert):
    model, tokenizer = calibrated_moe
    cosines = torch.tensor([0.2, 0.5, 0.9])
    torch.testing.assert_close(model.cocitation_probability(cosines, "CVD"), torch.sigmoid(8 * cosines - 4))
    torch.testing.assert_close(model.cocitation_probability(cosines, "COPD"), torch.sigmoid(5 * cosines - 2))
    with pytest.raises(ValueError, match=r"^no calibration for domain 'SKIN': its expert changed after the calibration was "
                                         r"fitted; fit one with `python eval.py calibrate --model PATH`\.$"):
        model.cocitation_probability(cosines, "SKIN")  # a domain the calibration does not cover
    with pytest.raises(ValueError, match="unknown domain 'ONC'"):
        model.cocitation_probability(cosines, "ONC")
    uncalibrated = MoEBertModel.from_bert(tiny_bert, domains=["CVD"])[0]
    with pytest.raises(ValueError, match=r"^no calibration for domain 'CVD': this model was not calibrated, its "
                                         r"similarities are cosines, not probabilities; fit one with `python eval.py "
                                         r"calibrate --model PATH`\.$"):
        uncalibrated.cocitation_probability(cosines, "CVD")


def test_an_expert_brings_its_domains_calibration_and_an_older_file_takes_the_old_one_away(calibrated_moe, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model, tokenizer = calibrated_moe
    model.save_expert("COPD", tmp_path / "COPD.safetensors")
    model.config.calibration["parameters"]["COPD"] = [1.0, 0.0]
    model.load_expert(tmp_path / "COPD.safetensors")
    assert model.config.calibration["parameters"] == {"CVD": [8.0, -4.0], "COPD": [5.0, -2.0]}  # the file's
    metadata = safe_open(tmp_path / "COPD.safetensors", framework="pt").metadata()
    older = {k: v for k, v in metadata.items() if k != "calibration"}
    save_file(load_file(tmp_path / "COPD.safetensors"), tmp_path / "older.safetensors", metadata=older)
    model.load_expert(tmp_path / "older.safetensors")
    assert set(model.config.calibration["parameters"]) == {"CVD"}  # fitted for the expert replaced: gone
    with pytest.raises(ValueError, match="fit one with `python eval.py calibrate --model PATH`"):
        model.cocitation_probability(0.5, "COPD")


def test_probabilities_survive_save_load_sentence_transformers_and_a_push(calibrated_moe, tmp_path):
    from fake_hub import push_with_save_pretrained
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    model, tokenizer = calibrated_moe
    cosines = torch.linspace(-0.2, 1.0, 7)
    expected = model.cocitation_probability(cosines, "CVD")
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    for name, content in push_with_save_pretrained(tmp_path / "saved", "lab/calibrated", tmp_path).items():
        (tmp_path / "pulled" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pulled" / name).write_bytes(content)
    reloaded = [
        AutoModel.from_pretrained(tmp_path / "saved", trust_remote_code=True),
        SentenceTransformer(str(tmp_path / "saved"), trust_remote_code=True, device="cpu")[0].auto_model,
        AutoModel.from_pretrained(tmp_path / "pulled", trust_remote_code=True),
    ]
    for other in reloaded:
        torch.testing.assert_close(other.cocitation_probability(cosines, "CVD"), expected, atol=0, rtol=0)


def write_domains(root, domains=("CVD", "COPD")):
    """Pairs of random words, other rows in every split and domain: which split a calibration is fitted on shows."""
    rng = np.random.default_rng(0)
    words = ["heart", "lung", "cell", "trial", "dose", "risk", "renal", "liver", "brain", "bone"]
    for domain in domains:
        (root / domain).mkdir(parents=True)
        for split in ("train", "valid", "test"):
            rows = [(" ".join(rng.choice(words, 5)), " ".join(rng.choice(words, 5)), label) for label in [1, 0] * 20]
            pd.DataFrame(rows, columns=["a", "b", "label"]).to_csv(root / domain / f"{split}.csv", index=False)
    return [f"--dataset={d}={root / d}" for d in domains]


def test_eval_reports_raw_and_calibrated_scores_and_calibrate_stores_the_map(calibrated_moe, tmp_path, capsys):
    model, tokenizer = calibrated_moe
    model.config.calibration = None
    model.save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    datasets = write_domains(tmp_path / "data")
    stored = eval_script.main(["calibrate", "--model", str(tmp_path / "moe"), *datasets, "--precision", "fp32",
                              "--device", "cpu"])
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["calibration"] == json.loads(json.dumps(stored)) and set(stored["parameters"]) == {"CVD", "COPD"}
    assert "calibration written to" in capsys.readouterr().out

    out = tmp_path / "out"
    results = eval_script.main(["--model", f"moe={tmp_path / 'moe'}", "--model", "tfidf", *datasets, "--device", "cpu",
                               "--output_dir", str(out), "--bootstrap", "20", "--reference", "tfidf"])
    report = results["moe"]["calibration"]
    assert report["fitted_by"] == "eval.py calibrate" and results["tfidf"]["calibration"]["fitted_by"] == "eval.py"
    from moebert.encoders.baselines import TfidfEncoder
    from moebert.data.pairs import load_domain_dataset

    for domain in ("CVD", "COPD"):  # a model without a calibration of its own gets one fitted on valid, not on test
        _, scored = evaluation.evaluate_model(TfidfEncoder(), {domain: load_domain_dataset(str(tmp_path / "data" / domain))},
                                              "test")
        np.testing.assert_allclose(results["tfidf"]["calibration"]["parameters"][domain],
                                   fit_platt(*scored[domain]["valid"]), rtol=1e-6)
        assert not np.allclose(fit_platt(*scored[domain]["valid"]), fit_platt(*scored[domain]["test"]), rtol=1e-2)
    predictions = pd.read_csv(out / "predictions.csv")
    cosines = predictions[(predictions.model == "moe") & (predictions.domain == "CVD")]
    calibrated = predictions[(predictions.model == "moe (calibrated)") & (predictions.domain == "CVD")]
    a, b = stored["parameters"]["CVD"]
    np.testing.assert_allclose(calibrated.cosine, platt(cosines.cosine, a, b), atol=2e-6)  # the stored map, applied
    both = predictions[predictions.model == "moe (calibrated)"]
    pooled = calibration_metrics(both.cosine, both.label)
    assert report["calibrated"]["pooled"]["ece"] == pytest.approx(pooled["ece"], abs=1e-5)
    assert "vs tfidf" in results["moe (calibrated)"]["bootstrap"]
    assert "| moe (eval.py calibrate) |" in (out / "results.md").read_text()
    assert (out / "reliability_moe.png").read_bytes()[:4] == b"\x89PNG"


def test_training_stores_the_calibration_of_the_saved_weights(tiny_bert, tmp_path):
    from conftest import torch_encoder
    from test_train import run_train

    from moebert.data.pairs import load_domain_dataset

    write_domains(tmp_path / "data")
    run_train(tiny_bert, tmp_path / "data", tmp_path / "out", "--max_train_steps", "2")
    encoder = torch_encoder(tmp_path / "out", 32)
    stored = encoder.config.calibration
    assert stored["fitted_on"] == "valid" and set(stored["parameters"]) == {"CVD", "COPD"}
    for domain in ("CVD", "COPD"):
        _, scored = evaluation.evaluate_model(encoder, {domain: load_domain_dataset(str(tmp_path / "data" / domain))}, "valid")
        np.testing.assert_allclose(stored["parameters"][domain], fit_platt(*scored[domain]["valid"]), rtol=1e-3, atol=1e-3)


@requires_faiss
def test_search_prints_the_probability_beside_the_cosine(calibrated_moe, tmp_path, capsys):
    import search

    model, tokenizer = calibrated_moe
    model.save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    papers = pd.DataFrame({"id": ["a", "b", "c"], "text": TEXTS[:3], "domain": ["CVD", "CVD", "COPD"]})
    papers.to_csv(tmp_path / "papers.csv", index=False)
    search.main(["index", "--papers", str(tmp_path / "papers.csv"), "--model", str(tmp_path / "moe"), "--output_dir",
                 str(tmp_path / "index"), "--max_seq_length", "32", "--device", "cpu", "--precision", "fp32"])
    capsys.readouterr()
    (result,) = search.main(["query", "--index", str(tmp_path / "index"), "--text", TEXTS[0], "--domain", "CVD",
                             "--top_k", "3", "--device", "cpu"])
    printed = capsys.readouterr().out
    for hit in result["hits"]:
        if hit["domain"] == "CVD":
            assert hit["probability"] == pytest.approx(float(torch.sigmoid(torch.tensor(8 * hit["score"] - 4))), abs=1e-6)
            assert f"{hit['score']:.4f}  P(co-cited) {hit['probability']:.2f}  {hit['id']}" in printed
        else:  # calibrated on pairs of one domain: no probability across domains
            assert hit["probability"] is None


# raw cosines read as probabilities fall outside [0, 1]: clipped; 1.0 belongs to the top bin
CLIPPED_CASE = ([-0.2, 1.3, 0.95, 0.85], [0, 0, 1, 1])  # as [0, 1, 0.95, 0.85]: bins 0, 9, 9, 8


def test_calibration_metrics_clip_and_bin_by_hand():
    result = calibration_metrics(*CLIPPED_CASE)
    # bin 9: mean 0.975 against 1/2 observed, half the pairs; bin 8: 0.85 against 1, a quarter; bin 0: no gap
    assert result["ece"] == pytest.approx(0.475 * 0.5 + 0.15 * 0.25)
    assert result["brier"] == pytest.approx((1 + 0.05 ** 2 + 0.15 ** 2) / 4)
    predicted, observed, pairs = reliability_curve(*CLIPPED_CASE)
    assert predicted == pytest.approx([0.0, 0.85, 0.975])
    assert observed.tolist() == [0.0, 1.0, 0.5] and pairs.tolist() == [1, 1, 2]


def test_platt_is_the_unregularised_maximum_likelihood_fit():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 15)
    scores = rng.normal(0.4 * labels, 0.3)
    a, b = fit_platt(scores, labels)
    residual = labels - platt(scores, a, b)  # the log-likelihood's gradient vanishes only without a penalty
    assert abs(residual.sum()) < 1e-2 and abs((residual * scores).sum()) < 1e-2  # with scikit-learn's default penalty: 2.0


def test_fit_calibration_skips_a_one_class_domain_and_fits_the_others():
    labels = np.repeat([0, 1], 20)
    scored = {"ONE": {"valid": (np.linspace(0, 1, 4), np.ones(4, dtype=int))},
              "CVD": {"valid": (np.linspace(0, 1, 40), labels)}}
    calibration = fit_calibration(scored, fitted_by="test")
    assert set(calibration) == {"method", "fitted_on", "fitted_by", "parameters"}
    assert (calibration["method"], calibration["fitted_on"], calibration["fitted_by"]) == ("platt", "valid", "test")
    assert list(calibration["parameters"]) == ["CVD"]
    report = calibration_report({"CVD": {"test": (np.linspace(0, 1, 40), labels)}}, "test", calibration)
    assert report["parameters"] == calibration["parameters"] and report["method"] == "platt"
    assert set(report["raw"]["per_domain"]) == set(report["calibrated"]["per_domain"]) == {"CVD"}


def test_a_refit_keeps_the_maps_of_the_domains_it_did_not_score():
    labels = np.repeat([0, 1], 20)
    kept = {"method": "platt", "fitted_on": "valid", "parameters": {"SKIN": [2.0, 1.0], "CVD": [1.0, 0.0], "ONE": [3.0, 0.0]}}
    refit = fit_calibration({"CVD": {"valid": (np.linspace(0, 1, 40), labels)},
                             "ONE": {"valid": (np.linspace(0, 1, 4), np.ones(4, dtype=int))}}, kept=kept)
    assert refit["parameters"]["SKIN"] == [2.0, 1.0]  # its expert did not change
    assert "ONE" not in refit["parameters"]  # scored again, one class only: its old map no longer fits its expert
    assert refit["parameters"]["CVD"] == pytest.approx(list(fit_platt(np.linspace(0, 1, 40), labels)))
    assert kept["parameters"] == {"SKIN": [2.0, 1.0], "CVD": [1.0, 0.0], "ONE": [3.0, 0.0]}  # left as it was


def test_validating_changes_nothing_the_calibration_is_a_step_of_its_own(calibrated_moe, tmp_path):
    from moebert.data.pairs import load_domain_datasets

    model, tokenizer = calibrated_moe
    write_domains(tmp_path / "data")
    before = json.loads(json.dumps(model.config.calibration))
    results, scored = evaluation.validate(model, tokenizer, load_domain_datasets(
        {d: str(tmp_path / "data" / d) for d in ("CVD", "COPD")}), 32, 8)
    assert model.config.calibration == before and set(scored) == {"CVD", "COPD"} and "roc_auc" in results["mean"]
    assert fit_calibration(scored)["parameters"] != before["parameters"]  # what train.py then stores


def test_describe_says_where_the_probability_is_one_half():
    assert describe(0.5, -0.25) == "P(co-cited) = sigmoid(0.500 * cosine -0.250); 0.5 at cosine 0.500"
    assert describe(0.0, 0.3).endswith("; its valid cosines do not rank co-cited pairs higher")
