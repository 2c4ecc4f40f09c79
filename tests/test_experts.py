"""Released domain experts that compose: expert files record the shared weights they were trained on and their
calibration; a model composed from experts that different people published computes what each publisher's did."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TEXTS, torch_encoder, python_path
from fake_hub import FakeHub
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_train import run_train

from modeling_moebert import MoEBertModel


def hub_env(hub, tmp_path, offline=False) -> dict:
    return os.environ | {"HF_HUB_OFFLINE": "1" if offline else "0", "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_test",
                         "HF_HOME": str(tmp_path / "hf-home")}


def run(command: list[str], env: dict, cwd=ROOT) -> subprocess.CompletedProcess:
    command = [str(ROOT / c) if c.endswith(".py") else c for c in command]
    result = subprocess.run([sys.executable, *command], env=env | {"PYTHONPATH": python_path()}, capture_output=True,
                            text=True, timeout=300, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def publish(base, tiny_data, tmp_path, hub, domain: str, *extra) -> str:
    """A group's model: the base upcycled into its own domain, its experts alone trained a few steps, pushed."""
    out = tmp_path / f"publisher-{domain}"
    run(["train.py", "--recipe", "quick", "--model_name_or_path", base, "--dataset", f"{domain}={tiny_data / domain}",
         "--output_dir", str(out), "--per_device_train_batch_size", "4", "--max_seq_length", "32", "--max_train_steps",
         "3", "--learning_rate", "1e-2", "--no-select_experts_per_domain", "--push_to_hub", "--hub_model_id",
         f"lab/{domain.lower()}", "--seed", str(len(domain)), *extra], hub_env(hub, tmp_path))  # the domains' data
    # are alike (tiny_data): another seed (dropout, batches) makes their experts differ
    return str(out)


def vectors(folder, domain: str, texts=TEXTS) -> np.ndarray:
    return torch_encoder(folder, 32).encode(texts, domain)


def test_experts_published_by_two_groups_compose_into_one_model_that_computes_what_each_did(tiny_bert, tiny_data,
                                                                                        tmp_path):
    with FakeHub() as hub:
        publishers = {domain: publish(tiny_bert, tiny_data, tmp_path, hub, domain) for domain in ("CVD", "COPD")}
        composed = tmp_path / "composed"
        printed = run(["-m", "moebert", "compose", "--base", tiny_bert, "--expert", "lab/cvd:CVD", "--expert",
                       "lab/copd:COPD", "--output_dir", str(composed), "--push_to_hub", "--hub_model_id", "lab/both"],
                      hub_env(hub, tmp_path)).stdout
        pushed = hub.repos["lab/both"]["files"]
        commits = {repo: hub.repos[repo]["commit"] for repo in ("lab/cvd", "lab/copd")}
    assert f"CVD: lab/cvd@{commits['lab/cvd']}, shared weights same" in printed
    for domain, publisher in publishers.items():  # each domain: exactly its publisher's vectors and probabilities
        np.testing.assert_allclose(vectors(composed, domain), vectors(publisher, domain), atol=1e-6, rtol=0)
        theirs, ours = (torch_encoder(folder, 32) for folder in (publisher, composed))
        for cosine in (-0.2, 0.3, 0.9):
            assert ours.cocitation_probability(cosine, domain) == theirs.cocitation_probability(cosine, domain)
    assert not np.allclose(vectors(composed, "CVD"), vectors(composed, "COPD"), atol=1e-3)  # two experts
    config = json.loads((composed / "config.json").read_text())
    assert config["domains"] == ["CVD", "COPD"] and set(config["calibration"]["parameters"]) == {"CVD", "COPD"}
    assert config["expert_sources"]["COPD"] == {"source": "lab/copd", "revision": commits["lab/copd"],
                                                "shared_weights": "same"}
    card = (composed / "README.md").read_text()
    assert f"| CVD | lab/cvd | {commits['lab/cvd']} | same |" in card and "other shared weights" not in card
    assert {"README.md", "config.json", "model.safetensors", "modeling_moebert.py", "experts_moebert.py",
            "configuration_moebert.py", "tokenizer.json", "modules.json", "config_sentence_transformers.json",
            "experts/CVD.safetensors", "experts/COPD.safetensors"} <= set(pushed)
    prompts = json.loads(pushed["config_sentence_transformers.json"])["prompts"]
    assert prompts == {"CVD": "[CVD] ", "COPD": "[COPD] "}
    # AutoModel and sentence-transformers with trust_remote_code, from the pushed files alone
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    pulled = tmp_path / "pulled"
    for name, content in pushed.items():
        (pulled / name).parent.mkdir(parents=True, exist_ok=True)
        (pulled / name).write_bytes(content)
    st = SentenceTransformer(str(pulled), trust_remote_code=True, device="cpu")
    st.max_seq_length = 32
    np.testing.assert_allclose(st.encode(TEXTS, prompt_name="COPD", normalize_embeddings=False),
                               vectors(publishers["COPD"], "COPD"), atol=1e-5, rtol=0)
    auto = AutoModel.from_pretrained(pulled, trust_remote_code=True)
    assert float(auto.cocitation_probability(0.5, "CVD")) == pytest.approx(
        torch_encoder(publishers["CVD"], 32).cocitation_probability(0.5, "CVD"), abs=1e-6)


