"""ONNX Runtime backend: each domain's expert as an ONNX graph, optionally with int8 weights, for fast CPU encoding.

    python -m moebert export --model outputs/moebert --output_dir outputs/moebert-onnx [--quantize int8|none]
                             [--domains Chou_2004,Oud_2018]

A MoE-BERT sends a whole text through one domain's expert, so for one domain it is a plain BERT
(`MoEBertModel.extract_expert`). Each graph is that BERT with the model's pooling on top: the token ids of texts that
start with the domain token and their attention mask in, the pooled embedding out (the MoE-BERT's `pooler_output` for
that domain). torch.onnx exports it, onnxruntime's transformer optimizer fuses it for BERT (one Attention op per
layer), and with `--quantize int8` (the default) onnxruntime's dynamic quantizer stores the weights as int8, per
channel (activations are quantized as the graph runs). The folder holds the graphs, the tokenizer, the MoE-BERT's
config (domains, calibration) and `onnx_manifest.json`, which names the fingerprint of the weights it was exported
from; every graph carries the same fingerprint and its domain in its own metadata, so a graph from another model or
another domain is refused.

`eval.py` and `search.py` take `--backend onnx`: given an export folder they use it; given a MoE-BERT they export it
on first use into a cache keyed by what the export copies (`export_key`: the weights, the config without its
calibration, the tokenizer; $MOEBERT_CACHE/onnx, default ~/.cache/moebert/onnx) and reuse it afterwards.
"""

import functools
import gc
import hashlib
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from configuration_moebert import MoEBertConfig
from moebert.atomic import writing_folder
from moebert.encoders import Encoder, encode_in_batches
from moebert.loading import is_moebert, load_moebert, model_fingerprint
from moebert.names import public_name

MANIFEST = "onnx_manifest.json"
EXPORT_FORMAT = 1  # part of the cache key: a change to what a graph computes must not reuse older exports
QUANTIZE_CHOICES = ("int8", "none")


class ExportError(ValueError):
    """An ONNX export that cannot serve what was asked; the message names the problem and the fix."""


# ------------------------------------------------------------------------------------------------ export


class PooledExpert(torch.nn.Module):
    """One domain's expert (a plain BertModel) with the MoE-BERT's pooling on top: the module that is exported."""

    def __init__(self, expert, pool):
        super().__init__()
        self.expert, self.pool = expert, pool

    def forward(self, input_ids, attention_mask):
        hidden = self.expert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.pool(hidden, attention_mask)


