"""Exports of a MoE-BERT for fast CPU encoding, and their cache: one graph per domain on ONNX Runtime (`onnx`) or
OpenVINO (`openvino`), int8 by default.

    python -m moebert export --model outputs/moebert --output_dir outputs/moebert-ov [--runtime onnx|openvino]
                             [--quantize int8|none] [--domains Chou_2004,Oud_2018]

`eval.py` and `search.py` take `--backend onnx|openvino`: given an export folder they use it (on the runtime it was
made for); given a MoE-BERT they export it on first use into a cache keyed by what the export copies (`export_key`:
the weights, the config without its calibration, the tokenizer; $MOEBERT_CACHE/<runtime>, default
~/.cache/moebert/<runtime>) and reuse it afterwards.
"""

import gc
import hashlib
import json
import os
import sys
from pathlib import Path

from tqdm.auto import tqdm
from transformers.utils import cached_file

from configuration_moebert import MoEBertConfig
from moebert import onnx_export, openvino_export
from moebert.atomic import writing_folder
from moebert.export_format import EXPORT_FORMAT, MANIFEST, QUANTIZE_CHOICES, ExportedEncoder, ExportError, \
    graph_file_name, read_manifest, stamp
from moebert.loading import is_moebert, load_moebert, model_fingerprint
from moebert.names import public_name
from moebert.training_state import FILE as TRAINING_STATE

RUNTIMES = {runtime.name: runtime for runtime in (onnx_export.RUNTIME, openvino_export.RUNTIME)}


def export(model, tokenizer, fingerprint: str, output_dir, quantize: str = "int8", domains=None, source=None,
           runtime: str = "onnx", training_data: dict | None = None) -> Path:
    """Write the export of `model` (a MoE-BERT) for `domains` (default: all) on `runtime` to `output_dir`; the folder
    appears complete or not at all. `fingerprint` names the weights (see moebert.loading.model_fingerprint);
    `training_data`: {domain: dataset source} the model was trained on, for runtimes that calibrate."""
    if quantize not in QUANTIZE_CHOICES:
        raise ExportError(f"--quantize {quantize!r}: choose one of {list(QUANTIZE_CHOICES)}.")
    if runtime not in RUNTIMES:
        raise ExportError(f"--runtime {runtime!r}: choose one of {list(RUNTIMES)}.")
    target = RUNTIMES[runtime]
    domains = list(domains or model.config.domains)
    indices = {domain: model.config.domain_index(domain) for domain in domains}  # unknown: ValueError naming the known
    with writing_folder(Path(output_dir)) as work:
        graphs = {}
        for domain in tqdm(domains, desc=f"exporting to {runtime} ({quantize})", unit="domain"):
            graphs[domain] = graph_file_name(indices[domain], domain, target.suffix)
            target.write_graph(model, tokenizer, domain, work / graphs[domain], quantize,
                               stamp(fingerprint, domain, quantize), (training_data or {}).get(domain))
            gc.collect()  # the exporter leaves reference cycles holding each graph: 0.5 GB a domain otherwise
        tokenizer.save_pretrained(work)
        model.config.save_pretrained(work)
        manifest = {"format": EXPORT_FORMAT, "runtime": runtime, "source": source, "fingerprint": fingerprint,
                    "quantize": quantize, "graphs": graphs, "exported_with": target.versions()}
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(output_dir)


def is_export(folder) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def open_export(folder, max_seq_length: int, batch_size: int, config=None) -> ExportedEncoder:
    """The encoder of an export folder, on the runtime it was made for."""
    runtime = read_manifest(Path(folder)).get("runtime", "onnx")
    if runtime not in RUNTIMES:
        raise ExportError(f"{folder} was exported for runtime {runtime!r}, which this version does not run "
                          f"({list(RUNTIMES)}): export the model again.")
    return RUNTIMES[runtime].encoder(folder, max_seq_length, batch_size, config)


# ------------------------------------------------------------------------------------------------ cache


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
    path = cached_file(spec, TRAINING_STATE, _raise_exceptions_for_missing_entries=False,
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
        print(f"exporting {source or 'the model'} to {runtime} ({quantize}) once, into {folder}", file=sys.stderr)
        model, tokenizer = load_model()
        export(model, tokenizer, fingerprint, folder, quantize, source=source, runtime=runtime,
               training_data=training_data)
    return open_export(folder, max_seq_length, batch_size, config)
