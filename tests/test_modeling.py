import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DOMAINS, ROOT, TEXTS
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, GPT2Config

from benchmarks.naive_routing import naive_routing
from configuration_moebert import MoEBertConfig
from modeling_moebert import MoEBertLayer, MoEBertModel

# ------------------------------------------------------------------------------------------------ config


def test_config_resolves_moe_layers():
    assert MoEBertConfig(num_hidden_layers=12, moe_layers="all").moe_layers == list(range(12))
    assert MoEBertConfig(num_hidden_layers=12, moe_layers="middle").moe_layers == [6]
    assert MoEBertConfig(num_hidden_layers=6, moe_layers="upper").moe_layers == [3, 4, 5]
    assert MoEBertConfig(num_hidden_layers=12, moe_layers="upper").moe_layers == list(range(6, 12))
    assert MoEBertConfig(num_hidden_layers=6, moe_layers="top2").moe_layers == [4, 5]
    assert MoEBertConfig(num_hidden_layers=6, moe_layers="top8").moe_layers == list(range(6))  # more than there are
    assert MoEBertConfig(num_hidden_layers=12, moe_layers="11,0,5").moe_layers == [0, 5, 11]
    assert MoEBertConfig(num_hidden_layers=12, moe_layers=[3]).moe_layers == [3]
    assert MoEBertConfig().domains == ["general"]  # a config made without domains (as transformers does) has one


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"domains": ["A", "B"], "num_experts": 3}, "num_experts=3 does not fit 2 domains ['A', 'B']: use one expert "
         "per domain (num_experts=2) or a single shared expert (num_experts=1)."),
        ({"domains": ["A", "B", "A"]}, "duplicate domains ['A']: each domain must be named once."),
        ({"domains": []}, "domains is empty: give at least one domain name, e.g. domains=['CVD', 'COPD']."),
        ({"num_hidden_layers": 4, "moe_layers": [1, 4]}, "moe_layers [4] out of range: this model has 4 layers (valid "
         "indices 0..3)."),
        ({"num_hidden_layers": 6, "moe_layers": "top0"}, "moe_layers is empty: name at least one layer, or use 'all' "
         "or 'middle'."),
        ({"moe_layers": "first"}, "moe_layers='first' is not understood: use 'all', 'upper', 'top2', 'middle' or layer "
         "indices such as '0,5,11'."),
        ({"routing_mode": "learned"}, "routing_mode='learned': choose one of ('sentence', 'token')."),
        ({"pooling": "max"}, "pooling='max': choose one of ('mean', 'cls')."),
        ({"domains": ["A", "B"], "domain_tokens": ["[A]"]}, "1 domain_tokens for 2 domains: give one token per domain."),
        ({"domains": ["A", "B"], "domain_token_ids": [5]}, "1 domain_token_ids for 2 domains: one id per domain."),
        ({"domains": ["A"], "calibration": {"parameters": {"B": [1.0, 0.0]}}}, "calibration for unknown domains ['B']: "
         "this model knows ['A']."),
        ({"domains": ["A"], "expert_sources": {"B": "org/model"}}, "expert_sources for unknown domains ['B']: this "
         "model knows ['A']."),
    ],
)
def test_invalid_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        MoEBertConfig(**kwargs)


def test_a_shared_expert_serves_every_domain():
    assert [MoEBertConfig(domains=["A", "B", "C"], num_experts=1).expert_of_domain(i) for i in range(3)] == [0, 0, 0]
    assert [MoEBertConfig(domains=["A", "B", "C"]).expert_of_domain(i) for i in range(3)] == [0, 1, 2]


def test_texts_and_their_domains_must_pair_up():
    config = MoEBertConfig(domains=["A", "B"])
    assert config.prepend_domain_token(["x", "y"], ["B", "A"]) == ["[B] x", "[A] y"]
    with pytest.raises(ValueError):
        config.prepend_domain_token(["x", "y"], ["B"])


