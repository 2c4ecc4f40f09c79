"""Bases of every kind MoE-BERT upcycles besides BERT (whose own tests are test_modeling's): a tiny random MPNet and
RoBERTa here, and the real all-mpnet-base-v2 where its PyPI parts are installed (benchmarks/requirements-mpnet.txt)."""

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DOMAINS, TEXTS, collection, requires, requires_faiss, torch_encoder
from test_modeling import LOAD_IN_FRESH_PROCESS, _perturb_experts
from test_onnx import torch_vectors
from test_search import run_index, run_query
from test_train import run_train
from transformers import AutoConfig, AutoModel, MPNetModel, RobertaModel

from benchmarks.naive_routing import naive_routing
from modeling_moebert import MoEBertModel
from moebert import names
from moebert.__main__ import main as moebert_command
from moebert.encoders.export.onnx_runtime import OnnxEncoder
from moebert.loading import max_seq_length_of
from moebert.models.composition import compose

DENSE = {"tiny_mpnet": MPNetModel, "tiny_roberta": RobertaModel}


def mpnet_installed() -> bool:
    try:
        metadata.distribution(names.MPNET_PARTS[0])
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture(params=sorted(DENSE))
def tiny_base(request) -> tuple[str, type]:
    """(folder, the dense class of its kind) for each kind."""
    return request.getfixturevalue(request.param), DENSE[request.param]


