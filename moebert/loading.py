"""Loading models by name or path without running code from their folders, and naming their weights.

A MoE-BERT is built by this project's own classes (the `modeling_moebert.py` shipped in its folder is not
imported); any other model that needs its own code is refused unless `trust_remote_code=True`.
"""

import hashlib
import json
from pathlib import Path

from transformers import AutoModel, AutoTokenizer, PretrainedConfig

from configuration_moebert import usable_positions


class RemoteCodeError(ValueError):
    """A model that needs Python code from its own folder or repo, which was not allowed."""


def is_moebert(name_or_path: str) -> bool:
    config, _ = PretrainedConfig.get_config_dict(name_or_path)  # local folder or Hub id; OSError when neither
    return config.get("model_type") == "moebert"


def load_moebert(name_or_path: str):
    """(model, tokenizer) of a saved MoE-BERT, built by this project's classes: nothing in the folder is executed."""
    from safetensors import SafetensorError

    from modeling_moebert import MoEBertModel

    try:
        model = MoEBertModel.from_pretrained(name_or_path)
    except SafetensorError as error:
        raise ValueError(
            f"{name_or_path}: its weights cannot be read ({error}): the file is truncated or corrupt; download or copy "
            "it again."
        ) from None
    return model, AutoTokenizer.from_pretrained(name_or_path, config=model.config)  # no AutoConfig, no custom code


def load_transformer(name_or_path: str, trust_remote_code: bool = False):
    """(model, tokenizer) of a MoE-BERT (see load_moebert) or of any other encoder."""
    if is_moebert(name_or_path):
        return load_moebert(name_or_path)
    try:
        model = AutoModel.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        return model, AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except ValueError as error:
        refuse_remote_code(name_or_path, error)


def refuse_remote_code(name_or_path: str, error: Exception):
    """Re-raise a loading error; one that asks for remote code as a RemoteCodeError naming the flag."""
    if "trust_remote_code" in str(error):
        raise RemoteCodeError(
            f"{name_or_path} needs Python code from its own repository to load; pass --trust_remote_code if you "
            "trust it (MoE-BERT folders never need it)."
        ) from None
    raise error


def model_fingerprint(name_or_path: str) -> str:
    """What names a model's weights: a Hub id with its commit, or a hash of a local folder's weight files."""
    if Path(name_or_path).is_dir():
        return weights_fingerprint(name_or_path)
    config, _ = PretrainedConfig.get_config_dict(name_or_path)
    return f"{name_or_path}@{config.get('_commit_hash')}"


def weights_fingerprint(folder: str, domains: list[str] = ()) -> str:
    """sha256 over the folder's weight files (and the domains of a model upcycled from them): same vectors, same
    print."""
    digest = hashlib.sha256(json.dumps(list(domains)).encode())
    for weights in sorted(Path(folder).glob("*.safetensors")):
        with open(weights, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def max_seq_length_of(name_or_path: str, config) -> int:
    """The length a model was trained at: `max_seq_length` in its config (train.py records it), else in its
    sentence-transformers settings, else the tokens its positions allow."""
    from transformers.utils import cached_file

    if getattr(config, "max_seq_length", None):
        return int(config.max_seq_length)
    settings = cached_file(name_or_path, "sentence_bert_config.json", _raise_exceptions_for_missing_entries=False)
    if settings and json.loads(Path(settings).read_text()).get("max_seq_length"):
        return int(json.loads(Path(settings).read_text())["max_seq_length"])
    return usable_positions(config)
