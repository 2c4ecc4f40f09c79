"""The encoder that reads an export folder: each domain's graph opened on first use and checked to be the graph this
export made for that domain; a runtime module supplies `open_graph`."""

from pathlib import Path
from typing import Callable

import numpy as np

from configuration_moebert import MoEBertConfig
from moebert.encoders.export.manifest import MANIFEST, ExportError, read_manifest, stamp
from moebert.encoders.interface import Encoder, encode_in_batches


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
        self.max_seq_length = max_seq_length or self.config.sequence_length()  # None: the length it was trained at
        self.batch_size = batch_size
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
