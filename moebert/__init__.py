"""MoEBERT's library: what `train.py`, `eval.py`, `search.py` and `python -m moebert` are built from.

The model itself lives in the three Hub files beside this package (`modeling_moebert.py`, `configuration_moebert.py`,
`experts_moebert.py`), which import nothing from here, so `trust_remote_code` can load them anywhere. The package is a
few core modules (`names`, `atomic`, `device`, `loading`, `logs`) and one subpackage per stage, each importing only
the stages below it: `data`, `encoders`, `evaluation`, `models`, then `training` and `search` (docs/design.md).
"""