def test_config_round_trips_through_dict():
    config = MoEBertConfig(domains=["A", "B"], moe_layers="middle", routing_mode="token", num_hidden_layers=4)
    again = MoEBertConfig.from_dict(config.to_dict())
    assert (again.domains, again.moe_layers, again.routing_mode, again.num_experts) == (["A", "B"], [2], "token", 2)
    sourced = MoEBertConfig(domains=["A"], expert_sources={"A": {"repo": "org/model"}})
    assert MoEBertConfig.from_dict(sourced.to_dict()).expert_sources == {"A": {"repo": "org/model"}}


# ------------------------------------------------------------------------------------------------ upcycling


def _encode(tokenizer, texts, domains=None, model=None):
    if domains is not None:
        texts = model.prepend_domain_token(texts, domains)
    return tokenizer(texts, padding=True, return_tensors="pt")


@torch.no_grad()
def test_upcycled_minilm_reproduces_base_for_every_domain(minilm):
    model, tokenizer = MoEBertModel.from_bert(minilm, domains=DOMAINS)
    base = BertModel.from_pretrained(minilm, add_pooling_layer=False).eval()
    model.eval()
    batch = _encode(tokenizer, TEXTS)
    expected = base(**batch).last_hidden_state
    for domain in range(len(DOMAINS)):
        output = model(**batch, domain_ids=torch.full((len(TEXTS),), domain))
        torch.testing.assert_close(output.last_hidden_state, expected, atol=1e-5, rtol=0)
    # with the domain token in the input, each expert still computes what the base computes on those ids
    base.resize_token_embeddings(len(tokenizer))
    base.get_input_embeddings().weight.data.copy_(model.get_input_embeddings().weight)
    tagged = _encode(tokenizer, TEXTS, DOMAINS, model)
    torch.testing.assert_close(
        model(**tagged).last_hidden_state, base(**tagged).last_hidden_state, atol=1e-5, rtol=0
    )


def test_upcycling_adds_domain_tokens_initialised_from_cls(tiny_moe):
    model, tokenizer = tiny_moe
    ids = tokenizer.convert_tokens_to_ids([f"[{d}]" for d in DOMAINS])
    assert model.config.domain_token_ids == ids
    assert tokenizer.tokenize("[COPD] lung") == ["[COPD]", "lung"]
    weights = model.get_input_embeddings().weight
    assert weights.shape[0] == len(tokenizer)
    for token_id in ids:
        torch.testing.assert_close(weights[token_id], weights[tokenizer.cls_token_id])


@pytest.mark.parametrize("domains, rows", [(DOMAINS, 30528), (DOMAINS + ["ONC", "NEURO"], 30592)])
def test_domain_tokens_fill_a_padded_vocabulary_and_never_shrink_it(tmp_path, minilm, domains, rows):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30528, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)  # 30522 tokens padded to 64 x 477 rows
    base = BertModel(config, add_pooling_layer=False)
    base.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(tmp_path)
    model, tokenizer = MoEBertModel.from_bert(str(tmp_path), domains=domains)
    weights = model.get_input_embeddings().weight
    # 5 tokens fit the 6 spare rows; 7 do not, and the matrix grows to the next multiple of 64
    assert weights.shape[0] == model.config.vocab_size == rows >= len(tokenizer)
    torch.testing.assert_close(weights[:30522], base.get_input_embeddings().weight[:30522], atol=0, rtol=0)
    for token_id in model.config.domain_token_ids:
        torch.testing.assert_close(weights[token_id], weights[tokenizer.cls_token_id], atol=0, rtol=0)


def test_experts_are_independent_tensors(tiny_moe):
    model, tokenizer = tiny_moe
    layer = model.encoder.layer[0]
    pointers = {expert.output.weight.data_ptr() for expert in layer.experts}
    assert len(pointers) == len(DOMAINS)
    before = {i: e.output.weight.detach().clone() for i, e in enumerate(layer.experts)}
    # one optimisation step on CVD data moves only the CVD experts
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model(**_encode(tokenizer, TEXTS[:2], "CVD", model)).pooler_output.sum().backward()
    assert all(e.output.weight.grad is None for e in layer.experts[1:])
    optimizer.step()
    assert not torch.equal(layer.experts[0].output.weight, before[0])
    for i in range(1, len(DOMAINS)):
        assert torch.equal(layer.experts[i].output.weight, before[i])


