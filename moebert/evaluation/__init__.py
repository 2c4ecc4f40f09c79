"""Evaluation: the pair and ranking metrics and the paired bootstrap (`metrics`), fitting calibrations (`calibration`),
scoring an encoder on pair datasets (`scoring`) and what eval.py writes (`report`)."""
