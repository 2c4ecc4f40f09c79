"""MoE-BERT expert files: one domain's experts in a safetensors file of their own, to publish, download and compose.

A file holds, for each MoE layer `i`, `layer.i.intermediate.dense.{weight,bias}` and `layer.i.output.dense.{weight,
bias}`, the domain token's embedding row (`domain_token_embedding`), and metadata: the format, the domain and its
token, the layout (`moe_layers`, `hidden_size`, `intermediate_size`), the base by its public name, the fingerprint of
the shared weights the experts were trained against (`shared_weights`: everything that is not an expert), the
domain's calibration and the length it was trained at. An expert computes what its publisher's model computed only
on the same shared weights: loading checks that fingerprint and refuses a mismatch unless asked.

Imported by `modeling_moebert.py` (relatively, so the Hub serves it beside it); imports only torch and transformers.
"""

import hashlib
import json
import os
import re

import torch
from transformers.utils import logging

try:
    from .configuration_moebert import public_model_name
except ImportError:  # imported as a top-level module from a source checkout rather than from the Hub
    from configuration_moebert import public_model_name

logger = logging.get_logger(__name__)

EXPERT_FILE_FORMAT = "moebert-expert-v1"  # later fields are additions: files of every version read alike
WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"


class ExpertFileError(ValueError):
    """An expert file that cannot be loaded into this model; the message names the problem and what works instead."""


def shared_weights_fingerprint(model) -> str:
    """sha256 over every weight that is not an expert, in float32: embeddings (the word embeddings without the rows
    of the domain tokens, which differ between models of other domains), attention, LayerNorms. Two models upcycled
    from one base, whose experts alone were trained, have the same print."""
    digest = hashlib.sha256()
    domain_rows = model.config.domain_token_ids or []
    for name, tensor in sorted(model.state_dict().items()):
        if ".experts." in name:
            continue
        if name == WORD_EMBEDDINGS and domain_rows:
            tensor = tensor[: min(domain_rows)]  # domain tokens come after the base vocabulary
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def save_expert_files(model, folder, domains=None):
    """`<folder>/<DOMAIN>.safetensors` for each domain (default: all), the shared weights' fingerprint taken once."""
    fingerprint = shared_weights_fingerprint(model)
    for domain in domains or model.config.domains:
        save_expert_file(model, domain, os.path.join(folder, f"{domain}.safetensors"), fingerprint)


def save_expert_file(model, domain: str, path, fingerprint: str | None = None):
    """Write one domain's experts (and its domain-token embedding row) to their own safetensors file."""
    from safetensors.torch import save_file

    config = model.config
    index = config.domain_index(domain)
    expert_state = model.expert_state(config.expert_of_domain(index))
    tensors = {k.removeprefix("encoder."): v.contiguous() for k, v in expert_state.items()}
    if config.domain_token_ids is not None:
        tensors["domain_token_embedding"] = model.get_input_embeddings().weight[config.domain_token_ids[index]].detach().clone()
    metadata = {
        "format": EXPERT_FILE_FORMAT,
        "domain": domain,
        "domain_token": config.domain_tokens[index],
        "moe_layers": json.dumps(config.moe_layers),
        "hidden_size": str(config.hidden_size),
        "intermediate_size": str(config.intermediate_size),
        "shared_weights": fingerprint or shared_weights_fingerprint(model),
    }
    base = public_model_name(config.base_model_name_or_path)
    if base:  # a local folder is named by nothing rather than wrongly
        metadata["base_model_name_or_path"] = base
    parameters = (config.calibration or {}).get("parameters", {})
    if domain in parameters:
        details = {k: v for k, v in config.calibration.items() if k != "parameters"}
        metadata["calibration"] = json.dumps(details | {"parameters": parameters[domain]})
    if getattr(config, "max_seq_length", None):
        metadata["max_seq_length"] = str(config.max_seq_length)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp_path = f"{path}.tmp"
    save_file({k: v.detach().cpu() for k, v in tensors.items()}, tmp_path, metadata=metadata)
    os.replace(tmp_path, path)


def resolve_expert(source, domain: str | None = None, revision: str | None = None) -> tuple[str, dict]:
    """(local path, provenance {"source", "revision"}) of an expert file: a local file, or `experts/<domain>.safetensors`
    of a Hub repo (downloaded through the Hugging Face cache, so offline mode serves what was downloaded before)."""
    if os.path.isfile(source):
        return str(source), {"source": os.path.basename(source), "revision": None}  # no folder of this machine
    if os.path.isdir(source) or domain is None:
        where = "a folder" if os.path.isdir(source) else "no local file"
        raise FileNotFoundError(f"expert file {source} not found ({where}): give a file, or a Hub repo id with domain=.")
    from transformers.utils import cached_file

    try:
        path = cached_file(str(source), f"experts/{domain}.safetensors", revision=revision)
    except OSError as error:
        raise FileNotFoundError(f"no expert file experts/{domain}.safetensors in {source}"
                                f"{'@' + revision if revision else ''} ({str(error).splitlines()[0]})") from None
    commit = re.search(r"snapshots/([0-9a-f]{40})/", path.replace(os.sep, "/"))
    return path, {"source": str(source), "revision": commit[1] if commit else revision}