def tagged_batch(model, tokenizer, domains=DOMAINS):
    """The five texts (of unequal lengths: padding) each after its domain token; input ids and mask only."""
    batch = tokenizer(model.prepend_domain_token(TEXTS, domains), padding=True, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@torch.no_grad()
def test_an_upcycled_base_of_each_kind_computes_what_the_base_computes(tiny_base):
    folder, dense_class = tiny_base
    model, tokenizer = MoEBertModel.from_bert(folder, domains=DOMAINS, moe_layers="upper")
    assert model.config.base_model_type == dense_class.config_class.model_type
    base = AutoModel.from_pretrained(folder).eval()
    assert type(base) is dense_class
    base.resize_token_embeddings(model.config.vocab_size, mean_resizing=False)  # the domain tokens' rows too
    base.get_input_embeddings().weight.copy_(model.get_input_embeddings().weight)
    model.eval()
    batch = tagged_batch(model, tokenizer)
    assert batch["attention_mask"].min() == 0  # padding is in the batch
    expected = base(**batch).last_hidden_state
    torch.testing.assert_close(model(**batch).last_hidden_state, expected, atol=1e-5, rtol=0)
    for domain in range(len(DOMAINS)):  # every expert, chosen by id
        output = model(**batch, domain_ids=torch.full((len(TEXTS),), domain))
        torch.testing.assert_close(output.last_hidden_state, expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_a_forward_from_stem_states_and_an_extracted_expert_compute_the_full_forward(tiny_base, tmp_path):
    folder, dense_class = tiny_base
    model, tokenizer = MoEBertModel.from_bert(folder, domains=DOMAINS, moe_layers="top2")
    _perturb_experts(model)
    model.eval()
    batch = tagged_batch(model, tokenizer)
    expected = model(**batch).last_hidden_state
    stem = model.stem_states(**batch)
    from_stem = model(stem_states=stem, attention_mask=batch["attention_mask"], domain_ids=torch.arange(len(DOMAINS)))
    torch.testing.assert_close(from_stem.last_hidden_state, expected, atol=1e-5, rtol=0)
    stem_names = {name for name, _ in model.stem_parameters()}  # what a stored stem state's fingerprint covers
    assert ("encoder.relative_attention_bias.weight" in stem_names) == (dense_class is MPNetModel)
    one = tagged_batch(model, tokenizer, ["PARA"] * len(TEXTS))
    dense = model.extract_expert("PARA")
    assert type(dense) is dense_class  # no custom code needed to run it
    own_fields = set(dense_class.config_class().to_dict())
    assert set(dense.config.to_dict()) - own_fields <= {"architectures", "dtype"}  # no other kind's (type_vocab_size)
    dense.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(**one).last_hidden_state, model(**one).last_hidden_state, atol=1e-5, rtol=0)


@torch.no_grad()
def test_texts_are_cut_to_the_tokens_the_positions_of_each_kind_allow(tiny_base):
    folder, _ = tiny_base  # 130 position embeddings, counted on from the padding id (MPNet's 1, this RoBERTa's 0)
    model, tokenizer = MoEBertModel.from_bert(folder, domains=["CVD"])
    length = model.config.sequence_length()
    assert length == 130 - (tokenizer.pad_token_id + 1) and model.config.max_seq_length is None  # no ST settings
    long = tokenizer([" ".join(TEXTS * 10)], truncation=True, max_length=length, return_tensors="pt")
    assert long["input_ids"].shape[1] == length
    model.eval()(input_ids=long["input_ids"], attention_mask=long["attention_mask"], domain_ids=torch.tensor([0]))
    longer = tokenizer([" ".join(TEXTS * 10)], truncation=True, max_length=length + 1, return_tensors="pt")
    with pytest.raises((IndexError, RuntimeError)):  # one token more has no position embedding
        model(input_ids=longer["input_ids"], attention_mask=longer["attention_mask"], domain_ids=torch.tensor([0]))


@torch.no_grad()
def test_token_routing_of_each_kind_sends_every_token_to_its_own_expert(tiny_base):
    folder, _ = tiny_base
    model, tokenizer = MoEBertModel.from_bert(folder, domains=DOMAINS, routing_mode="token", moe_layers="top2")
    _perturb_experts(model)
    model.eval()
    batch = tokenizer(TEXTS[:2], padding=True, return_tensors="pt")
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    per_token = torch.randint(0, len(DOMAINS), batch["input_ids"].shape, generator=torch.Generator().manual_seed(0))
    routed = model(**batch, token_type_ids=per_token).last_hidden_state  # RoBERTa's one segment: ids are not segments
    with naive_routing():
        torch.testing.assert_close(routed, model(**batch, token_type_ids=per_token).last_hidden_state, atol=1e-5, rtol=0)
    all_skin = torch.full_like(per_token, DOMAINS.index("SKIN"))
    dense = model.extract_expert("SKIN")
    torch.testing.assert_close(model(**batch, token_type_ids=all_skin).last_hidden_state,
                               dense(**batch).last_hidden_state, atol=1e-5, rtol=0)


@torch.no_grad()
def test_a_domain_added_from_the_base_of_each_kind_computes_what_the_base_computes(tiny_base):
    folder, dense_class = tiny_base
    model, tokenizer = MoEBertModel.from_bert(folder, domains=["CVD", "COPD"], moe_layers="top2")
    _perturb_experts(model)  # trained experts: the new one must come from the base's feed-forward blocks
    model.add_domain("ONC", tokenizer, init_from=folder)
    base = AutoModel.from_pretrained(folder).eval()
    base.resize_token_embeddings(model.config.vocab_size, mean_resizing=False)  # the domain tokens' rows too
    base.get_input_embeddings().weight.copy_(model.get_input_embeddings().weight)
    batch = tagged_batch(model, tokenizer, ["ONC"] * len(TEXTS))
    expected = base(**batch).last_hidden_state
    torch.testing.assert_close(model.eval()(**batch).last_hidden_state, expected, atol=1e-5, rtol=0)
    cvd = tagged_batch(model, tokenizer, ["CVD"] * len(TEXTS))
    assert not torch.allclose(model(**cvd).last_hidden_state, base(**cvd).last_hidden_state, atol=1e-3)


@torch.no_grad()
def test_a_reloaded_model_of_each_kind_computes_what_was_saved(tiny_base, tmp_path):
    folder, _ = tiny_base
    model, tokenizer = MoEBertModel.from_bert(folder, domains=DOMAINS, moe_layers="top2")
    _perturb_experts(model)
    model.eval().save_pretrained(tmp_path)
    batch = tagged_batch(model, tokenizer)  # no token_type_ids: RoBERTa's embeddings read its buffer of them
    reloaded = MoEBertModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(**batch).last_hidden_state, model(**batch).last_hidden_state, atol=0, rtol=0)
    positions = reloaded.embeddings.position_ids  # not saved: rebuilt on load, as the base's own class does
    assert torch.equal(positions[0], torch.arange(positions.shape[-1]))


@pytest.fixture(params=["tiny", "all-mpnet-base-v2"])
def mpnet_base(request) -> str:
    """The tiny random MPNet, and the real all-mpnet-base-v2 where its PyPI parts are installed."""
    if request.param == "tiny":
        return request.getfixturevalue("tiny_mpnet")
    if not mpnet_installed():
        pytest.skip("all-mpnet-base-v2 is not installed (benchmarks/requirements-mpnet.txt)")
    return names.local_copy(names.MPNET_BASE_MODEL_ID)


