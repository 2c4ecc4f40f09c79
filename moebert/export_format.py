"""What every exported runtime shares: the graph each domain's expert becomes, the export folder's manifest, and the
encoder that reads such a folder. The runtimes themselves: `moebert.onnx_export` (ONNX Runtime) and
`moebert.openvino_export` (OpenVINO); the export driver and its cache: `moebert.exports`.

A MoE-BERT sends a whole text through one domain's expert, so for one domain it is a plain BERT
(`MoEBertModel.extract_expert`). Each graph is that BERT with the model's pooling on top: the token ids of texts that
start with the domain token and their attention mask in, the pooled embedding out (the MoE-BERT's `pooler_output` for
that domain). An export folder holds one graph per domain, the tokenizer, the MoE-BERT's config (domains,
calibration) and `onnx_manifest.json`, which names the runtime and the fingerprint of the weights exported; every
graph carries the same fingerprint and its domain in its own metadata, so a graph of another model or another domain
is refused.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from configuration_moebert import MoEBertConfig
from moebert.encoders import Encoder, encode_in_batches

MANIFEST = "onnx_manifest.json"
EXPORT_FORMAT = 1  # part of the cache key: a change to what a graph computes must not reuse older exports
QUANTIZE_CHOICES = ("int8", "none")


class ExportError(ValueError):
    """An export that cannot serve what was asked; the message names the problem and the fix."""


@dataclass(frozen=True)
class Runtime:
    """One runtime an export can target. `write_graph(model, tokenizer, domain, path, quantize, stamp,
    training_data)` writes one domain's graph (`training_data`: where that domain's training texts are, for runtimes
    that calibrate on them); `encoder` reads an export folder of this runtime."""

    name: str
    suffix: str
    write_graph: Callable
    encoder: type
    versions: Callable[[], dict]


class PooledExpert(torch.nn.Module):
    """One domain's expert (a plain BertModel) with the MoE-BERT's pooling on top: the module that is exported."""

    def __init__(self, expert, pool):
        super().__init__()
        self.expert, self.pool = expert, pool

    def forward(self, input_ids, attention_mask):
        hidden = self.expert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.pool(hidden, attention_mask)


def write_plain_graph(model, tokenizer, domain: str, path: Path):
    """torch.onnx's graph of one domain's expert and the pooling, unfused, fp32, any batch size and length."""
    expert = model.extract_expert(domain).float().cpu()
    expert.set_attn_implementation("eager")  # plain ops: the pattern ONNX Runtime fuses and OpenVINO reads
    graph = PooledExpert(expert, model.pool).eval()
    sample = tokenizer(model.prepend_domain_token(["a short text", "a longer text of a few more words"], domain),
                       padding=True, return_tensors="pt")
    dynamic = {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(
            graph, (sample["input_ids"], sample["attention_mask"]), str(path), dynamo=False, opset_version=17,
            input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
            dynamic_axes={"input_ids": dynamic, "attention_mask": dynamic, "sentence_embedding": {0: "batch"}},
        )


STAMP_KEYS = ("moebert.fingerprint", "moebert.domain", "moebert.quantize")


def stamp(fingerprint: str, domain: str, quantize: str) -> dict:
    """The metadata every graph carries, checked when it is opened."""
    return dict(zip(STAMP_KEYS, (fingerprint, domain, quantize)))


def graph_file_name(index: int, domain: str, suffix: str) -> str:
    return f"{index:03d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', domain)}{suffix}"


def read_manifest(folder: Path) -> dict:
    if not (folder / MANIFEST).is_file():
        raise ExportError(f"{folder} is no export of a MoE-BERT (no {MANIFEST}); write one with "
                          "`python -m moebert export --model MODEL --output_dir DIR`.")
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{folder} was written by another version of the exporter (format "
                          f"{manifest.get('format')}, this one reads {EXPORT_FORMAT}): export the model again.")
    return manifest


class ExportedEncoder(Encoder):
    """Encodes texts with an export folder, each domain's graph opened on first use; a runtime supplies `open_graph`
    (the graph file -> its metadata and a callable from token arrays to embeddings)."""

    routes_by_domain = True

    def __init__(self, folder, max_seq_length: int, batch_size: int, config=None):
        """`config`: the MoE-BERT configuration to answer with (domains, calibration), by default the one copied at
        export time; a model's cached export is given the model's own, so a new calibration applies at once."""
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.config = config or MoEBertConfig.from_pretrained(self.folder)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder, config=self.config)
        self.fingerprint = self.manifest["fingerprint"]
        self.max_seq_length, self.batch_size = max_seq_length, batch_size
        self.graphs = {}

    @property
    def name(self) -> str:
        return f"{self.manifest.get('runtime', 'onnx')}-{self.manifest['quantize']}"

    def open_graph(self, path: Path) -> tuple[dict, Callable]:
        raise NotImplementedError

    def graph(self, domain: str) -> Callable:
        if domain not in self.graphs:
            self.graphs[domain] = self._checked_graph(domain)
        return self.graphs[domain]

    def _checked_graph(self, domain: str) -> Callable:
        export_again = f"export again: python -m moebert export --model {self.manifest.get('source') or 'MODEL'} " \
                       f"--output_dir {self.folder}"
        if domain not in self.manifest["graphs"]:
            raise ExportError(f"domain {domain!r} is not in the export {self.folder} (it has "
                              f"{sorted(self.manifest['graphs'])}): it was left out or added to the model later; "
                              f"{export_again}.")
        path = self.folder / self.manifest["graphs"][domain]
        if not path.is_file():
            raise ExportError(f"{path}, the graph of domain {domain!r}, is missing; {export_again}.")
        try:
            metadata, run = self.open_graph(path)
        except Exception as error:  # each runtime raises its own classes for unreadable graphs
            raise ExportError(f"{path} cannot be read ({str(error).splitlines()[0][:120]}); {export_again}.") from None
        expected = stamp(self.fingerprint, domain, self.manifest["quantize"])
        differing = [key.split(".")[1] for key, value in expected.items() if metadata.get(key) != value]
        if differing:
            raise ExportError(f"{path} is not the graph this export made for domain {domain!r} (its "
                              f"{', '.join(differing)} differ from {MANIFEST}: a graph of another model or domain); "
                              f"{export_again}.")
        return run

    def encode(self, texts: list[str], domain: str) -> np.ndarray:
        run = self.graph(domain)

        def run_batch(batch_texts):
            batch = self.tokenizer(batch_texts, padding=True, truncation=True, max_length=self.max_seq_length,
                                   return_tensors="np")
            return run(batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64))

        texts = self.config.prepend_domain_token(texts, domain)
        return encode_in_batches(texts, self.batch_size, self.config.hidden_size, f"encoding {domain}", run_batch)