def test_moe_layers_middle_keeps_other_layers_dense(tiny_bert):
    model, _ = MoEBertModel.from_bert(tiny_bert, domains=DOMAINS, moe_layers="middle")
    kinds = [type(layer).__name__ for layer in model.encoder.layer]
    assert kinds == ["BertLayer", "BertLayer", "MoEBertLayer", "BertLayer"]


def test_from_bert_refuses_other_kinds_and_moebert(tiny_moe, tmp_path):
    model, tokenizer = tiny_moe
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="already a MoE-BERT"):
        MoEBertModel.from_bert(str(tmp_path), domains=["X"])
    GPT2Config().save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="a 'gpt2' model cannot be upcycled: .* model_type one of \\['bert', 'mpnet', 'roberta'\\]"):
        MoEBertModel.from_bert(str(tmp_path / "gpt2"), domains=["X"])


def test_a_saved_tokenizer_is_a_stock_bert_tokenizer(tiny_moe, tmp_path):
    from transformers import BertTokenizer

    model, tokenizer = tiny_moe
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "BertTokenizer"
    stock = BertTokenizer.from_pretrained(tmp_path)  # no custom code, no question asked
    assert stock("[CVD] heart failure")["input_ids"] == tokenizer("[CVD] heart failure")["input_ids"]
    assert stock.convert_tokens_to_ids("[CVD]") == model.config.domain_token_ids[0]


# ------------------------------------------------------------------------------------------------ routing


@torch.no_grad()
def test_domain_token_and_domain_ids_route_the_same(tiny_moe):
    model, tokenizer = tiny_moe
    tagged = _encode(tokenizer, TEXTS, DOMAINS, model)
    by_token = model(**tagged).pooler_output
    by_ids = model(**tagged, domain_ids=torch.arange(len(DOMAINS))).pooler_output
    torch.testing.assert_close(by_token, by_ids)


