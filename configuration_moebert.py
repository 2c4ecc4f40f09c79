"""MoE-BERT configuration: a BERT configuration (holding the base's settings, whichever its kind) plus the domains,
their experts and the routing."""

import os
from pathlib import Path

import torch
from transformers import BertConfig

ROUTING_MODES = ("sentence", "token")
POOLING_MODES = ("mean", "cls")


def default_domain_token(domain: str) -> str:
    return f"[{domain}]"


def names_a_local_folder(name_or_path: str | None) -> bool:
    """Whether a model name tells about this machine: an absolute path, or a relative one that climbs out of the
    working directory (a Hub id, or a path below the working directory, tells nothing)."""
    return bool(name_or_path) and (os.path.isabs(name_or_path) or os.path.normpath(name_or_path).startswith(".."))


def public_model_name(name_or_path: str | None) -> str | None:
    """How a file that may be published (config.json, expert files, cards) names the model a MoE-BERT was upcycled
    from: a Hub id as given, a Hugging Face cache snapshot by the repo id it caches, and any other local folder not at
    all (None): its name is no Hub id, though it may look like one, and a published link to it would be broken."""
    if not name_or_path:
        return None
    if not (os.path.exists(name_or_path) or names_a_local_folder(name_or_path)):
        return name_or_path  # a Hub id
    return cached_repo_id(name_or_path)


def cached_repo_id(path: str) -> str | None:
    """The repo id of a Hugging Face cache snapshot (`.../models--org--name/snapshots/<commit>`, `datasets--` too);
    None for any other path."""
    cached = next((part for part in Path(path).resolve().parts if part.startswith(("models--", "datasets--"))), None)
    return "/".join(cached.split("--")[1:]) if cached else None


def usable_positions(config) -> int:
    """The tokens an encoder with this configuration (a MoE-BERT's: its base's kind) can take: RoBERTa's and MPNet's
    positions count on from their padding id, so the first `pad_token_id + 1` position embeddings are never a
    token's (two for roberta-base and all-mpnet-base-v2)."""
    kind = getattr(config, "base_model_type", config.model_type)
    offset = config.pad_token_id + 1 if kind in ("roberta", "mpnet") else 0
    return config.max_position_embeddings - offset