@torch.no_grad()
def test_an_mpnet_moe_round_trips_through_automodel_and_sentence_transformers(mpnet_base, tmp_path):
    from sentence_transformers import SentenceTransformer

    model, tokenizer = MoEBertModel.from_bert(mpnet_base, domains=DOMAINS, moe_layers="top2")
    _perturb_experts(model)
    model.eval().save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["base_model_type"] == "mpnet"
    tagged = model.prepend_domain_token(TEXTS, DOMAINS)
    expected = model(**tokenizer(tagged, padding=True, return_tensors="pt"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", LOAD_IN_FRESH_PROCESS, str(tmp_path), *tagged], check=True, env=env,
                   cwd=tmp_path)  # the Hub files alone, by trust_remote_code
    fresh = torch.load(tmp_path / "fresh.pt")
    torch.testing.assert_close(fresh["hidden"], expected.last_hidden_state, atol=0, rtol=0)
    st_model = SentenceTransformer(str(tmp_path), trust_remote_code=True, device="cpu")
    for i, domain in enumerate(DOMAINS):  # each domain's prompt: its token, its expert
        by_prompt = st_model.encode([TEXTS[i]], prompt_name=domain, convert_to_tensor=True)
        torch.testing.assert_close(by_prompt[0], expected.pooler_output[i], atol=1e-5, rtol=0)


@torch.no_grad()
def test_an_mpnet_expert_file_loads_into_another_model_and_composes_with_its_base(tiny_mpnet, tmp_path):
    trained, tokenizer = MoEBertModel.from_bert(tiny_mpnet, domains=["CVD", "COPD"])
    _perturb_experts(trained)
    trained.save_expert("CVD", tmp_path / "CVD.safetensors")
    batch = tagged_batch(trained, tokenizer, ["CVD"] * len(TEXTS))
    expected = trained.eval()(**batch).pooler_output
    other, _ = MoEBertModel.from_bert(tiny_mpnet, domains=["CVD", "COPD"])
    assert not torch.allclose(other.eval()(**batch).pooler_output, expected, atol=1e-4)
    assert other.load_expert(tmp_path / "CVD.safetensors") == "CVD"
    torch.testing.assert_close(other(**batch).pooler_output, expected, atol=1e-6, rtol=0)
    composed, composed_tokenizer = compose(tiny_mpnet, [str(tmp_path / "CVD.safetensors")])
    assert composed.config.base_model_type == "mpnet" and composed.config.domains == ["CVD"]
    composed_batch = tagged_batch(composed, composed_tokenizer, ["CVD"] * len(TEXTS))
    torch.testing.assert_close(composed.eval()(**composed_batch).pooler_output, expected, atol=1e-6, rtol=0)


def saved_trained_moe(base: str, folder: Path) -> str:
    """A MoE of `base` over CVD and COPD in its top two layers, whose experts differ as after training, saved."""
    model, tokenizer = MoEBertModel.from_bert(base, domains=["CVD", "COPD"], moe_layers="top2")
    _perturb_experts(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_an_mpnet_moe_exports_to_onnx_with_each_domains_vectors(tiny_mpnet, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOEBERT_CACHE", str(tmp_path / "cache"))
    folder = saved_trained_moe(tiny_mpnet, tmp_path / "moe")
    out = moebert_command(["export", "--model", folder, "--output_dir", str(tmp_path / "fp32"), "--quantize", "none"])
    assert "it runs unfused (correct, slower); onnxruntime fuses no attention with MPNet's relative position bias" in (
        capsys.readouterr().err)
    encoder = OnnxEncoder(out, 64, 8)
    for domain in ("CVD", "COPD"):
        assert np.abs(encoder.encode(TEXTS, domain) - torch_vectors(folder, TEXTS, domain, 64)).max() < 1e-4
    assert np.abs(encoder.encode(TEXTS, "CVD") - torch_vectors(folder, TEXTS, "COPD", 64)).max() > 1e-3


@requires("openvino", "the OpenVINO backend needs openvino and nncf")
def test_an_mpnet_moe_exports_to_openvino_with_each_domains_vectors(tiny_mpnet, tmp_path, monkeypatch):
    from moebert.encoders.export.cache import load_export_encoder

    monkeypatch.setenv("MOEBERT_CACHE", str(tmp_path / "cache"))
    folder = saved_trained_moe(tiny_mpnet, tmp_path / "moe")
    out = moebert_command(["export", "--model", folder, "--output_dir", str(tmp_path / "ov"), "--runtime", "openvino",
                           "--quantize", "none"])
    encoder = load_export_encoder(str(out), 64, 8)
    for domain in ("CVD", "COPD"):
        assert np.abs(encoder.encode(TEXTS, domain) - torch_vectors(folder, TEXTS, domain, 64)).max() < 1e-4


@requires_faiss
def test_an_mpnet_moe_indexes_and_queries_a_collection_each_paper_through_its_domains_expert(tiny_mpnet, tmp_path):
    folder = saved_trained_moe(tiny_mpnet, tmp_path / "moe")
    papers = collection(4)
    papers.loc[len(papers)] = {"id": "twin", "text": papers["text"][0], "domain": "COPD"}  # CVD-0's text, as COPD
    papers.to_csv(tmp_path / "papers.csv", index=False)
    manifest = run_index(tmp_path / "papers.csv", folder, tmp_path / "index")
    assert manifest["papers"] == 9 and manifest["domains"] == ["CVD", "COPD"]
    for domain, expected in (("CVD", "CVD-0"), ("COPD", "twin")):  # the same text: each domain's vector its own
        [result] = run_query(tmp_path / "index", "--text", papers["text"][0], "--domain", domain, "--top_k", "1")
        assert result["hits"][0]["id"] == expected and result["hits"][0]["score"] == pytest.approx(1, abs=1e-5)


def test_a_training_length_past_the_bases_positions_is_refused_with_the_longest_it_takes(tiny_mpnet, tiny_data,
                                                                                         tmp_path):
    with pytest.raises(SystemExit, match=r"^error: --max_seq_length 129: this mpnet base takes at most 128 tokens "
                       r"\(its position embeddings\); give --max_seq_length 128 or less$"):
        run_train(tiny_mpnet, tiny_data, tmp_path / "out", "--max_seq_length", "129")


def test_the_length_of_a_moe_loaded_by_its_own_code_counts_its_bases_positions(tiny_mpnet, tmp_path):
    model, tokenizer = MoEBertModel.from_bert(tiny_mpnet, domains=["CVD"])
    model.save_pretrained(tmp_path)
    (tmp_path / "sentence_bert_config.json").unlink()  # its length there is the same fallback's: read the config
    config = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)  # the Hub file's class, not ours
    assert max_seq_length_of(str(tmp_path), config) == 128  # 130 positions, two of them never a token's


def test_train_py_picks_the_mpnet_architecture_by_itself_and_trains_its_experts(tiny_mpnet, tiny_data, tmp_path):
    out = tmp_path / "out"
    run_train(tiny_mpnet, tiny_data, out, "--max_train_steps", "3", "--learning_rate", "1e-2", "--eval_steps", "3")
    trained = torch_encoder(out, 32)
    assert trained.config.base_model_type == "mpnet"
    assert trained.config.domains == ["CVD", "COPD"]
    base, tokenizer = MoEBertModel.from_bert(tiny_mpnet, domains=["CVD", "COPD"], moe_layers="top2")
    state = json.loads((out / "training_state.json").read_text())
    assert state["args"]["reuse_stem_states"] is True  # the quick recipe's stored stem states: MPNet's bias rebuilt
    moved = [name for name, tensor in AutoModel.from_pretrained(out, trust_remote_code=True).state_dict().items()
             if ".experts." in name and not torch.equal(tensor, base.state_dict()[name])]
    assert moved  # some domain kept an expert that training changed


# ---------------------------------------------------------------------------------- the real all-mpnet-base-v2


@pytest.mark.skipif(not mpnet_installed(),
                    reason="all-mpnet-base-v2 is not installed (benchmarks/requirements-mpnet.txt)")
@torch.no_grad()
def test_the_upcycled_all_mpnet_base_v2_gives_its_sentence_transformers_vectors_for_every_domain():
    from sentence_transformers import SentenceTransformer

    folder = names.local_copy(names.MPNET_BASE_MODEL_ID)
    assert names.public_base_name(folder) == names.MPNET_BASE_MODEL_ID  # saved files name it by its Hub id
    model, tokenizer = MoEBertModel.from_bert(folder, domains=["CVD", "COPD"], moe_layers="top2")
    expected = SentenceTransformer(folder, device="cpu").encode(TEXTS, convert_to_tensor=True)  # unit vectors
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    for domain in (0, 1):
        pooled = model.eval()(**batch, domain_ids=torch.full((len(TEXTS),), domain)).pooler_output
        torch.testing.assert_close(torch.nn.functional.normalize(pooled), expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------- the offline copy of its Hub id


class FakePart:
    """An installed distribution holding one piece of a split zip, as the PyPI parts do."""

    def __init__(self, root: Path, index: int, piece: bytes, version: str = "0.0.1"):
        self.root, self.name, self.version = root, f"part_{index:03d}/input/all-mpnet-base-v2.zip.{index:03d}", version
        (root / self.name).parent.mkdir(parents=True, exist_ok=True)
        (root / self.name).write_bytes(piece)
        self.files = [Path(f"part_{index:03d}/__init__.py"), Path(self.name)]

    def locate_file(self, name):
        return self.root / name


def fake_parts(root: Path, weights: bytes, version: str = "0.0.1") -> dict:
    """The five parts of a zip holding one folder, all-mpnet-base-v2/, with a config and these weights."""
    archive = root / "whole.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("all-mpnet-base-v2/config.json", '{"model_type": "mpnet"}')
        zipped.writestr("all-mpnet-base-v2/model.safetensors", weights)
    data = archive.read_bytes()
    pieces = [data[i * len(data) // 5:(i + 1) * len(data) // 5] for i in range(5)]
    return {name: FakePart(root / "site", i + 1, piece, version)
            for i, (name, piece) in enumerate(zip(names.MPNET_PARTS, pieces))}


def test_the_mpnet_hub_id_loads_from_its_installed_parts_joined_and_unpacked_once(tmp_path, monkeypatch):
    parts = fake_parts(tmp_path, b"weights" * 1000)
    monkeypatch.setenv("MOEBERT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(metadata, "distribution", lambda name: parts[name])
    folder = names.local_copy(names.MPNET_BASE_MODEL_ID)
    assert Path(folder) == tmp_path / "cache" / "all-mpnet-base-v2"
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors", "parts.json"]  # the zip's one folder
    assert (Path(folder) / "model.safetensors").read_bytes() == b"weights" * 1000
    assert names.public_base_name(folder) == names.public_name(folder) == names.MPNET_BASE_MODEL_ID
    for part in parts.values():  # unpacked once: the pieces are not read again
        (part.root / part.name).unlink()
    assert names.local_copy(names.MPNET_BASE_MODEL_ID) == folder

    newer = fake_parts(tmp_path, b"newer weights" * 1000, version="0.0.2")  # parts upgraded: unpacked again
    monkeypatch.setattr(metadata, "distribution", lambda name: newer[name])
    assert names.local_copy(names.MPNET_BASE_MODEL_ID) == folder
    assert (Path(folder) / "model.safetensors").read_bytes() == b"newer weights" * 1000

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", not_installed)
    assert names.local_copy(names.MPNET_BASE_MODEL_ID) == names.MPNET_BASE_MODEL_ID  # the Hub id, loaded from the Hub


def test_processes_launched_together_unpack_the_mpnet_parts_once(tmp_path, monkeypatch):
    parts = fake_parts(tmp_path, b"weights" * 1000)
    monkeypatch.setenv("MOEBERT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(metadata, "distribution", lambda name: parts[name])
    unpacked = []

    def slow_unpack(archive, into):  # wide open for a second caller to step in
        unpacked.append(into)
        time.sleep(0.5)
        shutil_unpack(archive, into)

    shutil_unpack = shutil.unpack_archive
    monkeypatch.setattr(shutil, "unpack_archive", slow_unpack)
    with ThreadPoolExecutor(3) as pool:  # each its own lock file handle, as separate processes have
        folders = list(pool.map(lambda _: names.local_copy(names.MPNET_BASE_MODEL_ID), range(3)))
    assert len(set(folders)) == 1 and len(unpacked) == 1
    assert (Path(folders[0]) / "model.safetensors").read_bytes() == b"weights" * 1000


def test_parts_that_hold_no_piece_of_the_zip_are_refused_with_the_fix(tmp_path, monkeypatch):
    parts = fake_parts(tmp_path, b"weights")
    parts[names.MPNET_PARTS[2]].files = None  # installed without a RECORD
    monkeypatch.setenv("MOEBERT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(metadata, "distribution", lambda name: parts[name])
    with pytest.raises(OSError, match="do not hold one piece of the zip each: reinstall them"):
        names.local_copy(names.MPNET_BASE_MODEL_ID)
