"""MoE-BERT: a BERT-pattern encoder (BERT, RoBERTa, MPNet) whose feed-forward blocks are split into one expert per
domain.

Routing is enforced, not learned: the domain of a sequence (its `domain_ids`, or the domain token right after
`[CLS]`) picks one expert for every token of it, or, in token routing mode, `token_type_ids` pick an expert per
token. Each token runs through exactly one expert, so a forward pass costs what the dense encoder costs.

One model class serves every kind of base: the kinds differ in their embeddings and attention alone (MPNet adds a
relative position bias to every layer's attention), which `BASE_ARCHITECTURES` names and the model builds from its
config's `base_model_type`; routing, experts, upcycling and saving are the same code for all of them.

This file imports only torch, transformers and its configuration module, so the Hub can serve it with
`trust_remote_code=True`.
"""

import json
import math
import os
import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    MPNetConfig,
    MPNetModel,
    PretrainedConfig,
    PreTrainedModel,
    RobertaConfig,
    RobertaModel,
)
from transformers import initialization as init
from transformers.initialization import no_init_weights
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.bert.modeling_bert import (
    BertAttention,
    BertEmbeddings,
    BertIntermediate,
    BertLayer,
    BertPreTrainedModel,
    BertSelfAttention,
)
from transformers.models.mpnet.modeling_mpnet import (
    MPNetAttention,
    MPNetEmbeddings,
    MPNetEncoder,
    MPNetLayer,
    MPNetSelfAttention,
)
from transformers.models.roberta.modeling_roberta import (
    RobertaAttention,
    RobertaEmbeddings,
    RobertaLayer,
    RobertaSelfAttention,
)
from transformers.utils import logging

try:
    from .configuration_moebert import MoEBertConfig, default_domain_token
    from .experts_moebert import load_expert_file, save_expert_file, save_expert_files
except ImportError:  # imported as top-level modules from a source checkout rather than from the Hub
    from configuration_moebert import MoEBertConfig, default_domain_token
    from experts_moebert import load_expert_file, save_expert_file, save_expert_files


@dataclass(frozen=True)
class BaseArchitecture:
    """What a MoE-BERT reuses of one kind of dense encoder, whose layers are attention then a BERT feed-forward block
    (`intermediate.dense`, `output.dense`, `output.LayerNorm`): its classes, and how its modules differ from BERT's.

    `takes_layer_idx`: its attention and layers are built with their index (BERT, RoBERTa).
    `relative_position_bias`: MPNet's; one bias per forward pass, added in every layer's attention to scores that take
    an additive mask (its attention has no SDPA path).
    """

    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]
    embeddings: type[nn.Module]
    attention: type[nn.Module]
    self_attention: type[nn.Module]  # inside `attention`: its `dropout` is the attention probabilities' dropout
    layer: type[nn.Module]
    takes_layer_idx: bool = True
    relative_position_bias: bool = False

    def build(self, module: type[nn.Module], config, layer_idx: int) -> nn.Module:
        return module(config, layer_idx=layer_idx) if self.takes_layer_idx else module(config)


BASE_ARCHITECTURES = {
    "bert": BaseArchitecture(BertConfig, BertModel, BertEmbeddings, BertAttention, BertSelfAttention, BertLayer),
    "roberta": BaseArchitecture(RobertaConfig, RobertaModel, RobertaEmbeddings, RobertaAttention, RobertaSelfAttention,
                                RobertaLayer),
    "mpnet": BaseArchitecture(MPNetConfig, MPNetModel, MPNetEmbeddings, MPNetAttention, MPNetSelfAttention, MPNetLayer,
                              takes_layer_idx=False, relative_position_bias=True),
}


def base_architecture(model_type: str) -> BaseArchitecture:
    if model_type not in BASE_ARCHITECTURES:
        raise ValueError(
            f"a {model_type!r} model cannot be upcycled: MoE-BERT upcycles encoders whose layers hold a BERT "
            f"feed-forward block, model_type one of {sorted(BASE_ARCHITECTURES)} (e.g. bert-base-uncased, "
            "sentence-transformers/all-mpnet-base-v2, roberta-base)."
        )
    return BASE_ARCHITECTURES[model_type]


# A dense parameter that an MoE layer holds per expert, and its name inside the MoE layer.
_DENSE_TO_MOE = {
    "intermediate.dense": "experts.{expert}.intermediate.dense",
    "output.dense": "experts.{expert}.output",
    "output.LayerNorm": "LayerNorm",
}
_DENSE_FFN_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(intermediate\.dense|output\.dense|output\.LayerNorm)\.(\w+)$")