def _perturb_experts(model, seed=1):
    """Make the experts differ, as after training, so that routing mistakes show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.encoder.layer:
            if isinstance(layer, MoEBertLayer):
                for expert in layer.experts:
                    for p in expert.parameters():
                        p.add_(torch.randn(p.shape, generator=generator) * 0.05)


@torch.no_grad()
def test_mixed_domain_batch_equals_each_example_alone(tiny_moe):
    model, tokenizer = tiny_moe
    _perturb_experts(model)
    tagged = model.prepend_domain_token(TEXTS, DOMAINS)
    batch = model(**tokenizer(tagged, padding=True, return_tensors="pt"))
    for i, text in enumerate(tagged):
        alone = model(**tokenizer([text], return_tensors="pt"))
        length = alone.last_hidden_state.shape[1]
        torch.testing.assert_close(batch.last_hidden_state[i, :length], alone.last_hidden_state[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(batch.pooler_output[i], alone.pooler_output[0], atol=1e-5, rtol=0)
    # and the domains really differ after the perturbation
    assert not torch.allclose(batch.pooler_output[0], model(**_encode(tokenizer, TEXTS[:1], "COPD", model)).pooler_output[0])


@pytest.mark.parametrize("moe_layers", ["all", "upper"])
@torch.no_grad()
def test_a_forward_from_stem_states_equals_the_full_forward(tiny_bert, moe_layers):
    model, tokenizer = MoEBertModel.from_bert(tiny_bert, domains=DOMAINS, moe_layers=moe_layers)
    model.eval()
    _perturb_experts(model)
    batch = tokenizer(model.prepend_domain_token(TEXTS, DOMAINS[::-1]), padding=True, return_tensors="pt")
    full = model(**batch)
    stem = model.stem_states(batch["input_ids"], batch["attention_mask"])
    assert stem.shape == (*batch["input_ids"].shape, model.config.hidden_size)
    domain_ids = torch.arange(len(DOMAINS)).flip(0)  # mixed domains, unsorted: the forward sorts stem rows too
    from_stem = model(stem_states=stem, attention_mask=batch["attention_mask"], domain_ids=domain_ids)
    torch.testing.assert_close(from_stem.last_hidden_state, full.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_stem.pooler_output, full.pooler_output, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="output_hidden_states needs the layers below the stem"):
        model(stem_states=stem, attention_mask=batch["attention_mask"], domain_ids=domain_ids, output_hidden_states=True)
    with pytest.raises(ValueError, match="No domain given"):
        model(stem_states=stem, attention_mask=batch["attention_mask"])
    stem_names = {name for name, _ in model.stem_parameters()}
    first = model.config.moe_layers[0]
    assert f"encoder.layer.{first}.attention.self.query.weight" in stem_names
    assert not any(".experts." in n or n.startswith(f"encoder.layer.{first + 1}.") for n in stem_names)


@torch.no_grad()
def test_grouped_dispatch_runs_each_expert_once_on_its_own_tokens(tiny_moe):
    model, tokenizer = tiny_moe
    batch = _encode(tokenizer, TEXTS[:4], ["CVD", "SKIN", "CVD", "CVD"], model)
    tokens_seen, storages = {}, {}
    layer = model.encoder.layer[1]

    def record(i, inputs):
        tokens_seen.setdefault(i, []).append(inputs[0].shape[:-1].numel())
        storages[i] = inputs[0].untyped_storage().data_ptr()

    hooks = [expert.register_forward_hook(lambda m, args, out, i=i: record(i, args)) for i, expert in enumerate(layer.experts)]
    hooks.append(layer.attention.register_forward_hook(lambda m, args, out: storages.update(attention=out[0].untyped_storage().data_ptr())))
    model(**batch)
    for hook in hooks:
        hook.remove()
    seq_len = batch["input_ids"].shape[1]
    assert tokens_seen == {0: [3 * seq_len], 2: [seq_len]}  # unused experts never run
    # the batch was sorted by domain once: each expert reads a slice of the attention output, no copy per layer
    assert storages[0] == storages[2] == storages["attention"]


@torch.no_grad()
def test_grouped_dispatch_matches_naive_reference(tiny_moe):
    model, tokenizer = tiny_moe
    _perturb_experts(model)
    batch = _encode(tokenizer, TEXTS, ["AUTO", "CVD", "CVD", "PARA", "COPD"], model)
    grouped = model(**batch).last_hidden_state
    with naive_routing():
        reference = model(**batch).last_hidden_state
    torch.testing.assert_close(grouped, reference, atol=1e-5, rtol=0)


@torch.no_grad()
def test_token_routing_uses_token_type_ids(tiny_bert):
    model, tokenizer = MoEBertModel.from_bert(tiny_bert, domains=DOMAINS, routing_mode="token")
    model.eval()
    _perturb_experts(model)
    batch = tokenizer(TEXTS[:2], padding=True, return_tensors="pt")
    generator = torch.Generator().manual_seed(0)
    per_token = torch.randint(0, len(DOMAINS), batch["input_ids"].shape, generator=generator)
    routed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=per_token)
    with naive_routing():
        reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=per_token)
    torch.testing.assert_close(routed.last_hidden_state, reference.last_hidden_state, atol=1e-5, rtol=0)
    # all tokens on one expert = extracting that expert as a dense model
    all_skin = torch.full_like(per_token, DOMAINS.index("SKIN"))
    dense = model.extract_expert("SKIN")
    torch.testing.assert_close(
        model(**batch | {"token_type_ids": all_skin}).last_hidden_state,
        dense(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state,
        atol=1e-5,
        rtol=0,
    )
    with pytest.raises(ValueError, match="Token routing needs domain_ids or token_type_ids"):
        model(input_ids=batch["input_ids"])
    with pytest.raises(ValueError, match="token_type_ids holds unknown domain ids \\[7\\]"):
        model(input_ids=batch["input_ids"], token_type_ids=torch.full_like(per_token, 7))


@torch.no_grad()
def test_token_routing_sends_each_span_of_one_input_to_its_own_expert(tiny_bert):
    # one layer: attention (shared) sees the same input whatever the routing, so each token's output must equal
    # what its own domain's expert gives it when the whole input goes to that expert
    model, tokenizer = MoEBertModel.from_bert(tiny_bert, domains=DOMAINS, routing_mode="token", moe_layers=[0])
    model.encoder.layer = model.encoder.layer[:1]
    model.config.num_hidden_layers = 1
    model.eval()
    _perturb_experts(model)
    batch = tokenizer([TEXTS[0]], [TEXTS[2]], return_tensors="pt")  # [CLS] cardiology [SEP] melanoma [SEP]
    second = batch["token_type_ids"].bool()  # BERT's segments: the second span
    per_token = torch.where(second, DOMAINS.index("SKIN"), DOMAINS.index("CVD"))
    routed = model(**batch, domain_ids=per_token).last_hidden_state
    cvd, skin = (model(**batch, domain_ids=torch.full_like(per_token, DOMAINS.index(d))).last_hidden_state
                 for d in ("CVD", "SKIN"))
    assert not torch.allclose(cvd[second], skin[second], atol=1e-4)  # the experts differ: the checks can fail
    torch.testing.assert_close(routed[~second], cvd[~second], atol=1e-6, rtol=0)
    torch.testing.assert_close(routed[second], skin[second], atol=1e-6, rtol=0)
    # routing by domain_ids leaves token_type_ids their BERT meaning: without them the second span changes
    no_segments = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], domain_ids=per_token)
    assert not torch.allclose(no_segments.last_hidden_state[second], routed[second], atol=1e-6)


@torch.no_grad()
def test_routing_errors_name_the_known_domains(tiny_moe):
    model, tokenizer = tiny_moe
    plain = tokenizer(TEXTS[:2], padding=True, return_tensors="pt")
    with pytest.raises(ValueError, match=r"Sequences \[0, 1\] have no domain token after the first token \(\[CLS\], <s>\).*'\[CVD\]': 'CVD'"):
        model(**plain)
    with pytest.raises(ValueError, match=r"domain_ids holds unknown domain ids \[5\].*4: 'AUTO'"):
        model(**plain, domain_ids=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"domain_ids holds unknown domain ids \[-1\]"):
        model(**plain, domain_ids=torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match=r"expected one domain per sequence"):
        model(**plain, domain_ids=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="unknown domain 'ONC'"):
        model.prepend_domain_token(TEXTS[:1], "ONC")


@torch.no_grad()
def test_shared_expert_model_routes_every_domain_to_one_expert(tiny_bert):
    model, tokenizer = MoEBertModel.from_bert(tiny_bert, domains=DOMAINS, num_experts=1)
    assert len(model.encoder.layer[0].experts) == 1
    model.eval()
    _perturb_experts(model)
    batch = tokenizer(TEXTS[:1], return_tensors="pt")
    outputs = [model(**batch, domain_ids=torch.tensor([d])).pooler_output for d in range(len(DOMAINS))]
    for output in outputs[1:]:
        torch.testing.assert_close(output, outputs[0])


def test_gradient_checkpointing_gives_the_same_gradients(tiny_moe):
    model, tokenizer = tiny_moe
    model.train()
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    batch = _encode(tokenizer, TEXTS[:3], ["CVD", "COPD", "CVD"], model)

    expert = model.encoder.layer[0].experts[1]
    calls = []
    expert.register_forward_hook(lambda *args: calls.append(1))

    def expert_grad():
        calls.clear()
        model.zero_grad()
        model(**batch).pooler_output.pow(2).sum().backward()
        return expert.output.weight.grad.clone(), len(calls)

    plain, plain_calls = expert_grad()
    model.activation_checkpointing_enable()
    checkpointed, checkpointed_calls = expert_grad()
    torch.testing.assert_close(checkpointed, plain)
    assert (plain_calls, checkpointed_calls) == (1, 2)  # the MoE layer was recomputed in the backward pass


# ------------------------------------------------------------------------------------------------ saving, Hub loading

LOAD_IN_FRESH_PROCESS = """
import sys, torch
from transformers import AutoModel, AutoTokenizer
folder, texts = sys.argv[1], sys.argv[2:]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
with torch.no_grad():
    out = model(**tokenizer(texts, padding=True, return_tensors="pt"))