def read_expert_file(path) -> tuple[dict, dict]:
    """(tensors, metadata) of an expert file; a ValueError naming the problem for anything else."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError) as error:
        raise ExpertFileError(
            f"{path} is not a readable safetensors file ({error}): it may be truncated or corrupt; download it again."
        ) from None
    if metadata.get("format") != EXPERT_FILE_FORMAT:
        raise ExpertFileError(f"{path} is not a MoE-BERT expert file (metadata format {metadata.get('format')!r}).")
    return tensors, metadata


def check_fits(model, path, tensors: dict, metadata: dict, domain: str | None, allow_other_shared_weights: bool) -> str:
    """Refuse, in one line, a file that does not fit `model`; returns what its shared weights are: "same", "not
    recorded" (an older file) or "other" (allowed)."""
    config = model.config
    expected = {"moe_layers": json.dumps(config.moe_layers), "hidden_size": str(config.hidden_size),
                "intermediate_size": str(config.intermediate_size)}
    mismatched = {k: (metadata.get(k), v) for k, v in expected.items() if metadata.get(k) != v}
    if mismatched:
        details = ", ".join(f"{k}: file {f}, model {m}" for k, (f, m) in mismatched.items())
        raise ExpertFileError(f"{path} does not fit this model ({details}): it was made for another base or layout.")
    missing = sorted(set(model.expert_state(0)) - {f"encoder.{k}" for k in tensors})
    if missing:
        raise ExpertFileError(f"{path} lacks {missing[:4]}{'...' if len(missing) > 4 else ''}: not a complete expert file.")
    if domain is not None and metadata["domain"] != domain:
        raise ExpertFileError(f"{path} holds the experts of domain {metadata['domain']!r}, not {domain!r}.")
    if "shared_weights" not in metadata:
        return "not recorded"
    if metadata["shared_weights"] == shared_weights_fingerprint(model):
        return "same"
    if allow_other_shared_weights:
        return "other"
    file_base, model_base = metadata.get("base_model_name_or_path"), public_model_name(config.base_model_name_or_path)
    names = f"{file_base or 'a local folder'}, this model {model_base or 'a local folder'}"
    why = (f"it was upcycled from another base ({names})" if file_base != model_base else
           "its publisher trained the shared weights too (all weights, e.g. the full recipe), not the experts alone")
    raise ExpertFileError(
        f"{path}: the experts of {metadata['domain']!r} were trained on other shared weights than this model's: {why}. "
        "Load the publisher's whole model instead, or train this domain on this model with the experts-only recipe "
        "(python train.py --model_name_or_path MODEL --dataset DOMAIN=SOURCE); allow_other_shared_weights=True loads "
        "it anyway, and the card then says so."
    )


def load_expert_file(model, source, tokenizer=None, domain: str | None = None, revision: str | None = None,
                allow_other_shared_weights: bool = False) -> str:
    """Load an expert file (a path, or a Hub repo id with `domain`) into `model`: it replaces that domain's experts,
    or adds the domain (then `tokenizer` is needed, for its token). The domain's calibration comes with it (or, from
    an older file, is dropped: it was fitted for the expert replaced); `config.expert_sources` records where the
    experts came from. Returns the domain. A refusal leaves the model as it was."""
    path, provenance = resolve_expert(source, domain, revision)
    tensors, metadata = read_expert_file(path)
    shared = check_fits(model, path, tensors, metadata, domain, allow_other_shared_weights)
    domain = metadata["domain"]
    if domain not in model.config.domains and tokenizer is None:
        raise ExpertFileError(f"{path} holds the new domain {domain!r}: pass tokenizer= so its token can be added.")
    if shared == "not recorded":
        logger.warning(f"{path} records no fingerprint of the shared weights its experts were trained on (an older "
                       "file): whether it computes here what it computed for its publisher cannot be checked.")
    if domain not in model.config.domains:
        model.add_domain(domain, tokenizer, init_from=model.config.domains[0], token=metadata["domain_token"])
    index = model.config.domain_index(domain)
    model.load_expert_state(model.config.expert_of_domain(index), {f"encoder.{k}": v for k, v in tensors.items()})
    if "domain_token_embedding" in tensors and model.config.domain_token_ids is not None:
        with torch.no_grad():
            model.get_input_embeddings().weight[model.config.domain_token_ids[index]] = tensors["domain_token_embedding"]
    take_calibration(model.config, domain, metadata.get("calibration"))
    model.config.expert_sources = (model.config.expert_sources or {}) | {domain: provenance | {"shared_weights": shared}}
    return domain


def take_calibration(config, domain: str, recorded: str | None):
    """The expert file's calibration becomes the domain's; without one, the domain's old one goes."""
    parameters = (config.calibration or {}).get("parameters", {})
    parameters.pop(domain, None)
    if recorded:
        recorded = json.loads(recorded)
        details = config.calibration or {k: v for k, v in recorded.items() if k != "parameters"}
        config.calibration = details | {"parameters": parameters | {domain: recorded["parameters"]}}
