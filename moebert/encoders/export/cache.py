"""The cache of exports made on first use, and the encoder of a model name on an exported backend.

`eval.py` and `search.py` take `--backend onnx|openvino`: given an export folder they use it (on the runtime it was
made for); given a MoE-BERT they export it on first use into a cache keyed by what the export copies (`export_key`:
the weights, the config without its calibration, the tokenizer; $MOEBERT_CACHE/<runtime>, default
~/.cache/moebert/<runtime>) and reuse it afterwards.
"""

import hashlib
import json
import logging
import os
from pathlib import Path

from transformers.utils import cached_file

from configuration_moebert import MoEBertConfig
from moebert.encoders.export.encoder import ExportedEncoder
from moebert.encoders.export.manifest import EXPORT_FORMAT, ExportError, is_export
from moebert.encoders.export.runtimes import export, open_export
from moebert.loading import is_moebert, load_moebert, model_fingerprint
from moebert.names import TRAINING_STATE_FILE, public_name

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("MOEBERT_CACHE", Path.home() / ".cache" / "moebert"))


def cached_export_dir(key: str, quantize: str, runtime: str = "onnx") -> Path:
    """Where the export of a model lives in the cache: keyed by everything the export copies (`export_key`), the
    quantization and the export format, so a changed model or exporter is exported afresh, never served stale
    graphs."""
    digest = hashlib.sha256(f"{key}|{quantize}|{EXPORT_FORMAT}".encode()).hexdigest()[:24]
    return cache_root() / runtime / f"{digest}-{quantize}"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "added_tokens.json")


def export_key(spec: str) -> str:
    """What an export of this MoE-BERT copies: its weights (their fingerprint) and, for a local folder, its config
    and tokenizer files (domains, their tokens and the layout: two models upcycled alike from one base share their
    weight files but not their domains). The calibration is left out: it is read from the model at every load, so
    `eval.py calibrate` needs no new export."""
    digest = hashlib.sha256(model_fingerprint(spec).encode())
    folder = Path(spec)
    if folder.is_dir():
        config = json.loads((folder / "config.json").read_text())
        config.pop("calibration", None)
        digest.update(json.dumps(config, sort_keys=True).encode())
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                digest.update(name.encode() + (folder / name).read_bytes())
    return digest.hexdigest()


def training_data_of(spec: str) -> dict:
    """{domain: dataset source} from the model's training_state.json, {} for a model that has none."""
    path = cached_file(spec, TRAINING_STATE_FILE, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)
    return json.loads(Path(path).read_text()).get("datasets", {}) if path else {}


def load_export_encoder(spec: str, max_seq_length: int, batch_size: int, runtime: str = "onnx",
                        quantize: str = "int8") -> ExportedEncoder:
    """An export folder as it is; a MoE-BERT (folder or Hub id) through its cached export on `runtime`, made on first
    use."""
    if is_export(spec):
        return open_export(spec, max_seq_length, batch_size)
    check_moebert(spec)
    return cached_export_encoder(model_fingerprint(spec), lambda: load_moebert(spec), max_seq_length, batch_size,
                                 runtime, quantize, source=public_name(spec), key=export_key(spec),
                                 config=MoEBertConfig.from_pretrained(spec), training_data=training_data_of(spec))


def check_moebert(spec: str):
    if not is_moebert(spec):
        raise ExportError(f"{spec} is no MoE-BERT and no export of one: the exported backends serve MoE-BERT models.")


def cached_export_encoder(fingerprint: str, load_model, max_seq_length: int, batch_size: int, runtime: str = "onnx",
                          quantize: str = "int8", source: str | None = None, key: str | None = None, config=None,
                          training_data: dict | None = None) -> ExportedEncoder:
    """The encoder of the cached export of a model whose weights have this fingerprint (and whose export is named by
    `key`, by default the fingerprint); `load_model() -> (model, tokenizer)` is called to export them only when the
    cache has none. `config`: see ExportedEncoder."""
    folder = cached_export_dir(key or fingerprint, quantize, runtime)
    if not is_export(folder):
        logger.info(f"exporting {source or 'the model'} to {runtime} ({quantize}) once, into {folder}")
        model, tokenizer = load_model()
        export(model, tokenizer, fingerprint, folder, quantize, source=source, runtime=runtime,
               training_data=training_data)
    return open_export(folder, max_seq_length, batch_size, config)
