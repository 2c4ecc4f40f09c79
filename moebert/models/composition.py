"""One model from domain experts that different people published: a base, upcycled, and each domain's expert file
loaded into it (checked to have been trained on the same shared weights), written as a complete model folder.

Two groups that upcycle the same base and train the experts alone (the quick recipe) leave the shared weights
exactly the base's; the composed model then computes, for each domain, exactly what its publisher's model computed.
"""

import json
from pathlib import Path

from experts_moebert import read_expert_file, resolve_expert
from moebert.models.builder import build_model
from moebert.models.card import model_card
from moebert.models.saving import save_model
from moebert.names import public_name


class CompositionError(ValueError):
    """Experts that cannot be composed as asked; the message names the problem and the fix."""


def parse_expert_spec(spec: str) -> tuple[str, str, str | None]:
    """`ORG/REPO:DOMAIN`, `ORG/REPO@REVISION:DOMAIN` or `path/to/DOMAIN.safetensors` -> (source, domain, revision)."""
    if Path(spec).is_file():
        return spec, read_expert_file(spec)[1]["domain"], None
    source, sep, domain = spec.rpartition(":")
    if not sep or not source or not domain:
        raise CompositionError(f"--expert {spec!r}: write ORG/REPO:DOMAIN (a Hub repo with experts/DOMAIN.safetensors) "
                               "or the path of an expert file.")
    source, _, revision = source.partition("@")
    return source, domain, revision or None


def compose(base: str, experts: list[str], allow_other_shared_weights: bool = False):
    """(model, tokenizer): `base` (a BERT, upcycled with the experts' layout, or a MoE-BERT) with each expert of
    `experts` (specs, see parse_expert_spec) loaded into its domain."""
    specs = [parse_expert_spec(spec) for spec in experts]
    domains = [domain for _, domain, _ in specs]
    duplicated = sorted({d for d in domains if domains.count(d) > 1})
    if duplicated:
        raise CompositionError(f"domains {duplicated} are given by more than one --expert: give each domain once.")
    files = {domain: resolve_expert(source, domain, revision) for source, domain, revision in specs}
    files = {domain: (path, provenance | ({"source": public_name(path)} if Path(path) == Path(source) else {}))
             for (source, _, _), (domain, (path, provenance)) in zip(specs, files.items())}  # a local file: as typed
    layers = json.loads(read_expert_file(files[domains[0]][0])[1]["moe_layers"])  # a BERT is upcycled alike
    model, tokenizer = build_model(base, domains, moe_layers=layers, add_missing_domains=False)  # load_expert adds them
    for domain, (path, provenance) in files.items():
        model.load_expert(path, tokenizer=tokenizer, domain=domain, allow_other_shared_weights=allow_other_shared_weights)
        model.config.expert_sources[domain] |= provenance  # the Hub repo and commit, not the cache's file
    lengths = {int(read_expert_file(path)[1].get("max_seq_length", 0)) for path, _ in files.values()} - {0}
    if lengths:
        model.config.max_seq_length = min(lengths)  # what sentence-transformers encodes at
    return model, tokenizer


def save_composed(model, tokenizer, folder: Path, repo: str) -> Path:
    """A complete model folder (moebert.models.saving) whose card lists each expert's source."""
    return save_model(model, tokenizer, folder, model_card(model.config, repo))