torch.save({"pooled": out.pooler_output, "hidden": out.last_hidden_state, "class": type(model).__name__},
           folder + "/fresh.pt")
"""


@torch.no_grad()
def test_save_and_load_with_automodel_in_a_fresh_process(tiny_moe, tmp_path):
    model, tokenizer = tiny_moe
    _perturb_experts(model)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    names = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "modeling_moebert.py", "configuration_moebert.py"} <= names
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in names)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_moebert.MoEBertConfig",
        "AutoModel": "modeling_moebert.MoEBertModel",
    }
    tagged = model.prepend_domain_token(TEXTS, DOMAINS)
    expected = model(**tokenizer(tagged, padding=True, return_tensors="pt"))

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, "-c", LOAD_IN_FRESH_PROCESS, str(tmp_path), *tagged], check=True, env=env, cwd=tmp_path
    )
    fresh = torch.load(tmp_path / "fresh.pt")
    assert fresh["class"] == "MoEBertModel"
    torch.testing.assert_close(fresh["pooled"], expected.pooler_output, atol=0, rtol=0)
    torch.testing.assert_close(fresh["hidden"], expected.last_hidden_state, atol=0, rtol=0)

    reloaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=True)
    assert reloaded_tokenizer.convert_tokens_to_ids("[PARA]") == model.config.domain_token_ids[3]


@torch.no_grad()
def test_sentence_transformers_gives_the_same_vectors(tiny_moe, tmp_path):
    from sentence_transformers import SentenceTransformer

    model, tokenizer = tiny_moe
    _perturb_experts(model)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    tagged = model.prepend_domain_token(TEXTS, DOMAINS)
    expected = model(**tokenizer(tagged, padding=True, return_tensors="pt")).pooler_output
    st_model = SentenceTransformer(str(tmp_path), trust_remote_code=True, device="cpu")
    vectors = st_model.encode(tagged, convert_to_tensor=True)
    torch.testing.assert_close(vectors, expected, atol=1e-5, rtol=0)
    # a prompt per domain: the same vectors from plain texts
    for i, domain in enumerate(DOMAINS):
        by_prompt = st_model.encode([TEXTS[i]], prompt_name=domain, convert_to_tensor=True)
        torch.testing.assert_close(by_prompt[0], expected[i], atol=1e-5, rtol=0)
    assert st_model.max_seq_length == model.config.max_position_embeddings  # no training length recorded


def test_save_pretrained_with_push_to_hub_sends_the_sentence_transformers_files(tiny_moe, tmp_path):
    from fake_hub import push_with_save_pretrained

    model, _ = tiny_moe
    model.save_pretrained(tmp_path / "local")
    files = push_with_save_pretrained(tmp_path / "local", "lab/moebert-st", tmp_path)
    assert {"config_sentence_transformers.json", "modules.json", "sentence_bert_config.json", "1_Pooling/config.json",
            "model.safetensors", "config.json"} <= set(files)
    prompts = json.loads(files["config_sentence_transformers.json"])["prompts"]
    assert prompts == {d: f"[{d}] " for d in DOMAINS}


def test_sentence_transformers_use_the_training_length(tiny_moe, tmp_path):
    from sentence_transformers import SentenceTransformer

    model, tokenizer = tiny_moe
    model.config.max_seq_length = 32  # what train.py records
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert SentenceTransformer(str(tmp_path), trust_remote_code=True, device="cpu").max_seq_length == 32
    assert AutoModel.from_pretrained(tmp_path, trust_remote_code=True).config.max_seq_length == 32


# ------------------------------------------------------------------------------------------------ experts as units


@torch.no_grad()
def test_extract_expert_is_a_plain_bert_with_the_same_hidden_states(tiny_moe, tmp_path):
    model, tokenizer = tiny_moe
    _perturb_experts(model)
    batch = _encode(tokenizer, TEXTS, "PARA", model)
    expected = model(**batch).last_hidden_state
    dense = model.extract_expert("PARA")
    assert type(dense) is BertModel
    torch.testing.assert_close(dense(**batch).last_hidden_state, expected, atol=1e-5, rtol=0)
    dense.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()  # no custom code needed
    assert type(reloaded) is BertModel
    torch.testing.assert_close(reloaded(**batch).last_hidden_state, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unknown domain 'ONC'"):
        model.extract_expert("ONC")


@torch.no_grad()
def test_add_domain_leaves_existing_domains_untouched(tiny_moe, tiny_bert):
    model, tokenizer = tiny_moe
    _perturb_experts(model)
    batch = _encode(tokenizer, TEXTS, DOMAINS, model)
    before = model(**batch).last_hidden_state

    index = model.add_domain("ONC", tokenizer, init_from="COPD")
    assert index == 5 and model.config.num_experts == 6 and model.config.domains[-1] == "ONC"
    assert all(len(model.encoder.layer[i].experts) == 6 for i in model.config.moe_layers)
    torch.testing.assert_close(model(**_encode(tokenizer, TEXTS, DOMAINS, model)).last_hidden_state, before)
    plain = tokenizer(TEXTS, padding=True, return_tensors="pt")
    onc = model(**plain, domain_ids=torch.full((5,), index)).last_hidden_state
    copd = model(**plain, domain_ids=torch.full((5,), 1)).last_hidden_state
    torch.testing.assert_close(onc, copd)
    assert tokenizer.tokenize("[ONC] tumour")[0] == "[ONC]"

    model.add_domain("NEURO", tokenizer)  # from the base checkpoint
    base = BertModel.from_pretrained(tiny_bert, add_pooling_layer=False).eval()
    neuro = model(**plain, domain_ids=torch.full((5,), 6)).last_hidden_state
    torch.testing.assert_close(neuro, base(**plain).last_hidden_state, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="domain 'CVD' already exists"):
        model.add_domain("CVD", tokenizer)


def test_a_saved_model_names_a_local_base_by_nothing_and_grows_from_a_domain(tiny_moe, tiny_bert, tmp_path,
                                                                            monkeypatch):
    model, tokenizer = tiny_moe
    assert model.config.base_model_name_or_path == tiny_bert  # in memory: where new experts are copied from
    monkeypatch.chdir(Path(tiny_bert).parent)  # even where the folder's name would pass for a relative path
    model.save_pretrained(tmp_path / "saved")
    loaded = MoEBertModel.from_pretrained(tmp_path / "saved")
    assert loaded.config.base_model_name_or_path is None  # published: no folder, nor a name that looks like a Hub id
    with pytest.raises(ValueError, match=r"init_from is needed: this model names no base .*pass init_from=, an "
                       r"existing domain \(CVD, COPD"):
        loaded.add_domain("ONC", tokenizer)
    assert loaded.add_domain("ONC", tokenizer, init_from=tiny_bert) == 5
    assert loaded.add_domain("SURG", tokenizer, init_from="CVD") == 6


@torch.no_grad()
def test_expert_file_round_trip_and_errors(tiny_moe, tiny_bert, tmp_path):
    trained, tokenizer = tiny_moe
    _perturb_experts(trained)
    trained.get_input_embeddings().weight[trained.config.domain_token_ids[2]] += 0.5
    path = tmp_path / "experts" / "SKIN.safetensors"
    trained.save_expert("SKIN", path)
    batch = _encode(tokenizer, TEXTS, "SKIN", trained)
    expected = trained(**batch).last_hidden_state

    fresh, fresh_tokenizer = MoEBertModel.from_bert(tiny_bert, domains=DOMAINS)
    fresh.eval()
    assert not torch.allclose(fresh(**batch).last_hidden_state, expected, atol=1e-4)
    assert fresh.load_expert(path) == "SKIN"
    torch.testing.assert_close(fresh(**batch).last_hidden_state, expected, atol=1e-5, rtol=0)

    # a model without the domain grows it, given a tokenizer
    small, small_tokenizer = MoEBertModel.from_bert(tiny_bert, domains=["CVD"])
    with pytest.raises(ValueError, match="new domain 'SKIN': pass tokenizer="):
        small.load_expert(path)
    small.load_expert(path, tokenizer=small_tokenizer)
    assert small.config.domains == ["CVD", "SKIN"]
    small.eval()
    skin_batch = _encode(small_tokenizer, TEXTS, "SKIN", small)
    torch.testing.assert_close(small(**skin_batch).last_hidden_state, expected, atol=1e-5, rtol=0)

    # refusals: one line each, and the model they were refused by is left exactly as it was
    from safetensors.torch import load_file, save_file

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    foreign = tmp_path / "foreign.safetensors"  # a safetensors file that is no expert file
    save_file({"weight": torch.zeros(2)}, foreign, metadata={"format": "pt"})
    incomplete = tmp_path / "incomplete.safetensors"  # an expert file with one layer's tensors removed
    tensors, metadata = load_file(path), _expert_metadata(path)
    save_file({k: v for k, v in tensors.items() if not k.startswith("layer.3.")}, incomplete, metadata=metadata)
    other_domain = tmp_path / "other.safetensors"
    save_file(tensors, other_domain, metadata=metadata | {"domain": "ONC"})
    middle_only, _ = MoEBertModel.from_bert(tiny_bert, domains=DOMAINS, moe_layers="middle")
    refusals = [
        (fresh, truncated, ValueError, "truncated or corrupt"),
        (fresh, foreign, ValueError, r"is not a MoE-BERT expert file \(metadata format 'pt'\)"),
        (fresh, incomplete, ValueError, r"lacks \['encoder.layer.3.intermediate.dense.bias'.*not a complete expert file"),
        (middle_only, path, ValueError, r"does not fit this model \(moe_layers: file \[0, 1, 2, 3\], model \[2\]"),
        (fresh, other_domain, ValueError, "holds the new domain 'ONC': pass tokenizer="),
        (fresh, tmp_path / "missing.safetensors", FileNotFoundError, "expert file .* not found"),
    ]
    for model, file, error, message in refusals:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        config = model.config.to_dict()
        with pytest.raises(error, match=message):
            model.load_expert(file)
        assert model.config.to_dict() == config, file.name
        for key, tensor in model.state_dict().items():
            torch.testing.assert_close(tensor, state[key], atol=0, rtol=0, msg=f"{file.name}: {key}")


def _expert_metadata(path):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.metadata()


def test_modeling_file_imports_only_torch_transformers_and_its_config():
    from transformers.dynamic_module_utils import get_imports, get_relative_import_files, get_relative_imports

    for name in ("modeling_moebert.py", "experts_moebert.py", "configuration_moebert.py"):
        third_party = set(get_imports(ROOT / name)) - set(sys.stdlib_module_names)
        assert third_party <= {"torch", "transformers", "safetensors"}, name  # safetensors comes with transformers
    # what the Hub downloads beside the modeling file for trust_remote_code: its two sibling files
    assert sorted(get_relative_imports(ROOT / "modeling_moebert.py")) == ["configuration_moebert", "experts_moebert"]
    assert sorted(Path(f).name for f in get_relative_import_files(ROOT / "modeling_moebert.py")) == [
        "configuration_moebert.py", "experts_moebert.py"]


def test_from_bert_refuses_a_checkpoint_with_missing_encoder_weights(tiny_bert, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_bert, tmp_path, dirs_exist_ok=True)
    state = load_file(tmp_path / "model.safetensors")
    del state["encoder.layer.1.output.dense.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a complete BertModel checkpoint.*encoder.layer.1.output.dense.weight"):
        MoEBertModel.from_bert(str(tmp_path), domains=DOMAINS)


@torch.no_grad()
def test_pooling_sums_in_fp32_under_bf16(tiny_moe):
    model, tokenizer = tiny_moe
    batch = _encode(tokenizer, TEXTS[:3], "CVD", model)
    output = model.to(torch.bfloat16)(**batch)
    assert output.last_hidden_state.dtype == torch.bfloat16 and output.pooler_output.dtype == torch.float32
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = (output.last_hidden_state.float() * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(output.pooler_output, expected, atol=1e-6, rtol=1e-6)


def test_upcycling_draws_no_random_weights_it_would_overwrite(tiny_bert, monkeypatch):
    initialised = []
    original = MoEBertModel._init_weights
    monkeypatch.setattr(MoEBertModel, "_init_weights", lambda self, module: (initialised.append(module), original(self, module))[1])
    model, _ = MoEBertModel.from_bert(tiny_bert, domains=["CVD", "COPD"])
    assert not [m for m in initialised if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm))]
    assert all(torch.isfinite(p).all() for p in model.parameters())  # copied, not left as uninitialised memory
