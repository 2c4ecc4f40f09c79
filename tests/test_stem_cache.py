"""Stored stem states (moebert.training.stem_states): exact reuse, never stale, and the cheaper training step they give."""

import numpy as np
import pytest
import torch
from conftest import DOMAINS, TEXTS

from modeling_moebert import MoEBertModel
from moebert.training import stem_states
from moebert.training.batches import make_collate
from moebert.training.losses import backward_step
from moebert.training.selection import BestExperts, BestModel
from moebert.training.setup import train_only
from moebert.training.state import CheckpointError
import train

INPUTS = [(d, t) for d in range(3) for t in TEXTS]  # the same texts under 3 domain tokens: 15 different stems


@pytest.fixture
def upper_moe(tiny_bert):
    model, tokenizer = MoEBertModel.from_bert(tiny_bert, domains=DOMAINS, moe_layers="upper")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # experts that differ, as after training
        for name, parameter in model.named_parameters():
            if ".experts." in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.eval(), tokenizer


def open_states(model, tokenizer, folder, inputs=INPUTS, max_seq_length=32, mixed_precision="no"):
    return stem_states.StemStates.open_or_build(model, tokenizer, inputs, max_seq_length, folder, mixed_precision, 4)


def test_stored_states_are_what_a_forward_pass_computes(upper_moe, tmp_path):
    from moebert.encoders.transformer import StemEncoder, TransformerEncoder

    model, tokenizer = upper_moe
    stems = open_states(model, tokenizer, tmp_path)
    for domain, text in INPUTS:
        tokens = tokenizer(f"{model.config.domain_tokens[domain]} {text}", return_tensors="pt")
        with torch.no_grad():
            expected = model.stem_states(tokens["input_ids"], tokens["attention_mask"])[0]
        stored = stems.batch([(domain, text)])
        assert stored["attention_mask"].sum() == tokens["input_ids"].shape[1]
        torch.testing.assert_close(stored["stem_states"][0], expected, atol=1e-5, rtol=0)
    # the encoder training scores valid with gives the full forward pass's embeddings
    full = TransformerEncoder(model, tokenizer, max_seq_length=32, batch_size=2)
    from_stems = StemEncoder(model, stems, batch_size=2)
    for domain in DOMAINS[:3]:
        np.testing.assert_allclose(from_stems.encode(TEXTS, domain), full.encode(TEXTS, domain), atol=1e-5, rtol=0)


def test_states_are_stored_in_fp32_mapped_from_disk_and_computed_in_the_precision_asked(upper_moe, tmp_path):
    model, tokenizer = upper_moe
    full = open_states(model, tokenizer, tmp_path / "fp32")
    assert isinstance(full.values, np.memmap) and full.values.dtype == np.float32  # read from disk, not into memory
    reference = full.batch(INPUTS)["stem_states"]
    for precision in ("bf16", "fp16"):  # autocast on the model's device: CPU autocast takes both
        stored = open_states(model, tokenizer, tmp_path / precision, mixed_precision=precision)
        assert stored.values.dtype == np.float32
        states = stored.batch(INPUTS)["stem_states"]
        torch.testing.assert_close(states, reference, atol=0.1, rtol=0.05)  # close to fp32,
        assert not torch.equal(states, reference)  # but computed in the lower precision
    bf16, fp16 = (open_states(model, tokenizer, tmp_path / p, mixed_precision=p).batch(INPUTS)["stem_states"]
                  for p in ("bf16", "fp16"))
    assert not torch.equal(bf16, fp16)  # each in its own


def test_truncation_follows_the_training_length(upper_moe, tmp_path):
    model, tokenizer = upper_moe
    stems = open_states(model, tokenizer, tmp_path, max_seq_length=8)
    assert stems.batch(INPUTS)["stem_states"].shape[1] == 8


