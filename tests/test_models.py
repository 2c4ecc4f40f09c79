"""The one model builder: a BERT upcycled (its base named by a Hub id or by nothing, its length from the base), a
MoE-BERT loaded and grown by the domains it lacks, or refused in one line when it cannot be grown."""

import json

import pytest
import torch
from conftest import TEXTS

from modeling_moebert import MoEBertModel
from moebert.models.builder import build_model
import train


def test_a_bert_is_upcycled_with_its_length_and_a_moebert_is_loaded_and_grown_from_its_base(tiny_bert, tmp_path):
    model, tokenizer = build_model(tiny_bert, ["CVD", "COPD"], moe_layers="top2", num_experts=None)
    assert model.config.moe_layers == [2, 3] and model.config.num_experts == 2
    assert model.config.max_seq_length == 128  # no sentence-transformers settings: the base's position limit
    assert model.config.base_model_name_or_path == tiny_bert  # in memory: where new experts are copied from
    shared, _ = build_model(tiny_bert, ["CVD", "COPD"], num_experts=1)
    assert shared.config.num_experts == 1
    model.save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    config["base_model_name_or_path"] = tiny_bert  # as a user who names the base's folder for growing it would
    (tmp_path / "moe" / "config.json").write_text(json.dumps(config))
    grown, grown_tokenizer = build_model(str(tmp_path / "moe"), ["CVD", "ONC"])
    assert grown.config.domains == ["CVD", "COPD", "ONC"]
    base = MoEBertModel.from_bert(tiny_bert, domains=["ONC"], moe_layers="top2")[0]  # the base's feed-forward blocks
    torch.testing.assert_close(grown.expert_state(2), base.expert_state(0), atol=0, rtol=0)
    same, _ = build_model(str(tmp_path / "moe"), ["ONC"], add_missing_domains=False)
    assert same.config.domains == ["CVD", "COPD"]


def test_a_moebert_that_names_no_base_is_refused_in_one_line_when_it_must_grow(tiny_bert, tiny_data, tmp_path):
    model, tokenizer = MoEBertModel.from_bert(tiny_bert, domains=["CVD"])
    model.save_pretrained(tmp_path / "moe")  # upcycled from a local folder: saved files name no base
    tokenizer.save_pretrained(tmp_path / "moe")
    with pytest.raises(ValueError, match=r"names no base model to copy the experts of the new domains \['COPD'\] from"):
        build_model(str(tmp_path / "moe"), ["CVD", "COPD"])
    with pytest.raises(SystemExit, match=r"^error: --model_name_or_path .*moe: it names no base model .* write the "
                       r"base's Hub id or folder into its config.json as base_model_name_or_path$"):
        train.main(["--model_name_or_path", str(tmp_path / "moe"), "--dataset", f"CVD={tiny_data / 'CVD'}",
                    "--dataset", f"COPD={tiny_data / 'COPD'}", "--output_dir", str(tmp_path / "out")])
    loaded, loaded_tokenizer = build_model(str(tmp_path / "moe"), ["CVD"])  # nothing to grow: it loads
    batch = loaded_tokenizer([f"[CVD] {TEXTS[0]}"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**batch).pooler_output, model.eval()(**batch).pooler_output)
