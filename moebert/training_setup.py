"""What a training run starts from: the model (a BERT upcycled, or a MoE-BERT continued and grown by the domains it
lacks), its attention dropout, and the optimizer over the weights that train."""

import torch
from transformers import PretrainedConfig
from transformers.models.bert.modeling_bert import BertSelfAttention

from modeling_moebert import MoEBertModel
from moebert.loading import load_moebert
from moebert.names import local_copy, public_name


def load_model(path: str, domains: list[str], moe_layers="all", shared_expert: bool = False):
    """(model, tokenizer): a MoE-BERT checkpoint (domains it lacks are added, from its base's feed-forward blocks),
    or a BERT upcycled into `domains` with experts in `moe_layers` (one shared expert with `shared_expert`)."""
    config, _ = PretrainedConfig.get_config_dict(path)  # local folder or Hub id
    if config.get("model_type") == "moebert":
        model, tokenizer = load_moebert(path)  # this project's classes: no code from the checkpoint runs
        for domain in domains:
            if domain not in model.config.domains:
                model.add_domain(domain, tokenizer, init_from=local_copy(model.config.base_model_name_or_path))
        return model, tokenizer
    model, tokenizer = MoEBertModel.from_bert(path, domains=domains, moe_layers=moe_layers,
                                              num_experts=1 if shared_expert else None)
    model.config.base_model_name_or_path = public_name(str(path))  # published: a Hub id, never a local folder
    return model, tokenizer


def set_attention_dropout(model, probability: float):
    """In the config (saved with the model) and in every attention block already built."""
    model.config.attention_probs_dropout_prob = probability
    for module in model.modules():
        if isinstance(module, BertSelfAttention):
            module.dropout.p = probability


def make_optimizer(model, learning_rate: float, weight_decay: float, experts_only: bool) -> torch.optim.AdamW:
    """AdamW over the weights that train (the experts alone with `experts_only`: the rest frozen), without weight
    decay on biases and LayerNorm weights."""
    if experts_only:
        for name, parameter in model.named_parameters():
            parameter.requires_grad = ".experts." in name
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [p for n, p in trained if not n.endswith(no_decay)], "weight_decay": weight_decay},
        {"params": [p for n, p in trained if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=learning_rate)


def experts_can_miss_a_step(model) -> bool:
    """Whether a trained parameter can get no gradient in a step (an expert no token of the batch was routed to):
    only then must DDP search the graph for unused parameters, which costs every step."""
    return model.config.num_experts > 1 and any(p.requires_grad for n, p in model.named_parameters() if ".experts." in n)