def test_a_hub_expert_loads_by_repo_id_from_the_cache_when_offline(tiny_bert, tiny_data, tmp_path):
    with FakeHub() as hub:
        publisher = publish(tiny_bert, tiny_data, tmp_path, hub, "CVD")
        online = tmp_path / "online"
        run(["-m", "moebert", "compose", "--base", tiny_bert, "--expert", "lab/cvd:CVD", "--output_dir", str(online)],
            hub_env(hub, tmp_path))
        hub.fail = True  # the Hub is gone: what was downloaded is served from the cache
        offline = tmp_path / "offline"
        run(["-m", "moebert", "compose", "--base", tiny_bert, "--expert", "lab/cvd:CVD", "--output_dir", str(offline)],
            hub_env(hub, tmp_path, offline=True))
    np.testing.assert_allclose(vectors(offline, "CVD"), vectors(publisher, "CVD"), atol=1e-6, rtol=0)
    with pytest.raises(SystemExit, match=r"no expert file experts/ONC.safetensors in lab/cvd"):
        from moebert.__main__ import main

        main(["compose", "--base", tiny_bert, "--expert", "lab/cvd:ONC", "--output_dir", str(tmp_path / "x")])


def test_an_expert_trained_with_all_weights_is_refused_unless_allowed_and_the_card_says_so(tiny_bert, tiny_data,
                                                                                         tmp_path, capsys):
    from moebert.__main__ import main

    all_weights = tmp_path / "all-weights"
    run_train(tiny_bert, tiny_data, all_weights, "--max_train_steps", "2", "--learning_rate", "1e-2",
              "--no-train_experts_only", "--no-reuse_stem_states", "--no-select_experts_per_domain")
    expert = str(all_weights / "experts" / "CVD.safetensors")
    model, tokenizer = MoEBertModel.from_bert(tiny_bert, domains=["CVD", "COPD"], moe_layers="top2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"were trained on other shared weights than this model's: its publisher trained "
                                         r"the shared weights too .*experts-only recipe.*allow_other_shared_weights=True"):
        model.load_expert(expert)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # refused: nothing changed
    with pytest.raises(SystemExit, match="trained on other shared weights"):
        main(["compose", "--base", tiny_bert, "--expert", expert, "--output_dir", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()
    main(["compose", "--base", tiny_bert, "--expert", expert, "--output_dir", str(tmp_path / "allowed"),
          "--allow_other_shared_weights"])
    assert "CVD: " in capsys.readouterr().out
    card = (tmp_path / "allowed" / "README.md").read_text()
    assert "**The experts of CVD were trained on other shared weights than this model's**" in card
    assert json.loads((tmp_path / "allowed" / "config.json").read_text())["expert_sources"]["CVD"]["shared_weights"] == "other"
    def domain_token_row(folder):  # trained with all weights, so the publisher's row is not the upcycled [CLS] copy
        loaded = MoEBertModel.from_pretrained(folder)
        return loaded.get_input_embeddings().weight[loaded.config.domain_token_ids[loaded.config.domain_index("CVD")]]
    assert not torch.equal(domain_token_row(all_weights), model.get_input_embeddings().weight[model.config.domain_token_ids[0]])
    assert torch.equal(domain_token_row(tmp_path / "allowed"), domain_token_row(all_weights))
    other_base = tmp_path / "other-base"  # another base, the same layout
    bert = MoEBertModel.from_bert(tiny_bert, domains=["CVD"], moe_layers="top2")[0]
    with torch.no_grad():
        bert.embeddings.word_embeddings.weight[5] += 1.0
    bert.save_expert("CVD", other_base / "CVD.safetensors")
    metadata = safe_open(other_base / "CVD.safetensors", framework="pt").metadata()
    save_file(load_file(other_base / "CVD.safetensors"), other_base / "renamed.safetensors",
              metadata=metadata | {"base_model_name_or_path": "org/another-bert"})
    with pytest.raises(ValueError, match=r"upcycled from another base \(org/another-bert, this model a local folder\)"):
        model.load_expert(other_base / "renamed.safetensors")


def test_an_older_expert_file_loads_with_a_notice_of_what_cannot_be_checked(tiny_moe, tiny_bert, tmp_path, caplog):
    model, tokenizer = tiny_moe
    model.config.calibration = {"method": "platt", "fitted_on": "valid", "parameters": {"CVD": [6.0, -3.0]}}
    model.save_expert("CVD", tmp_path / "CVD.safetensors")
    metadata = safe_open(tmp_path / "CVD.safetensors", framework="pt").metadata()
    assert json.loads(metadata["calibration"])["parameters"] == [6.0, -3.0]
    old = {k: v for k, v in metadata.items() if k not in ("shared_weights", "calibration", "max_seq_length")}
    save_file(load_file(tmp_path / "CVD.safetensors"), tmp_path / "old.safetensors", metadata=old)
    fresh, fresh_tokenizer = MoEBertModel.from_bert(tiny_bert, domains=["COPD"])
    assert fresh.load_expert(tmp_path / "old.safetensors", tokenizer=fresh_tokenizer) == "CVD"
    [notice] = [r.getMessage() for r in caplog.records if "fingerprint" in r.getMessage()]
    assert "records no fingerprint of the shared weights its experts were trained on (an older file)" in notice
    assert fresh.config.expert_sources["CVD"]["shared_weights"] == "not recorded"
    with pytest.raises(ValueError, match="no calibration for domain 'CVD'"):  # an older file brings none
        fresh.cocitation_probability(0.5, "CVD")
    fresh.load_expert(tmp_path / "CVD.safetensors")  # the new file: its calibration comes with it
    assert float(fresh.cocitation_probability(0.5, "CVD")) == pytest.approx(float(torch.sigmoid(torch.tensor(0.0))))
    assert fresh.config.expert_sources["CVD"]["shared_weights"] == "same"


def host(hub, folder, repo_id: str) -> str:
    """A local model folder served by the fake Hub as `repo_id`."""
    hub.repos[repo_id] = {"private": False, "files": {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()},
                          "commit": "b" * 40}
    return repo_id


def test_training_one_new_domain_on_a_published_model_changes_and_pushes_only_that_expert(tiny_bert, tiny_data,
                                                                                         tmp_path):
    with FakeHub() as hub:
        published = publish(host(hub, tiny_bert, "lab/tiny-bert"), tiny_data, tmp_path, hub, "CVD")
        contribution = tmp_path / "contribution"
        run(["train.py", "--recipe", "quick", "--model_name_or_path", published, "--dataset",
             f"COPD={tiny_data / 'COPD'}", "--output_dir", str(contribution), "--per_device_train_batch_size", "4",
             "--max_seq_length", "32", "--max_train_steps", "2", "--learning_rate", "1e-2",
             "--no-select_experts_per_domain", "--push_to_hub", "--hub_model_id", "lab/copd-contribution",
             "--push_experts", "trained", "--hub_strategy", "end"], hub_env(hub, tmp_path))  # COPD's expert is
        # copied from the base the published model names, lab/tiny-bert, downloaded
        pushed = set(hub.repos["lab/copd-contribution"]["files"])
    assert {"experts/COPD.safetensors", "model.safetensors", "config.json"} <= pushed
    assert "experts/CVD.safetensors" not in pushed  # the other domain's expert is not this group's to publish
    np.testing.assert_allclose(vectors(contribution, "CVD"), vectors(published, "CVD"), atol=1e-6, rtol=0)
    before, after = (json.loads((folder / "config.json").read_text())["calibration"]["parameters"]
                     for folder in (tmp_path / "publisher-CVD", contribution))
    assert after["CVD"] == before["CVD"] and "COPD" in after  # the untrained domain keeps its calibration
