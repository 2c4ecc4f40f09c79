"""The OpenVINO backend: each domain's plain graph read by OpenVINO and, with int8 (the default), quantized by NNCF's
post-training quantization (weights and activations int8, calibrated on `CALIBRATION_TEXTS` of the domain's own
training texts, which the export driver supplies): the fastest CPU encoder measured on this project's CPU
(docs/speed.md). Each graph records where its calibration texts came from. NNCF sends usage data (Google Analytics)
unless told not to; it is told not to here (its telemetry replaced by its stub; the openvino-telemetry package still
writes a client id under ~/intel on import).
"""

import functools
import os
from pathlib import Path

import numpy as np
import torch

from moebert.encoders.export.encoder import ExportedEncoder
from moebert.encoders.export.graph import write_plain_graph
from moebert.encoders.export.manifest import STAMP_KEYS, Runtime

CALIBRATION_TEXTS = 300  # NNCF's default subset size


def write_graph(model, tokenizer, domain: str, path: Path, quantize: str, metadata: dict, calibration=None):
    """Read the plain graph into OpenVINO, quantize it (int8) on `calibration` ((the domain's training texts, where
    they come from)), stamp it with `metadata` and the calibration's source, and save it as OpenVINO IR (`path`, .xml
    beside its .bin)."""
    import openvino

    plain = path.with_suffix(".plain.onnx")
    write_plain_graph(model, tokenizer, domain, plain)
    graph = openvino_core().read_model(str(plain))
    if quantize == "int8":
        texts, source = calibration
        graph = quantized(graph, tokenizer(model.prepend_domain_token(texts, domain), truncation=True,
                                           max_length=model.config.sequence_length()))
        metadata = metadata | {"moebert.calibration_texts": source}
    for key, value in metadata.items():
        graph.set_rt_info(value, key.split("."))
    openvino.save_model(graph, str(path), compress_to_fp16=False)
    plain.unlink()


def quantized(graph, tokens):
    """NNCF's post-training int8 quantization for transformers (softmax and normalisation kept in floating point),
    its ranges taken from these texts, one at a time."""
    nncf = import_nncf()
    samples = [{"input_ids": np.array([ids], dtype=np.int64), "attention_mask": np.array([mask], dtype=np.int64)}
               for ids, mask in zip(tokens["input_ids"], tokens["attention_mask"])]
    return nncf.quantize(graph, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER,
                         subset_size=len(samples))


def import_nncf():
    """nncf, its telemetry off: NNCF_CI is the switch its telemetry wrapper reads when nncf is first imported."""
    os.environ.setdefault("NNCF_CI", "1")
    import nncf

    return nncf


def versions() -> dict:
    import openvino

    return {"torch": torch.__version__, "openvino": openvino.__version__, "nncf": import_nncf().__version__}


class OpenVinoEncoder(ExportedEncoder):
    """Encodes texts with an OpenVINO export, on the CPU, each call answered as soon as it can (latency hint): one
    process uses the cores it is given."""

    def open_graph(self, path: Path):
        core = openvino_core()
        graph = core.read_model(str(path))
        metadata = {key: graph.get_rt_info(key.split(".")).astype(str) for key in STAMP_KEYS
                    if graph.has_rt_info(key.split("."))}
        settings = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": torch.get_num_threads()}
        if self.manifest["quantize"] == "none":
            settings["INFERENCE_PRECISION_HINT"] = "f32"  # fp32 means fp32, not the CPU's bf16
        request = core.compile_model(graph, "CPU", settings).create_infer_request()

        def run(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
            return request.infer({"input_ids": input_ids, "attention_mask": attention_mask})[0].copy()

        return metadata, run


@functools.cache
def openvino_core():
    """One OpenVINO runtime for every domain's graph: each Core loads its own plugins."""
    import openvino

    return openvino.Core()


RUNTIME = Runtime("openvino", ".xml", write_graph, OpenVinoEncoder, versions, CALIBRATION_TEXTS)