class MoEBertExpert(nn.Module):
    """One domain's copy of a (BERT pattern) feed-forward block: up-projection, activation, down-projection."""

    def __init__(self, config):
        super().__init__()
        self.intermediate = BertIntermediate(config)
        self.output = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.output(self.intermediate(hidden_states))


@dataclass
class ExpertRouting:
    """Which rows each expert takes, worked out once per forward pass and shared by all MoE layers.

    Per-sequence routing sorts the batch by expert once, before the embeddings: every layer then hands each expert
    a contiguous slice of sequences (a view, no copy). Per-token routing with several experts gathers the tokens
    of each expert (`order`) and scatters the outputs back (`inverse`) in every layer.
    """

    counts: list[int]  # rows per expert, in expert order: sequences, or tokens when `order` is set
    order: torch.Tensor | None = None
    inverse: torch.Tensor | None = None

    @classmethod
    def by_token(cls, expert_ids: torch.Tensor, num_experts: int) -> "ExpertRouting":
        flat = expert_ids.reshape(-1)
        counts = torch.bincount(flat, minlength=num_experts).tolist()  # the forward pass's one host sync
        if max(counts) == flat.numel():  # one expert takes every token: the sequence path, without a sort
            return cls(counts=[expert_ids.shape[0] if c else 0 for c in counts])
        order = torch.argsort(flat, stable=True)
        return cls(counts=counts, order=order, inverse=torch.argsort(order))

    def dispatch(self, hidden_states: torch.Tensor, experts: nn.ModuleList) -> torch.Tensor:
        if self.order is None:
            outputs = [experts[e](rows) for e, rows in enumerate(hidden_states.split(self.counts)) if rows.shape[0]]
            return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        groups = flat.index_select(0, self.order).split(self.counts)
        outputs = torch.cat([experts[e](group) for e, group in enumerate(groups) if group.shape[0]])
        return outputs.index_select(0, self.inverse).view_as(hidden_states)


