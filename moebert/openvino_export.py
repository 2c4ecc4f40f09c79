"""The OpenVINO backend: each domain's plain graph read by OpenVINO and, with int8 (the default), quantized by NNCF's
post-training quantization (weights and activations int8, calibrated on the domain's own training texts): the
fastest CPU encoder measured on this project's CPU (docs/speed.md).

Calibration texts: `CALIBRATION_TEXTS` texts of the domain's training data, as the model's `training_state.json`
names it, topped up from the SYNERGY sample shipped in data/ when the domain has fewer, or that sample alone when
the data cannot be loaded here. Each graph records which. NNCF sends usage data (Google Analytics) unless told not
to; it is told not to here (its telemetry replaced by its stub; the openvino-telemetry package still writes a
client id under ~/intel on import).
"""

import functools
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

from moebert.export_format import STAMP_KEYS, ExportedEncoder, Runtime, write_plain_graph
from moebert.pair_datasets import DatasetError, load_domain_dataset, sample_specs

CALIBRATION_TEXTS = 300  # NNCF's default subset size
SHIPPED_SAMPLE = "the SYNERGY sample shipped in data/synergy"


def write_graph(model, tokenizer, domain: str, path: Path, quantize: str, metadata: dict, training_data=None):
    """Read the plain graph into OpenVINO, quantize it (int8) on the domain's training texts, stamp it with
    `metadata` and the calibration's source, and save it as OpenVINO IR (`path`, .xml beside its .bin)."""
    import openvino

    plain = path.with_suffix(".plain.onnx")
    write_plain_graph(model, tokenizer, domain, plain)
    graph = openvino_core().read_model(str(plain))
    if quantize == "int8":
        texts, source = calibration_texts(domain, training_data)
        length = min(getattr(model.config, "max_seq_length", None) or 256,  # recorded by train.py; else its default
                     model.config.max_position_embeddings)
        graph = quantized(graph, tokenizer(model.prepend_domain_token(texts, domain), truncation=True,
                                           max_length=length))
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


def calibration_texts(domain: str, training_data: str | None) -> tuple[list[str], str]:
    """CALIBRATION_TEXTS texts to calibrate on and where they come from: the domain's training split, topped up from
    the shipped sample when it has fewer (a domain of 35 texts samples its activation ranges poorly; chosen on valid,
    docs/results.md), else the shipped sample alone."""
    own = []
    if training_data:
        try:
            own = _sample(training_texts(training_data, domain))
        except DatasetError as error:
            print(f"calibrating {domain} on {SHIPPED_SAMPLE}: its training data cannot be loaded here "
                  f"({str(error).splitlines()[0][:160]})", file=sys.stderr)
    if len(own) == CALIBRATION_TEXTS:
        return own, training_data
    taken = set(own)
    fill = [text for text in shipped_sample() if text not in taken][: CALIBRATION_TEXTS - len(own)]
    return own + fill, f"{training_data} + {len(fill)} texts of {SHIPPED_SAMPLE}" if own else SHIPPED_SAMPLE


def training_texts(source: str, domain: str | None = None) -> list[str]:
    """Both sides of a dataset's training pairs."""
    train = load_domain_dataset(source, splits=("train",), domain=domain)["train"]
    return [*train["a"], *train["b"]]


@functools.cache
def shipped_sample() -> tuple[str, ...]:
    """CALIBRATION_TEXTS of the shipped sample's training texts, read and drawn once for every domain that needs them
    (at most CALIBRATION_TEXTS of them can be one domain's own, so what remains always fills the gap)."""
    return tuple(_sample([text for source in sample_specs().values() for text in training_texts(source)]))


def _sample(texts: list[str]) -> list[str]:
    unique = sorted({text for text in texts if text and text.strip()})
    return random.Random(0).sample(unique, min(CALIBRATION_TEXTS, len(unique)))


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


RUNTIME = Runtime("openvino", ".xml", write_graph, OpenVinoEncoder, versions)
