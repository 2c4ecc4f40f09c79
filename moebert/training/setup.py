"""What a training run sets up on its model (made by moebert.models.builder): its attention dropout, which weights
train, the optimizer over them, and whether DDP must look for parameters a step leaves without gradient."""

import torch

from modeling_moebert import BASE_ARCHITECTURES


def set_attention_dropout(model, probability: float):
    """In the config (saved with the model) and in every attention block already built, of whichever kind."""
    model.config.attention_probs_dropout_prob = probability
    self_attentions = tuple(architecture.self_attention for architecture in BASE_ARCHITECTURES.values())
    for module in model.modules():
        if isinstance(module, self_attentions):
            module.dropout.p = probability


TRAINED_WEIGHTS = ("experts", "moe_layers", "all")


def train_only(model, trained: str):
    """Freeze all but the `trained` weights: the experts alone (the shared weights frozen: a MoE), the layers that hold
    experts whole (a specialist: nothing is shared, so their attention trains too; the stored stem states then end
    at the first of them), or everything."""
    if trained not in TRAINED_WEIGHTS:
        raise ValueError(f"trained weights {trained!r}: one of {TRAINED_WEIGHTS}")
    whole_layers = tuple(f"encoder.layer.{i}." for i in model.config.moe_layers)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = (trained == "all" or ".experts." in name
                                   or (trained == "moe_layers" and name.startswith(whole_layers)))
    model.encoder.stem_through_attention = trained != "moe_layers"


def make_optimizer(model, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the weights that train (those `train_only` left trainable), without weight decay on biases and
    LayerNorm weights."""
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
