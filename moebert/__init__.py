"""MoEBERT's library: what `train.py`, `eval.py`, `search.py` and `python -m moebert` are built from.

The model itself lives in the two Hub files beside this package, `modeling_moebert.py` and
`configuration_moebert.py`, which import nothing from here (so `trust_remote_code` can load them anywhere). Each
module of this package is one concept; docs/design.md (the "Code map" section) lists them.
"""