def test_a_changed_stem_data_length_or_precision_never_reuses_stale_states(upper_moe, tmp_path, monkeypatch):
    model, tokenizer = upper_moe
    builds = []
    write = stem_states.write_states
    monkeypatch.setattr(stem_states, "write_states", lambda *args: builds.append(args[2].name) or write(*args))

    first = open_states(model, tokenizer, tmp_path)
    assert len(builds) == 1
    assert open_states(model, tokenizer, tmp_path).folder == first.folder and len(builds) == 1  # reused
    with torch.no_grad():  # an expert is not part of the stem: its states stay valid
        model.encoder.layer[model.config.moe_layers[0]].experts[0].output.weight.add_(1.0)
    assert open_states(model, tokenizer, tmp_path).folder == first.folder and len(builds) == 1

    changes = {
        "data": lambda: open_states(model, tokenizer, tmp_path, INPUTS[:-1] + [(2, TEXTS[-1] + " Revised.")]),
        "domain of a text": lambda: open_states(model, tokenizer, tmp_path, INPUTS[:-1] + [(3, TEXTS[-1])]),
        "length": lambda: open_states(model, tokenizer, tmp_path, max_seq_length=16),
        "precision": lambda: open_states(model, tokenizer, tmp_path, mixed_precision="bf16"),
    }
    for change, reopen in changes.items():
        assert reopen().folder != first.folder and len(builds) == 1 + list(changes).index(change) + 1, change
    with torch.no_grad():  # a stem weight (the embeddings)
        model.embeddings.word_embeddings.weight[tokenizer.cls_token_id] += 0.5
    changed = open_states(model, tokenizer, tmp_path)
    assert changed.folder != first.folder and len(builds) == len(changes) + 2
    cls_row = changed.batch([INPUTS[0]])["stem_states"][0, 0]
    assert not torch.allclose(cls_row, first.batch([INPUTS[0]])["stem_states"][0, 0])
    assert not list(tmp_path.glob(".tmp-*"))  # every build finished under its final name


@pytest.mark.parametrize("cut", ["states", "offsets"])
def test_a_cut_short_state_file_is_refused_with_the_fix(upper_moe, tmp_path, cut):
    model, tokenizer = upper_moe
    folder = open_states(model, tokenizer, tmp_path).folder
    if cut == "states":  # a copy or a disk that ran out of room: the memory-mapped rows end early
        states = folder / "states.npy"
        with open(states, "r+b") as f:
            f.truncate(states.stat().st_size - 1000)
    else:
        np.save(folder / "offsets.npy", np.load(folder / "offsets.npy")[:-2])
    with pytest.raises(ValueError, match=r"^stem states in .* are cut short or do not match their inputs: delete the "
                       r"folder to rebuild it\.$"):
        open_states(model, tokenizer, tmp_path)


def pair_batch(model, tokenizer, stems=None):
    rows = [{"a": TEXTS[i], "b": TEXTS[(i + 1) % 5], "domain_id": i % 2, "id_a": i, "id_b": (i + 1) % 5,
             "hard": [TEXTS[(i + 3) % 5]], "id_hard": [(i + 3) % 5]} for i in range(4)]
    return make_collate(model, tokenizer, 32, stems)(rows)