class DomainRouter:
    """Which domain, hence which expert, each sequence (or, in token routing mode, each token) of a batch belongs to:
    read from `domain_ids`, the domain token after `[CLS]` or `token_type_ids`, checked against the config, and
    turned into the batch's ExpertRouting. Enforced, not learned: it has no weights."""

    def __init__(self, config):
        self.config = config

    def route(self, input_ids, token_type_ids, domain_ids, shape, device) -> tuple[ExpertRouting, torch.Tensor | None]:
        """The routing of this batch, and the order that sorts its sequences by expert (None: already sorted, or
        routed per token)."""
        if self.routes_per_token(domain_ids):
            expert_ids = self.token_expert_ids(token_type_ids, domain_ids, shape, device)
            return ExpertRouting.by_token(expert_ids, self.config.num_experts), None
        domains = self.sequence_domains(input_ids, domain_ids, shape[0])
        experts = domains if self.config.num_experts > 1 else [0] * len(domains)
        routing = ExpertRouting(counts=[experts.count(e) for e in range(self.config.num_experts)])
        order = sorted(range(len(experts)), key=experts.__getitem__)
        if order == list(range(len(order))):
            return routing, None
        return routing, torch.tensor(order, device=device)

    def routes_per_token(self, domain_ids) -> bool:
        """Token routing mode, unless `domain_ids` give one domain per sequence."""
        return self.config.routing_mode == "token" and (domain_ids is None or torch.as_tensor(domain_ids).dim() == 2)

    def token_expert_ids(self, token_type_ids, domain_ids, shape, device) -> torch.Tensor:
        """Token routing: the expert of every token, shape `(batch_size, seq_len)`, from `domain_ids` or else
        `token_type_ids` (one domain index per token)."""
        if domain_ids is None and token_type_ids is None:
            raise ValueError(
                "Token routing needs domain_ids or token_type_ids: one domain index per token (or domain_ids "
                f"one per sequence), in 0..{len(self.config.domains) - 1} for {self.config.domains}."
            )
        name, ids = ("token_type_ids", token_type_ids) if domain_ids is None else ("domain_ids", domain_ids)
        ids = torch.as_tensor(ids, device=device).long()
        if ids.shape != shape:
            raise ValueError(f"{name} has shape {tuple(ids.shape)}: expected {tuple(shape)}.")
        unknown = (ids < 0) | (ids >= len(self.config.domains))
        if unknown.any():
            raise ValueError(
                f"{name} holds unknown domain ids {sorted(set(ids[unknown].tolist()))}: this model has "
                f"{len(self.config.domains)} domains {dict(enumerate(self.config.domains))}."
            )
        return ids if self.config.num_experts > 1 else torch.zeros_like(ids)

    def sequence_domains(self, input_ids, domain_ids, batch_size: int) -> list[int]:
        """The domain index of each sequence, checked, as a host list (the forward pass's one host sync): from
        `domain_ids`, or else from the domain token at position 1 (right after the first token)."""
        if domain_ids is None:
            domains = self.domain_ids_from_tokens(input_ids).tolist()
            missing = [i for i, d in enumerate(domains) if d < 0]
            if missing:
                known = dict(zip(self.config.domain_tokens, self.config.domains))
                raise ValueError(
                    f"Sequences {missing[:10]}{'...' if len(missing) > 10 else ''} have no domain token after the first token "
                    "([CLS], <s>). "
                    f"Start each text with its domain token, e.g. '{self.config.domain_tokens[0]} ' + text, or pass "
                    f"domain_ids; this model knows {known}."
                )
            return domains
        ids = torch.as_tensor(domain_ids)
        if ids.shape != (batch_size,):
            raise ValueError(
                f"domain_ids has shape {tuple(ids.shape)}: expected one domain per sequence, shape ({batch_size},)."
            )
        domains = ids.long().tolist()
        bad = sorted({d for d in domains if not 0 <= d < len(self.config.domains)})
        if bad:
            raise ValueError(
                f"domain_ids holds unknown domain ids {bad}: this model has {len(self.config.domains)} domains "
                f"{dict(enumerate(self.config.domains))}."
            )
        return domains

    def domain_ids_from_tokens(self, input_ids: torch.Tensor | None) -> torch.Tensor:
        """The domain of each sequence, read from the domain token at position 1 (right after the first token); -1 where
        there is none."""
        known = dict(zip(self.config.domain_tokens, self.config.domains))
        if input_ids is None or self.config.domain_token_ids is None:
            raise ValueError(
                "No domain given: pass domain_ids (one per sequence) or input_ids that start with a domain token "
                f"after the first token ([CLS], <s>); this model knows {known}."
            )
        if input_ids.shape[1] < 2:
            raise ValueError("input_ids are too short to hold the first token ([CLS], <s>) and a domain token.")
        token_ids = torch.tensor(self.config.domain_token_ids, device=input_ids.device)
        matches = input_ids[:, 1, None] == token_ids[None, :]
        return torch.where(matches.any(dim=1), matches.int().argmax(dim=1), -1)


class MoEBertLayer(GradientCheckpointingLayer):
    """A layer of the base's kind whose feed-forward block is one expert per domain; attention and LayerNorm are
    shared."""

    def __init__(self, config, layer_idx=None):
        super().__init__()
        architecture = base_architecture(config.base_model_type)
        self.attention = architecture.build(architecture.attention, config, layer_idx)
        self.experts = nn.ModuleList(MoEBertExpert(config) for _ in range(config.num_experts))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states, attention_mask=None, routing: ExpertRouting = None, **kwargs):
        attention_output = self.attention(hidden_states, attention_mask, **kwargs)[0]
        return self.feed_forward(attention_output, routing)

    def feed_forward(self, attention_output, routing: ExpertRouting) -> torch.Tensor:
        expert_output = routing.dispatch(attention_output, self.experts)
        return self.LayerNorm(self.dropout(expert_output) + attention_output)


class MoEBertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        architecture = base_architecture(config.base_model_type)
        self.first_moe_layer = min(config.moe_layers)
        # where stored stem states end: at the first MoE layer's experts while its attention is frozen (training the
        # experts alone), or at its input while the whole layer trains (a specialist: moebert.training.setup)
        self.stem_through_attention = True
        self.layer = nn.ModuleList(
            MoEBertLayer(config, layer_idx=i) if i in config.moe_layers
            else architecture.build(architecture.layer, config, i)
            for i in range(config.num_hidden_layers)
        )
        if architecture.relative_position_bias:  # MPNet's, under its name there
            buckets, heads = config.relative_attention_num_buckets, config.num_attention_heads
            self.relative_attention_bias = nn.Embedding(buckets, heads)

    def forward(self, hidden_states, attention_mask, routing, output_hidden_states=False, **kwargs):
        kwargs |= self.attention_inputs(hidden_states)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for layer in self.layer:
            hidden_states = self._run(layer, hidden_states, attention_mask, routing, **kwargs)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        return hidden_states, all_hidden_states

    def stem(self, hidden_states, attention_mask, **kwargs) -> torch.Tensor:
        """The layers below the first MoE layer and (`stem_through_attention`) that layer's attention: shared weights
        only, no routing."""
        kwargs |= self.attention_inputs(hidden_states)
        for layer in self.layer[: self.first_moe_layer]:
            hidden_states = self._run(layer, hidden_states, attention_mask, None, **kwargs)
        if not self.stem_through_attention:
            return hidden_states
        return self.layer[self.first_moe_layer].attention(hidden_states, attention_mask, **kwargs)[0]

    def from_stem(self, stem_states, attention_mask, routing, **kwargs) -> torch.Tensor:
        """The rest of `forward` after `stem`: the first MoE layer's experts (or the whole layer) and every layer
        above."""
        kwargs |= self.attention_inputs(stem_states)
        first = self.layer[self.first_moe_layer]
        if self.stem_through_attention:
            hidden_states = first.feed_forward(stem_states, routing)
        else:
            hidden_states = self._run(first, stem_states, attention_mask, routing, **kwargs)
        for layer in self.layer[self.first_moe_layer + 1 :]:
            hidden_states = self._run(layer, hidden_states, attention_mask, routing, **kwargs)
        return hidden_states

    def attention_inputs(self, hidden_states) -> dict:
        """What every layer's attention takes besides the states and the mask: MPNet's relative position bias,
        `(1, heads, length, length)`, computed as MPNetEncoder computes it (its 32 buckets) and broadcast over the
        batch; nothing for the other kinds."""
        if not hasattr(self, "relative_attention_bias"):
            return {}
        positions = torch.arange(hidden_states.shape[1], device=hidden_states.device)
        buckets = MPNetEncoder.relative_position_bucket(positions[None, :] - positions[:, None])
        return {"position_bias": self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)}

    @staticmethod
    def _run(layer, hidden_states, attention_mask, routing, **kwargs):
        if isinstance(layer, MoEBertLayer):
            return layer(hidden_states, attention_mask, routing=routing, **kwargs)
        output = layer(hidden_states, attention_mask, **kwargs)
        return output if isinstance(output, torch.Tensor) else output[0]  # MPNet's layers return a tuple


class MoEBertPreTrainedModel(BertPreTrainedModel):
    config_class = MoEBertConfig
    config: MoEBertConfig
    base_model_prefix = "moebert"
    _no_split_modules = ["BertEmbeddings", "BertLayer", "RobertaEmbeddings", "RobertaLayer", "MPNetEmbeddings",
                         "MPNetLayer", "MoEBertLayer"]
    _can_record_outputs = None

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, (RobertaEmbeddings, MPNetEmbeddings)):  # their index buffers, as BERT's are
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
            if hasattr(module, "token_type_ids"):
                init.zeros_(module.token_type_ids)


