"""The runtimes an export targets (ONNX Runtime, OpenVINO), writing the export of a model on one of them, and opening
an export folder on the runtime it was made for.

    python -m moebert export --model outputs/moebert --output_dir outputs/moebert-ov [--runtime onnx|openvino]
                             [--quantize int8|none] [--domains Chou_2004,Oud_2018]
"""

import gc
import json
from pathlib import Path

from tqdm.auto import tqdm

from moebert.atomic import writing_folder
from moebert.data.pairs import text_sample
from moebert.encoders.export import onnx_runtime, openvino_runtime
from moebert.encoders.export.encoder import ExportedEncoder
from moebert.encoders.export.manifest import EXPORT_FORMAT, MANIFEST, QUANTIZE_CHOICES, ExportError, graph_file_name, \
    read_manifest, stamp

RUNTIMES = {runtime.name: runtime for runtime in (onnx_runtime.RUNTIME, openvino_runtime.RUNTIME)}


def export(model, tokenizer, fingerprint: str, output_dir, quantize: str = "int8", domains=None, source=None,
           runtime: str = "onnx", training_data: dict | None = None) -> Path:
    """Write the export of `model` (a MoE-BERT) for `domains` (default: all) on `runtime` to `output_dir`; the folder
    appears complete or not at all. `fingerprint` names the weights (see moebert.loading.model_fingerprint);
    `training_data`: {domain: dataset source} the model was trained on, where a runtime that quantizes activations
    draws its calibration texts (moebert.data.pairs.text_sample)."""
    if quantize not in QUANTIZE_CHOICES:
        raise ExportError(f"--quantize {quantize!r}: choose one of {list(QUANTIZE_CHOICES)}.")
    if runtime not in RUNTIMES:
        raise ExportError(f"--runtime {runtime!r}: choose one of {list(RUNTIMES)}.")
    target = RUNTIMES[runtime]
    domains = list(domains or model.config.domains)
    indices = {domain: model.config.domain_index(domain) for domain in domains}  # unknown: ValueError naming the known
    calibrates = quantize == "int8" and target.calibration_texts
    with writing_folder(Path(output_dir)) as work:
        graphs = {}
        for domain in tqdm(domains, desc=f"exporting to {runtime} ({quantize})", unit="domain"):
            graphs[domain] = graph_file_name(indices[domain], domain, target.suffix)
            calibration = text_sample(domain, (training_data or {}).get(domain), target.calibration_texts) \
                if calibrates else None
            target.write_graph(model, tokenizer, domain, work / graphs[domain], quantize,
                               stamp(fingerprint, domain, quantize), calibration)
            gc.collect()  # the exporter leaves reference cycles holding each graph: 0.5 GB a domain otherwise
        tokenizer.save_pretrained(work)
        model.config.save_pretrained(work)
        manifest = {"format": EXPORT_FORMAT, "runtime": runtime, "source": source, "fingerprint": fingerprint,
                    "quantize": quantize, "graphs": graphs, "exported_with": target.versions()}
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(output_dir)


def open_export(folder, max_seq_length: int, batch_size: int, config=None) -> ExportedEncoder:
    """The encoder of an export folder, on the runtime it was made for."""
    runtime = read_manifest(Path(folder)).get("runtime", "onnx")
    if runtime not in RUNTIMES:
        raise ExportError(f"{folder} was exported for runtime {runtime!r}, which this version does not run "
                          f"({list(RUNTIMES)}): export the model again.")
    return RUNTIMES[runtime].encoder(folder, max_seq_length, batch_size, config)