def resolve_moe_layers(moe_layers, num_hidden_layers: int) -> list[int]:
    """Turn "all", "upper" (the upper half), "topN" (the N last layers), "middle", a comma-separated string or a list
    of indices into sorted layer indices."""
    if moe_layers == "all":
        return list(range(num_hidden_layers))
    if moe_layers == "upper":
        return list(range(num_hidden_layers // 2, num_hidden_layers))
    if isinstance(moe_layers, str) and moe_layers.startswith("top") and moe_layers[3:].isdigit():
        moe_layers = list(range(max(num_hidden_layers - int(moe_layers[3:]), 0), num_hidden_layers))
    if moe_layers == "middle":
        return [num_hidden_layers // 2]
    if isinstance(moe_layers, str):
        try:
            moe_layers = [int(part) for part in moe_layers.split(",") if part.strip()]
        except ValueError:
            raise ValueError(
                f"moe_layers={moe_layers!r} is not understood: use 'all', 'upper', 'top2', 'middle' or layer indices such as '0,5,11'."
            ) from None
    indices = sorted(set(int(i) for i in moe_layers))
    if not indices:
        raise ValueError("moe_layers is empty: name at least one layer, or use 'all' or 'middle'.")
    out_of_range = [i for i in indices if not 0 <= i < num_hidden_layers]
    if out_of_range:
        raise ValueError(
            f"moe_layers {out_of_range} out of range: this model has {num_hidden_layers} layers "
            f"(valid indices 0..{num_hidden_layers - 1})."
        )
    return indices


class MoEBertConfig(BertConfig):
    r"""
    Configuration of a [`MoEBertModel`]: every argument of [`BertConfig`], plus

    Args:
        domains (`list[str]`): ordered domain names; domain `i` is routed to expert `i`.
        domain_tokens (`list[str]`, *optional*): the special token of each domain, `[NAME]` by default.
        domain_token_ids (`list[int]`, *optional*): vocabulary ids of `domain_tokens`, filled in when the tokens
            are added to a tokenizer (see `MoEBertModel.from_bert`).
        num_experts (`int`, *optional*): experts per MoE layer; `len(domains)` by default. `1` makes a shared model
            (every domain uses the same feed-forward block), the paper's "one model for all domains" baseline.
        moe_layers (`"all"`, `"upper"`, `"topN"`, `"middle"` or `list[int]`): the layers whose feed-forward block is
            split into experts (`"upper"`: the upper half; `"top2"`: the last two layers).
        routing_mode (`"sentence"` or `"token"`): one expert per sequence (from `domain_ids` or the domain token
            after `[CLS]`), or one expert per token taken from `token_type_ids`.
        pooling (`"mean"` or `"cls"`): how `pooler_output` is made from the last hidden states.
        base_model_type (`str`): the kind of encoder upcycled, `"bert"`, `"roberta"` or `"mpnet"`: the embeddings and
            attention the model builds (`modeling_moebert.BASE_ARCHITECTURES`); the other BERT fields hold its base's
            settings (an MPNet's `relative_attention_num_buckets` too).
        base_model_name_or_path (`str`, *optional*): the checkpoint the experts were copied from (saved by its
            Hub id, or not at all for a local folder: see `public_model_name`).
        max_seq_length (`int`, *optional*): the length in tokens the model was trained at (train.py records it; an
            upcycled model starts with its base's); texts are truncated there by default (`sequence_length`).
        calibration (`dict`, *optional*): per domain, the map from cosine similarity to the probability that two
            texts are co-cited, `{"method": "platt", "fitted_on": "valid", "parameters": {domain: [a, b]}}` for
            `sigmoid(a * cosine + b)`; see `MoEBertModel.cocitation_probability`.
        expert_sources (`dict`, *optional*): per domain whose experts were loaded from an expert file, where from:
            `{"source", "revision", "shared_weights": "same" | "not recorded" | "other"}`.
    """

    model_type = "moebert"

    def __init__(
        self,
        domains=None,
        domain_tokens=None,
        domain_token_ids=None,
        num_experts=None,
        moe_layers="all",
        routing_mode="sentence",
        pooling="mean",
        base_model_type="bert",
        base_model_name_or_path=None,
        max_seq_length=None,
        calibration=None,
        expert_sources=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.domains = list(domains) if domains is not None else ["general"]
        self.domain_tokens = (
            list(domain_tokens) if domain_tokens is not None else [default_domain_token(d) for d in self.domains]
        )
        self.domain_token_ids = list(domain_token_ids) if domain_token_ids is not None else None
        self.num_experts = len(self.domains) if num_experts is None else int(num_experts)
        self.moe_layers = resolve_moe_layers(moe_layers, self.num_hidden_layers)
        self.routing_mode = routing_mode
        self.pooling = pooling
        self.base_model_type = base_model_type
        self.base_model_name_or_path = base_model_name_or_path
        self.max_seq_length = max_seq_length
        self.calibration = calibration
        self.expert_sources = expert_sources
        self.validate_moe()

    def to_dict(self) -> dict:
        """The fields as saved (config.json): the base model by a public name, never a local path (the name in
        memory may stay a local folder, from which `add_domain` copies new experts)."""
        output = super().to_dict()
        output["base_model_name_or_path"] = public_model_name(output.get("base_model_name_or_path"))
        return output

    def validate_moe(self):
        """Raise a `ValueError` that names the problem if the MoE fields do not fit together."""
        if not self.domains:
            raise ValueError("domains is empty: give at least one domain name, e.g. domains=['CVD', 'COPD'].")
        duplicates = sorted({d for d in self.domains if self.domains.count(d) > 1})
        if duplicates:
            raise ValueError(f"duplicate domains {duplicates}: each domain must be named once.")
        if len(self.domain_tokens) != len(self.domains):
            raise ValueError(
                f"{len(self.domain_tokens)} domain_tokens for {len(self.domains)} domains: give one token per domain."
            )
        if self.domain_token_ids is not None and len(self.domain_token_ids) != len(self.domains):
            raise ValueError(
                f"{len(self.domain_token_ids)} domain_token_ids for {len(self.domains)} domains: one id per domain."
            )
        if self.num_experts not in (1, len(self.domains)):
            raise ValueError(
                f"num_experts={self.num_experts} does not fit {len(self.domains)} domains {self.domains}: use one "
                f"expert per domain (num_experts={len(self.domains)}) or a single shared expert (num_experts=1)."
            )
        if self.routing_mode not in ROUTING_MODES:
            raise ValueError(f"routing_mode={self.routing_mode!r}: choose one of {ROUTING_MODES}.")
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"pooling={self.pooling!r}: choose one of {POOLING_MODES}.")
        unknown = sorted(set((self.calibration or {}).get("parameters", {})) - set(self.domains))
        if unknown:
            raise ValueError(f"calibration for unknown domains {unknown}: this model knows {self.domains}.")
        unknown = sorted(set(self.expert_sources or {}) - set(self.domains))
        if unknown:
            raise ValueError(f"expert_sources for unknown domains {unknown}: this model knows {self.domains}.")

    def expert_of_domain(self, domain_id: int) -> int:
        return domain_id if self.num_experts > 1 else 0

    def domain_index(self, domain: str) -> int:
        if domain not in self.domains:
            raise ValueError(f"unknown domain {domain!r}: this model knows {self.domains}.")
        return self.domains.index(domain)

    def prepend_domain_token(self, texts, domains) -> list[str]:
        """`'[CVD] ' + text` for each text and its domain name (a single name applies to all texts)."""
        if isinstance(domains, str):
            domains = [domains] * len(texts)
        return [f"{self.domain_tokens[self.domain_index(d)]} {t}" for t, d in zip(texts, domains, strict=True)]

    def sequence_length(self) -> int:
        """The tokens a text is truncated to: the length the model was trained at, within its position limit (for
        RoBERTa and MPNet fewer than they have: `usable_positions`)."""
        usable = usable_positions(self)
        return min(self.max_seq_length or usable, usable)

    def cocitation_probability(self, cosine, domain: str) -> torch.Tensor:
        """The probability that two texts of `domain` whose embeddings have this cosine similarity are co-cited:
        the domain's calibration `sigmoid(a * cosine + b)`, fitted on `valid` pairs (co-cited and random in equal
        numbers), so one threshold, e.g. 0.5, means the same in every domain, where cosines do not."""
        a, b = self.calibration_parameters(domain)
        return torch.sigmoid(a * torch.as_tensor(cosine, dtype=torch.float32) + b)

    def calibration_parameters(self, domain: str) -> tuple[float, float]:
        """(a, b) of the domain's calibration, `sigmoid(a * cosine + b)`; a ValueError saying why there is none."""
        self.domain_index(domain)  # an unknown domain: ValueError naming the known ones
        parameters = (self.calibration or {}).get("parameters", {})
        if domain not in parameters:
            raise ValueError(
                f"no calibration for domain {domain!r}: " + (
                    "this model was not calibrated, its similarities are cosines, not probabilities"
                    if not parameters else "its expert changed after the calibration was fitted"
                ) + "; fit one with `python eval.py calibrate --model PATH`."
            )
        a, b = parameters[domain]
        return a, b


__all__ = ["MoEBertConfig"]