class MoEBertModel(MoEBertPreTrainedModel):
    """A BERT-pattern encoder (`config.base_model_type`: BERT, RoBERTa or MPNet) with domain experts. Returns
    `last_hidden_state` and a pooled sentence embedding (`pooler_output`: mean over non-padding tokens by default)."""

    def __init__(self, config: MoEBertConfig):
        super().__init__(config)
        self.architecture = base_architecture(config.base_model_type)
        self.embeddings = self.architecture.embeddings(config)
        self.encoder = MoEBertEncoder(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    # ----------------------------------------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        domain_ids: torch.Tensor | None = None,
        stem_states: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        r"""
        domain_ids (`torch.LongTensor` of shape `(batch_size,)` or `(batch_size, seq_len)`, *optional*):
            The domain (index into `config.domains`) of each sequence, or in token routing mode also of each token.
            Sentence routing without it reads the domain token right after `[CLS]`. Token routing without it reads
            `token_type_ids` as the domain of each token (BERT's segment embedding then sees segment 0).
        stem_states (`torch.FloatTensor` of shape `(batch_size, seq_len, hidden_size)`, *optional*):
            What [`~MoEBertModel.stem_states`] returned for these sequences: the forward pass starts at the first
            MoE layer's experts (give `domain_ids` and `attention_mask`; `input_ids` are then not needed).
        """
        if stem_states is None and (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds (or stem_states).")
        kwargs.pop("output_attentions", None)  # attention weights are not collected by this model
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        if stem_states is not None and output_hidden_states:
            raise ValueError("output_hidden_states needs the layers below the stem: pass input_ids, not stem_states.")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        shape = next(t for t in (input_ids, stem_states, inputs_embeds) if t is not None).shape[:2]

        device = input_ids.device if input_ids is not None else self.device
        routing, sorted_by_domain = DomainRouter(self.config).route(input_ids, token_type_ids, domain_ids, shape, device)
        if self.config.routing_mode == "token" and domain_ids is None:
            token_type_ids = None  # they carried the routing; the embeddings keep the segment-0 vectors
        if sorted_by_domain is not None:  # several domains: the batch is sorted by domain once, for every layer
            input_ids, inputs_embeds, stem_states, attention_mask, token_type_ids, position_ids = (
                _rows(t, sorted_by_domain)
                for t in (input_ids, inputs_embeds, stem_states, attention_mask, token_type_ids, position_ids)
            )

        if stem_states is None:
            embedding_output = self.embeddings(
                input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds
            )
            extended_mask = self.attention_mask_for(embedding_output, attention_mask)
            sequence_output, all_hidden_states = self.encoder(
                embedding_output, extended_mask, routing, output_hidden_states=output_hidden_states, **kwargs
            )
        else:
            extended_mask = self.attention_mask_for(stem_states, attention_mask)
            sequence_output, all_hidden_states = self.encoder.from_stem(stem_states, extended_mask, routing, **kwargs), None
        pooled_output = self.pool(sequence_output, attention_mask)
        if sorted_by_domain is not None:  # back to the caller's order
            restore = torch.argsort(sorted_by_domain)
            sequence_output, pooled_output = sequence_output[restore], pooled_output[restore]
            all_hidden_states = all_hidden_states and tuple(h[restore] for h in all_hidden_states)
        if not return_dict:
            return tuple(v for v in (sequence_output, pooled_output, all_hidden_states) if v is not None)
        return BaseModelOutputWithPooling(
            last_hidden_state=sequence_output, pooler_output=pooled_output, hidden_states=all_hidden_states
        )

    def stem_states(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None) -> torch.Tensor:
        """The states at the input of the first MoE layer's experts: the embeddings, the dense layers below it
        and its attention. They depend on the shared weights and the tokens (the domain token included) alone, so
        while those stay frozen they can be computed once per text and passed to `forward(stem_states=...)`,
        which then computes exactly what a forward pass from `input_ids` computes (in eval mode: dropout inside
        the stem is not drawn again)."""
        embedding_output = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, inputs_embeds=inputs_embeds)
        return self.encoder.stem(embedding_output, self.attention_mask_for(embedding_output, attention_mask))

    def attention_mask_for(self, states: torch.Tensor, attention_mask: torch.Tensor | None):
        """The mask the base's attention takes: the one of the attention implementation in use, or for MPNet (whose
        attention adds its mask to the scores) 0 on tokens, the dtype's minimum on padding."""
        if not self.architecture.relative_position_bias:
            return create_bidirectional_mask(config=self.config, inputs_embeds=states, attention_mask=attention_mask)
        if attention_mask is None:
            return None
        padding = 1.0 - attention_mask[:, None, None, :].to(states.dtype)
        return padding * torch.finfo(states.dtype).min

    def stem_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """The named parameters and buffers `stem_states` reads: what a stored stem state depends on."""
        first = self.encoder.first_moe_layer
        modules = [("embeddings", self.embeddings)] + [(f"encoder.layer.{i}", self.encoder.layer[i]) for i in range(first)]
        if self.encoder.stem_through_attention:
            modules.append((f"encoder.layer.{first}.attention", self.encoder.layer[first].attention))
        if hasattr(self.encoder, "relative_attention_bias"):  # MPNet: every attention of the stem adds it
            modules.append(("encoder.relative_attention_bias", self.encoder.relative_attention_bias))
        return [(f"{prefix}.{name}", tensor) for prefix, module in modules for name, tensor in module.state_dict().items()]

    def pool(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.config.pooling == "cls":
            return hidden_states[:, 0]
        if attention_mask is None:
            return hidden_states.float().mean(dim=1)
        mask = attention_mask.unsqueeze(-1).float()  # sums in fp32 also under bf16/fp16: hundreds of tokens add up
        return (hidden_states.float() * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)

    def domain_token(self, domain: str) -> str:
        return self.config.domain_tokens[self.config.domain_index(domain)]

    def prepend_domain_token(self, texts, domains):
        """`'[CVD] ' + text` for each text and its domain name (a single name applies to all texts)."""
        return self.config.prepend_domain_token(texts, domains)

    def cocitation_probability(self, cosine, domain: str) -> torch.Tensor:
        """The probability that two texts of `domain` whose embeddings have this cosine similarity are co-cited, by
        the domain's calibration (`MoEBertConfig.cocitation_probability`): one threshold, e.g. 0.5, then means the
        same in every domain, where cosines do not."""
        return self.config.cocitation_probability(cosine, domain)

    # -------------------------------------------------------------------------------- dense <-> MoE weights

    def moe_key(self, dense_key: str, expert: int) -> str:
        """The name in this model of a dense `BertModel` parameter, for the given expert."""
        match = _DENSE_FFN_KEY.match(dense_key)
        if not match or int(match[1]) not in self.config.moe_layers:
            return dense_key
        layer, part, param = match.groups()
        return f"encoder.layer.{layer}.{_DENSE_TO_MOE[part].format(expert=expert)}.{param}"

    def expert_state(self, expert: int) -> dict[str, torch.Tensor]:
        """One expert's own tensors under their dense BERT names (`encoder.layer.<i>.output.dense.weight`, ...)."""
        state = self.state_dict()
        return {k: state[self.moe_key(k, expert)] for k in _dense_ffn_keys(self.config)}

    def load_expert_state(self, expert: int, dense_state: dict[str, torch.Tensor]) -> None:
        """Copy feed-forward weights given under dense BERT names into one expert."""
        parameters = dict(self.named_parameters())
        with torch.no_grad():
            for key in _dense_ffn_keys(self.config):
                parameters[self.moe_key(key, expert)].copy_(dense_state[key])

    @classmethod
    def from_bert(
        cls,
        model_name_or_path: str,
        domains: list[str],
        moe_layers="all",
        routing_mode: str = "sentence",
        pooling: str = "mean",
        num_experts: int | None = None,
        domain_tokens: list[str] | None = None,
        **from_pretrained_kwargs,
    ):
        """Upcycle a dense checkpoint (local folder or Hub id) of a BERT-pattern encoder, BERT, RoBERTa or MPNet
        (`BASE_ARCHITECTURES`), into a MoE-BERT of that kind.

        Every chosen layer's feed-forward block is copied into one expert per domain; embeddings, attention and
        LayerNorms are shared. The domain tokens are added to the tokenizer, their embedding rows start as copies
        of its first token (`[CLS]`, `<s>`). Right after this call every expert computes exactly what the base model
        computed.

        Returns `(model, tokenizer)`.
        """
        config_dict, _ = PretrainedConfig.get_config_dict(model_name_or_path, **from_pretrained_kwargs)
        model_type = config_dict.get("model_type")
        if model_type == MoEBertConfig.model_type:
            raise ValueError(
                f"{model_name_or_path} is already a MoE-BERT: load it with "
                "AutoModel.from_pretrained(path, trust_remote_code=True), and grow it with add_domain()."
            )
        try:
            architecture = base_architecture(model_type)
        except ValueError as error:
            raise ValueError(f"{model_name_or_path}: {error}") from None
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, **from_pretrained_kwargs)
        base = _load_dense_encoder(architecture, model_name_or_path, **from_pretrained_kwargs)
        config = MoEBertConfig(
            **_base_fields(base.config),
            base_model_type=model_type,
            domains=domains,
            domain_tokens=domain_tokens,
            num_experts=num_experts,
            moe_layers=moe_layers,
            routing_mode=routing_mode,
            pooling=pooling,
            base_model_name_or_path=str(model_name_or_path),
        )
        with no_init_weights():  # every weight is copied from the base below: no random draws to throw away
            model = cls(config)
        dense_state = base.state_dict()
        model.load_state_dict(
            {model.moe_key(k, e): v.clone() for k, v in dense_state.items() for e in range(config.num_experts)}
        )
        model.config.domain_token_ids = model._add_domain_tokens(tokenizer, config.domain_tokens)
        return model, tokenizer

    def _add_domain_tokens(self, tokenizer, tokens: list[str]) -> list[int]:
        """Add the tokens to the tokenizer as special tokens; their embedding rows start as copies of the
        first token (`[CLS]`, `<s>`).

        The embedding matrix never shrinks: a vocabulary padded beyond the tokenizer (30522 tokens in 30528 rows)
        first fills its spare rows, and when it must grow it stays padded to the same multiple (the largest power
        of two up to 128 dividing its size)."""
        clashes = [t for t in tokens if t in tokenizer.get_vocab()]
        if clashes:
            raise ValueError(f"domain tokens {clashes} are already in the tokenizer's vocabulary: choose other names.")
        rows, known = self.get_input_embeddings().weight.shape[0], len(tokenizer)
        tokenizer.add_tokens(tokens, special_tokens=True)
        if len(tokenizer) > rows:
            multiple = math.gcd(rows, 128) if rows > known else None
            self.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=multiple, mean_resizing=False)
        self.config.vocab_size = self.get_input_embeddings().weight.shape[0]
        token_ids = tokenizer.convert_tokens_to_ids(tokens)
        with torch.no_grad():
            embeddings = self.get_input_embeddings().weight
            embeddings[token_ids] = embeddings[tokenizer.cls_token_id].clone()
        return token_ids

    def extract_expert(self, domain: str) -> PreTrainedModel:
        """A plain model of the base's kind (`transformers.BertModel`, `MPNetModel`, ...) equal to this model
        restricted to one domain (no custom code needed)."""
        expert = self.config.expert_of_domain(self.config.domain_index(domain))
        config_class = self.architecture.config_class
        dense_config = config_class(**_base_fields(self.config, config_class))
        dense = self.architecture.model_class(dense_config, add_pooling_layer=False)
        state = self.state_dict()
        dense.load_state_dict({k: state[self.moe_key(k, expert)].clone() for k in dense.state_dict()})
        return dense.to(self.device, self.dtype).eval()

    # ---------------------------------------------------------------------------------------- growing domains

    def add_domain(self, name: str, tokenizer, init_from: str | None = None, token: str | None = None) -> int:
        """Add a domain and its expert without touching the others; returns the new domain's index.

        `init_from` is an existing domain (copy its experts) or a BERT checkpoint (copy its feed-forward blocks);
        by default the base checkpoint this model was upcycled from. The domain token is added to `tokenizer`.
        """
        if name in self.config.domains:
            raise ValueError(f"domain {name!r} already exists: this model knows {self.config.domains}.")
        if self.config.num_experts == len(self.config.domains):  # one expert per domain (a shared one stays shared)
            dense_state = self._feed_forward_source(init_from)
            for layer in self.config.moe_layers:
                self.encoder.layer[layer].experts.append(MoEBertExpert(self.config).to(self.device, self.dtype))
            self.config.num_experts += 1
            self.load_expert_state(self.config.num_experts - 1, dense_state)
        token = token or default_domain_token(name)
        (token_id,) = self._add_domain_tokens(tokenizer, [token])
        self.config.domains.append(name)
        self.config.domain_tokens.append(token)
        self.config.domain_token_ids.append(token_id)
        return len(self.config.domains) - 1

    def _feed_forward_source(self, init_from: str | None) -> dict[str, torch.Tensor]:
        if init_from in self.config.domains:
            return self.expert_state(self.config.expert_of_domain(self.config.domain_index(init_from)))
        path = init_from or self.config.base_model_name_or_path
        if path is None:
            raise ValueError(
                "init_from is needed: this model names no base to copy the new expert from (it was upcycled from a "
                f"local folder, which saved files do not name); pass init_from=, an existing domain "
                f"({', '.join(self.config.domains)}) or the base's folder or Hub id."
            )
        try:
            return _load_dense_encoder(self.architecture, path).state_dict()
        except OSError as error:  # a base recorded by its folder's name only, or no network
            raise ValueError(
                f"the base {path!r} to copy the new expert from cannot be loaded ({str(error).splitlines()[0]}): pass "
                f"init_from=, an existing domain ({', '.join(self.config.domains)}) or the base's folder or Hub id."
            ) from None

    # ----------------------------------------------------------------------------------------- expert files

    def save_expert(self, domain: str, path: str | os.PathLike) -> None:
        """Write one domain's experts (and its domain-token embedding row) to their own safetensors file, with the
        fingerprint of the shared weights they were trained on and the domain's calibration (experts_moebert)."""
        save_expert_file(self, domain, path)

    def save_experts(self, folder: str | os.PathLike, domains: list[str] | None = None) -> None:
        """`<folder>/<DOMAIN>.safetensors` for each domain (default: all)."""
        save_expert_files(self, folder, domains)

    def load_expert(self, source, tokenizer=None, domain: str | None = None, revision: str | None = None,
                    allow_other_shared_weights: bool = False) -> str:
        """Load a domain's experts from a file written by `save_expert`, or from a Hub repo's
        `experts/<domain>.safetensors` (`model.load_expert("org/repo", domain="CVD")`, through the Hugging Face
        cache). They replace that domain's experts, or add the domain (then pass `tokenizer`, for its token); the
        domain's calibration comes with them. An expert trained on other shared weights than this model's (all
        weights trained, or another base) is refused unless `allow_other_shared_weights=True`. Returns the domain."""
        return load_expert_file(self, source, tokenizer, domain, revision, allow_other_shared_weights)

    # ------------------------------------------------------------------------------------------------ saving

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus the files sentence-transformers reads; with `push_to_hub=True`
        (and `repo_id`, `token`, `private`, `commit_message`, `create_pr`) those files are pushed too."""
        hub = {k: kwargs.pop(k) for k in ("repo_id", "private", "commit_message", "create_pr") if k in kwargs}
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            self._write_sentence_transformers_files(save_directory)
            if push_to_hub:  # push_to_hub saves again through this method, into the folder it uploads
                repo_id = hub.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
                self.push_to_hub(repo_id, token=kwargs.get("token"), **hub)

    def _write_sentence_transformers_files(self, save_directory):
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        pooling = {
            "word_embedding_dimension": self.config.hidden_size,
            "pooling_mode_cls_token": self.config.pooling == "cls",
            "pooling_mode_mean_tokens": self.config.pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        }
        # one prompt per domain: encode(texts, prompt_name="CVD") prepends "[CVD] ", the domain-token path
        prompts = {domain: f"{token} " for domain, token in zip(self.config.domains, self.config.domain_tokens)}
        max_seq_length = self.config.sequence_length()
        files = {
            "modules.json": modules,
            "1_Pooling/config.json": pooling,
            "sentence_bert_config.json": {"max_seq_length": max_seq_length, "do_lower_case": False},
            "config_sentence_transformers.json": {
                "prompts": prompts, "default_prompt_name": None, "similarity_fn_name": "cosine",
            },
        }
        for name, content in files.items():
            path = os.path.join(save_directory, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(content, f, indent=2)


def _rows(tensor: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    """The batch rows `index` of a per-sequence input; None, and inputs broadcast over the batch, as they are."""
    if tensor is None or tensor.dim() == 0 or tensor.shape[0] != index.numel():
        return tensor
    return tensor.index_select(0, index)


def _load_dense_encoder(architecture: BaseArchitecture, model_name_or_path, **from_pretrained_kwargs):
    """The encoder of a dense checkpoint of the architecture's kind; any pretraining heads in it are left behind on
    purpose, but a missing encoder weight is an error rather than a silently random tensor."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the load report would list the unused heads as if something were wrong
    try:
        model, info = architecture.model_class.from_pretrained(
            model_name_or_path, add_pooling_layer=False, output_loading_info=True, **from_pretrained_kwargs
        )
    finally:
        logging.set_verbosity(verbosity)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys", "error_msgs") and v}
    if problems:
        kind = architecture.model_class.__name__
        raise ValueError(f"{model_name_or_path} is not a complete {kind} checkpoint (its encoder): {problems}")
    return model


def _base_fields(config, kind: type[PretrainedConfig] | None = None) -> dict:
    """The dense fields of a configuration (only those a `kind` configuration has, when given), without model type,
    MoE fields or bookkeeping."""
    drop = {"model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "dtype"}
    drop |= set(MoEBertConfig().to_dict()) - set(BertConfig().to_dict())
    fields = {k: v for k, v in config.to_dict().items() if k not in drop}
    return fields if kind is None else {k: v for k, v in fields.items() if k in kind().to_dict()}


def _dense_ffn_keys(config) -> list[str]:
    return [
        f"encoder.layer.{layer}.{part}.{param}"
        for layer in config.moe_layers
        for part in ("intermediate.dense", "output.dense")
        for param in ("weight", "bias")
    ]


MoEBertConfig.register_for_auto_class()
MoEBertModel.register_for_auto_class("AutoModel")

__all__ = ["MoEBertModel", "MoEBertPreTrainedModel", "MoEBertLayer", "MoEBertExpert", "ExpertRouting", "DomainRouter"]