@pytest.mark.parametrize("specialist", [None, "CVD"])
def test_the_step_from_stem_states_has_the_plain_steps_gradients(upper_moe, tmp_path, specialist):
    """A MoE trains its experts from states stored up to them; a specialist trains the layers that hold them whole,
    from states stored at the first one's input."""
    from accelerate import Accelerator

    model, tokenizer = upper_moe  # eval mode: no dropout, so both steps are deterministic
    args = train.parse_args(["--recipe", "quick", "--no-mask_false_negatives", "--stem_cache_dir", str(tmp_path)]
                            + (["--specialist", specialist] if specialist else []))
    train_only(model, train.trained_weights(args))
    stems = open_states(model, tokenizer, tmp_path, INPUTS[:10])
    accelerator = Accelerator(cpu=True)

    def gradients(batch):
        model.zero_grad()
        loss = backward_step(model, batch, accelerator, None, args.scale)
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain = gradients(pair_batch(model, tokenizer))
    stem_loss, from_stems = gradients(pair_batch(model, tokenizer, stems))
    assert set(pair_batch(model, tokenizer, stems)["a"]) == {"stem_states", "attention_mask"}
    torch.testing.assert_close(stem_loss, plain_loss, atol=1e-6, rtol=1e-5)
    assert plain and plain.keys() == from_stems.keys()
    first = min(model.config.moe_layers)
    if specialist:  # the first trained layer's attention trains too, nothing below it does
        assert any(n.startswith(f"encoder.layer.{first}.attention.") for n in plain)
        assert all(int(n.split(".")[2]) >= first for n in plain if n.startswith("encoder.layer."))
        assert not any(n.startswith("embeddings.") for n in plain)
    else:
        assert all(".experts." in n for n in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(from_stems[name], grad, atol=1e-6, rtol=1e-4, msg=name)


# ------------------------------------------------------------------------------------------------ per-domain selection


def expert_tensors(model, domain):
    return {k: v.clone() for k, v in model.expert_state(model.config.domain_index(domain)).items()}


def test_each_domain_keeps_its_best_expert_and_the_rest_is_untouched(upper_moe):
    model, _ = upper_moe
    domains = model.config.domains
    best = BestExperts("pooled_roc_auc")  # a pooled metric selects by its per-domain form
    assert best.metric == "roc_auc"
    shared = {k: v.clone() for k, v in model.state_dict().items() if ".experts." not in k}

    def train_a_little():
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if ".experts." in name:
                    parameter.add_(0.01)

    scores = {0: [0.5, 0.5, 0.5, 0.5, 0.5], 10: [0.6, 0.4, 0.5, 0.55, 0.5], 20: [0.55, 0.45, 0.7, 0.6, 0.5]}
    improved = {0: domains, 10: ["CVD", "PARA"], 20: ["SKIN", "PARA"]}
    experts_at = {}
    for step, values in scores.items():
        experts_at[step] = {d: expert_tensors(model, d) for d in domains}
        assert best.update(model, {d: {"roc_auc": v} for d, v in zip(domains, values)}, step) == improved[step]
        train_a_little()

    restored = BestExperts("roc_auc")
    restored.load_state_dict(best.state_dict())  # travels with a checkpoint
    restored.assemble(model)
    chosen = {"CVD": 10, "COPD": 0, "SKIN": 20, "PARA": 20, "AUTO": 0}  # ties keep the earlier expert
    assert {d: b["step"] for d, b in best.best.items()} == chosen
    for domain, step in chosen.items():
        for key, tensor in expert_tensors(model, domain).items():
            torch.testing.assert_close(tensor, experts_at[step][domain][key], atol=0, rtol=0, msg=f"{domain} {key}")
    for key, tensor in model.state_dict().items():
        if ".experts." not in key:
            torch.testing.assert_close(tensor, shared[key], atol=0, rtol=0, msg=key)

    partial = BestExperts("roc_auc")  # a domain without valid scores (no valid pairs) is skipped, not an error
    assert partial.update(model, {"CVD": {"roc_auc": 0.5}}, 0) == ["CVD"] and list(partial.experts) == ["CVD"]
    with pytest.raises(CheckpointError, match="--metric_for_best_model roc_auc"):
        BestExperts("f1_max").load_state_dict(best.state_dict())


def test_the_best_model_is_the_first_to_score_highest_and_patience_counts_the_evaluations_since():
    best = BestModel("pooled_roc_auc", patience=2)  # pooled: all domains' pairs together ("all")
    assert best.update({"all": {"roc_auc": 0.7}, "mean": {"roc_auc": 0.9}}, step=0)
    assert (best.value, best.step, best.stale, best.should_stop()) == (0.7, 0, 0, False)
    assert not best.update({"all": {"roc_auc": 0.7}}, step=10)  # a tie keeps the earlier model
    assert (best.step, best.stale, best.should_stop()) == (0, 1, False)
    assert not best.update({"mean": {"roc_auc": 0.95}}, step=20)  # no pooled score is no improvement
    assert (best.step, best.stale, best.should_stop()) == (0, 2, True)
    assert best.update({"all": {"roc_auc": 0.8}}, step=30) and (best.value, best.step, best.stale) == (0.8, 30, 0)
    assert best.state_dict() == {"metric": "pooled_roc_auc", "value": 0.8, "step": 30, "stale": 0}  # in training_state.json

    resumed = BestModel("pooled_roc_auc", patience=2)
    resumed.load_state_dict(best.state_dict())
    assert resumed.state_dict() == best.state_dict()
    with pytest.raises(CheckpointError, match="--metric_for_best_model pooled_roc_auc"):
        BestModel("roc_auc", patience=2).load_state_dict(best.state_dict())

    unscored = BestModel("roc_auc", patience=2)  # an evaluation without the metric counts once toward patience
    assert not unscored.update({"mean": {"f1_max": 0.5}}, step=0) and not unscored.should_stop()

    mean = BestModel("roc_auc", patience=None)  # the mean over domains; no patience: never stops early
    assert mean.update({"all": {"roc_auc": 0.9}, "mean": {"roc_auc": 0.6}}, step=0) and mean.value == 0.6
    assert not any(mean.update({}, step) for step in range(1, 20)) and not mean.should_stop()


def test_a_specialists_stem_ends_at_the_input_of_its_first_trained_layer_and_depends_on_nothing_above(upper_moe):
    model, tokenizer = upper_moe
    first = min(model.config.moe_layers)
    train_only(model, "moe_layers")
    tokens = tokenizer([f"{model.config.domain_tokens[0]} {TEXTS[0]}"], return_tensors="pt")
    with torch.no_grad():
        states = model.stem_states(tokens["input_ids"], tokens["attention_mask"])
        hidden = model(**tokens, output_hidden_states=True).hidden_states[first]  # the input of layer `first`
    torch.testing.assert_close(states, hidden, atol=1e-6, rtol=0)
    assert not [name for name, _ in model.stem_parameters() if name.startswith(f"encoder.layer.{first}.")]
    train_only(model, "experts")  # a MoE's stem goes on through that layer's attention
    assert [name for name, _ in model.stem_parameters() if name.startswith(f"encoder.layer.{first}.attention.")]