def export(model, tokenizer, fingerprint: str, output_dir, quantize: str = "int8", domains=None, source=None) -> Path:
    """Write the ONNX export of `model` (a MoE-BERT) for `domains` (default: all) to `output_dir`; the folder
    appears complete or not at all. `fingerprint` names the weights (see moebert.loading.model_fingerprint)."""
    if quantize not in QUANTIZE_CHOICES:
        raise ExportError(f"--quantize {quantize!r}: choose one of {list(QUANTIZE_CHOICES)}.")
    domains = list(domains or model.config.domains)
    indices = {domain: model.config.domain_index(domain) for domain in domains}  # unknown: ValueError naming the known
    output_dir = Path(output_dir)
    with writing_folder(output_dir) as work:
        graphs = {}
        for domain in tqdm(domains, desc=f"exporting to ONNX ({quantize})", unit="domain"):
            graphs[domain] = graph_file_name(indices[domain], domain)
            export_domain(model, tokenizer, domain, work / graphs[domain], quantize, fingerprint)
            gc.collect()  # the exporter leaves reference cycles holding each graph: 0.5 GB a domain otherwise
        tokenizer.save_pretrained(work)
        model.config.save_pretrained(work)
        manifest = {
            "format": EXPORT_FORMAT, "source": source, "fingerprint": fingerprint, "quantize": quantize,
            "graphs": graphs, "exported_with": exporter_versions(),
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return output_dir


def export_domain(model, tokenizer, domain: str, path: Path, quantize: str, fingerprint: str):
    """Export, fuse and (for int8) quantize one domain's graph, and stamp it with the fingerprint and domain."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    expert = model.extract_expert(domain).float().cpu()
    expert.set_attn_implementation("eager")  # the pattern onnxruntime's optimizer fuses into one Attention op
    graph = PooledExpert(expert, model.pool).eval()
    sample = tokenizer(model.prepend_domain_token(["a short text", "a longer text of a few more words"], domain),
                       padding=True, return_tensors="pt")
    exported, fused = path.with_suffix(".exported.onnx"), path.with_suffix(".fused.onnx")
    dynamic = {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(
            graph, (sample["input_ids"], sample["attention_mask"]), str(exported), dynamo=False, opset_version=17,
            input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
            dynamic_axes={"input_ids": dynamic, "attention_mask": dynamic, "sentence_embedding": {0: "batch"}},
        )
    optimized = optimize_model(str(exported), model_type="bert", num_heads=model.config.num_attention_heads,
                               hidden_size=model.config.hidden_size)
    optimized.save_model_to_file(str(fused))
    if quantize == "int8":
        quantize_dynamic(str(fused), str(fused), weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})  # fused ops lack shape info
    proto = onnx.load(str(fused))
    onnx.helper.set_model_props(proto, {"moebert.fingerprint": fingerprint, "moebert.domain": domain,
                                        "moebert.quantize": quantize})
    onnx.save(proto, str(path))
    exported.unlink()
    fused.unlink()


def graph_file_name(index: int, domain: str) -> str:
    return f"{index:03d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', domain)}.onnx"


def exporter_versions() -> dict:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


# ------------------------------------------------------------------------------------------------ cache


def cache_root() -> Path:
    return Path(os.environ.get("MOEBERT_CACHE", Path.home() / ".cache" / "moebert")) / "onnx"


def cached_export_dir(key: str, quantize: str) -> Path:
    """Where the export of a model lives in the cache: keyed by everything the export copies (`export_key`), the
    quantization and the export format, so a changed model or exporter is exported afresh, never served stale
    graphs."""
    digest = hashlib.sha256(f"{key}|{quantize}|{EXPORT_FORMAT}".encode()).hexdigest()[:24]
    return cache_root() / f"{digest}-{quantize}"


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


def is_export(folder) -> bool:
    return (Path(folder) / MANIFEST).is_file()


# ------------------------------------------------------------------------------------------------ encoding


class OnnxEncoder(Encoder):
    """Encodes texts with an ONNX export (see `export`), each domain's graph loaded on first use; `fingerprint`
    names the weights it was exported from."""

    routes_by_domain = True

    def __init__(self, folder, max_seq_length: int, batch_size: int, config=None):
        """`config`: the MoE-BERT configuration to answer with (domains, calibration), by default the one copied at
        export time; a model's cached export is given the model's own, so a new calibration applies at once."""
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        if not is_export(self.folder):
            raise ExportError(f"{self.folder} is no ONNX export of a MoE-BERT (no {MANIFEST}); write one with "
                              "`python -m moebert export --model MODEL --output_dir DIR`.")
        self.manifest = json.loads((self.folder / MANIFEST).read_text())
        if self.manifest.get("format") != EXPORT_FORMAT:
            raise ExportError(f"{self.folder} was written by another version of the exporter (format "
                              f"{self.manifest.get('format')}, this one reads {EXPORT_FORMAT}): export the model again.")
        self.config = config or MoEBertConfig.from_pretrained(self.folder)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder, config=self.config)
        self.fingerprint = self.manifest["fingerprint"]
        self.max_seq_length, self.batch_size = max_seq_length, batch_size
        self.sessions = {}

    @property
    def name(self) -> str:
        return f"onnx-{self.manifest['quantize']}"

    def session(self, domain: str):
        if domain not in self.sessions:
            self.sessions[domain] = self._open(domain)
        return self.sessions[domain]

    def _open(self, domain: str):
        import onnxruntime

        export_again = f"export again: python -m moebert export --model {self.manifest.get('source') or 'MODEL'} " \
                       f"--output_dir {self.folder}"
        if domain not in self.manifest["graphs"]:
            raise ExportError(f"domain {domain!r} is not in the ONNX export {self.folder} (it has "
                              f"{sorted(self.manifest['graphs'])}): it was left out or added to the model later; "
                              f"{export_again}.")
        path = self.folder / self.manifest["graphs"][domain]
        if not path.is_file():
            raise ExportError(f"{path}, the graph of domain {domain!r}, is missing; {export_again}.")
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = torch.get_num_threads()  # one process per core under accelerate launch
        options.add_session_config_entry("session.use_env_allocators", "1")
        register_shared_arena()
        try:
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own classes for unreadable graphs
            raise ExportError(f"{path} cannot be read ({str(error).splitlines()[0][:120]}); {export_again}.") from None
        stamp = session.get_modelmeta().custom_metadata_map
        expected = {"moebert.fingerprint": self.fingerprint, "moebert.domain": domain,
                    "moebert.quantize": self.manifest["quantize"]}
        differing = [key.split(".")[1] for key, value in expected.items() if stamp.get(key) != value]
        if differing:
            raise ExportError(f"{path} is not the graph this export made for domain {domain!r} (its "
                              f"{', '.join(differing)} differ from {MANIFEST}: a graph of another model or domain); "
                              f"{export_again}.")
        return session

    def encode(self, texts: list[str], domain: str) -> np.ndarray:
        session = self.session(domain)

        def run(batch_texts):
            batch = self.tokenizer(batch_texts, padding=True, truncation=True, max_length=self.max_seq_length,
                                   return_tensors="np")
            return session.run(None, {name: batch[name].astype(np.int64) for name in ("input_ids", "attention_mask")})[0]

        texts = self.config.prepend_domain_token(texts, domain)
        return encode_in_batches(texts, self.batch_size, self.config.hidden_size, f"encoding {domain}", run)


@functools.cache
def register_shared_arena():
    """One memory arena for every graph's activations: each session's own arena would grow to its largest batch, nine
    domains to 3.5 GB instead of 1.3 GB (measured on 2026-11-29, 256-token batches of 32)."""
    import onnxruntime

    cpu = onnxruntime.OrtMemoryInfo("Cpu", onnxruntime.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                    onnxruntime.OrtMemType.DEFAULT)
    onnxruntime.create_and_register_allocator(cpu, onnxruntime.OrtArenaCfg(0, -1, -1, -1))


def load_onnx_encoder(spec: str, max_seq_length: int, batch_size: int, quantize: str = "int8") -> OnnxEncoder:
    """An export folder as it is; a MoE-BERT (folder or Hub id) through its cached export, made on first use."""
    if is_export(spec):
        return OnnxEncoder(spec, max_seq_length, batch_size)
    check_moebert(spec)
    return cached_onnx_encoder(model_fingerprint(spec), lambda: load_moebert(spec), max_seq_length, batch_size,
                               quantize, source=public_name(spec), key=export_key(spec),
                               config=MoEBertConfig.from_pretrained(spec))


def check_moebert(spec: str):
    if not is_moebert(spec):
        raise ExportError(f"{spec} is no MoE-BERT and no ONNX export of one: the onnx backend serves MoE-BERT models.")


def cached_onnx_encoder(fingerprint: str, load_model, max_seq_length: int, batch_size: int, quantize: str = "int8",
                        source: str | None = None, key: str | None = None, config=None) -> OnnxEncoder:
    """The encoder of the cached export of a model whose weights have this fingerprint (and whose export is named by
    `key`, by default the fingerprint); `load_model() -> (model, tokenizer)` is called to export them only when the
    cache has none. `config`: see OnnxEncoder."""
    folder = cached_export_dir(key or fingerprint, quantize)
    if not is_export(folder):
        print(f"exporting {source or 'the model'} to ONNX ({quantize}) once, into {folder}", file=sys.stderr)
        model, tokenizer = load_model()
        export(model, tokenizer, fingerprint, folder, quantize, source=source)
    return OnnxEncoder(folder, max_seq_length, batch_size, config)
