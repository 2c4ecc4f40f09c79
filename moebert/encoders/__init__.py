"""Encoders: texts of one domain in, one vector per text out (`interface`), on torch (`transformer`), for the models
compared against (`baselines`) and as exported graphs (`export/`); the options eval.py and search.py share
(`options`) and the one function that turns a model name into an encoder (`loader`)."""
