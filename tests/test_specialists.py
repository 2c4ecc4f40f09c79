"""Strategy 1, one specialist per domain (train.py --specialist), and a folder of specialists as one model to eval.py."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import eval as eval_script
import train
from moebert.encoders.interface import UnknownDomainError, embed
from moebert.encoders.loader import load_encoder
from moebert.encoders.options import EncodingOptions
from moebert.encoders.specialists import specialist_folders
from test_train import run_train


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_a_specialist_trains_its_domain_alone_and_its_experts_layers_whole(tiny_bert, tiny_data, tmp_path):
    out = tmp_path / "specialists" / "COPD"
    state = run_train(tiny_bert, tiny_data, out, "--specialist", "COPD", "--max_train_steps", "3", "--eval_steps", "1",
                      "--learning_rate", "5e-2")
    config = json.loads((out / "config.json").read_text())
    assert config["domains"] == ["COPD"] and config["num_experts"] == 1
    assert list(state.metrics["COPD"]) and "CVD" not in state.metrics  # scored on its own domain only
    assert set(config["calibration"]["parameters"]) == {"COPD"}
    # against the same upcycling untrained: the layers with experts changed whole, nothing below them moved
    untrained = run_train(tiny_bert, tiny_data, tmp_path / "untrained", "--specialist", "COPD", "--max_train_steps",
                          "1", "--learning_rate", "0")
    before, after = weights(tmp_path / "untrained"), weights(out)
    first = min(config["moe_layers"])
    changed = {name for name in after if not torch.equal(after[name], before[name])}
    assert untrained.step == 1 and changed
    assert any(f"layer.{first}.attention." in name for name in changed)
    assert all(name.startswith("encoder.layer.") and int(name.split(".")[2]) >= first for name in changed)
    # the model kept is the best on valid, as --load_best_model_at_end keeps it
    assert state.best["step"] is not None


def test_a_specialist_of_an_unknown_domain_or_with_a_shared_expert_is_refused(tiny_bert, tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"--specialist SKIN: not one of the domains \['CVD', 'COPD'\]"):
        run_train(tiny_bert, tiny_data, tmp_path / "out", "--specialist", "SKIN", "--max_train_steps", "1")
    with pytest.raises(SystemExit):
        train.parse_args(["--specialist", "CVD", "--shared_expert"])
    assert "--shared_expert has nothing to share" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--specialist", "CVD", "--select_experts_per_domain"])
    assert "add --no-select_experts_per_domain" in capsys.readouterr().err
    args = train.parse_args(["--specialist", "CVD"])
    assert (args.select_experts_per_domain, args.load_best_model_at_end) == (False, True)
    assert args.output_dir == "outputs/specialists/CVD" and train.trained_weights(args) == "moe_layers"


@pytest.fixture
def two_specialists(tiny_bert, tiny_data, tmp_path):
    folder = tmp_path / "specialists"
    for domain in ("CVD", "COPD"):
        run_train(tiny_bert, tiny_data, folder / domain, "--specialist", domain, "--max_train_steps", "2",
                  "--learning_rate", "5e-2")
    return folder


def test_a_folder_of_specialists_is_one_model_each_domain_through_its_own(two_specialists, tiny_data, tmp_path):
    options = EncodingOptions(device="cpu")
    encoder = load_encoder(str(two_specialists), options)
    assert encoder.routes_by_domain and encoder.config.domains == ["COPD", "CVD"]  # by folder name
    assert set(encoder.config.calibration["parameters"]) == {"CVD", "COPD"}
    texts = ["Heart failure after infarction.", "Airflow limitation in smokers."]
    for domain in ("CVD", "COPD"):
        alone = load_encoder(str(two_specialists / domain), options)
        np.testing.assert_array_equal(embed(encoder, texts, [domain] * 2), embed(alone, texts, [domain] * 2))
        assert encoder.cocitation_probability(0.5, domain) == alone.cocitation_probability(0.5, domain)
    with pytest.raises(UnknownDomainError, match="not one of the model's domains"):
        embed(encoder, texts, ["SKIN", "CVD"])
    results = eval_script.main(["--model", f"specialists={two_specialists}", "--dataset", f"CVD={tiny_data / 'CVD'}",
                                "--dataset", f"COPD={tiny_data / 'COPD'}", "--output_dir", str(tmp_path / "eval")])
    assert {"CVD", "COPD"} <= set(results["specialists"]) and "specialists (calibrated)" in results


def test_two_specialists_of_one_domain_are_refused(two_specialists):
    (two_specialists / "CVD-again").mkdir()
    (two_specialists / "CVD-again" / "config.json").write_text((two_specialists / "CVD" / "config.json").read_text())
    with pytest.raises(ValueError, match="two specialists of domain 'CVD'"):
        specialist_folders(two_specialists)
    assert specialist_folders(two_specialists / "CVD") is None  # a model folder is a model, not a set


def test_the_comparison_shares_its_step_budget_between_specialists_by_their_train_pairs():
    from benchmarks.compare_strategies import specialist_steps

    steps = specialist_steps({"big": 600, "mid": 297, "small": 3}, 750)
    assert steps == {"big": 500, "mid": 248, "small": 2} and sum(steps.values()) == 750
    assert specialist_steps({"a": 1000, "tiny": 1}, 10) == {"a": 10, "tiny": 1}  # every domain trains at least once
    # the recipe's domain sampling: shares by pairs to the power alpha (sqrt: 40 : 10 : 5 of 550 steps)
    assert specialist_steps({"big": 1600, "mid": 100, "small": 25}, 550, alpha=0.5) == {"big": 400, "mid": 100, "small": 50}
