"""How eval.py and search.py encode: the options they share, defined once with one set of defaults, and the one
function that turns a model name into an encoder.

Defaults: torch in fp32 (the reference numbers; `--precision auto` takes bf16 where the device computes it natively;
`--backend openvino` and `--backend onnx` run int8 graphs exported once, the fastest on a CPU: docs/speed.md), the
backend's batch size, and the length the model was trained at (its config's `max_seq_length`).
"""

import argparse
from dataclasses import dataclass

from transformers import PretrainedConfig

from configuration_moebert import MoEBertConfig
from moebert.device import default_device
from moebert.encoders import Encoder, SentenceTransformerEncoder, TfidfEncoder, TransformerEncoder
from moebert.loading import is_moebert, load_transformer, max_seq_length_of
from moebert.exports import cached_export_encoder, is_export, load_export_encoder

BACKENDS = ("torch", "onnx", "openvino")
EXPORTED = ("onnx", "openvino")  # the backends that run a model's export
# texts per forward pass; the exported runtimes gain from less padding (docs/speed.md)
BATCH_SIZES = {"torch": 32, "onnx": 8, "openvino": 8}
PRECISIONS = ("fp32", "bf16", "auto")


@dataclass
class EncodingOptions:
    """None means the default: torch, fp32, the backend's batch size, the model's length, the accelerator if there
    is one (a search query: the backend, precision and length its index was built with)."""

    backend: str | None = None
    precision: str | None = None
    batch_size: int | None = None
    max_seq_length: int | None = None
    device: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "EncodingOptions":
        return cls(args.backend, args.precision, args.batch_size, args.max_seq_length, args.device or default_device())

    @property
    def runtime(self) -> str:
        return self.backend or "torch"

    @property
    def dtype(self) -> str:
        return self.precision or "fp32"

    def batch_size_for(self, backend: str) -> int:
        return self.batch_size or BATCH_SIZES[backend]


def add_encoding_arguments(parser: argparse.ArgumentParser, default: str = ""):
    """The shared flags; `default` says what None means where it is not torch/fp32/the model's (a search query)."""
    parser.add_argument("--backend", default=None, choices=BACKENDS, help="openvino, onnx: MoE-BERT models run int8 on "
                        "OpenVINO or ONNX Runtime, exported once on first use (an export folder runs on its own "
                        "runtime); default: "
                        + (default or "torch"))
    parser.add_argument("--precision", default=None, choices=PRECISIONS, help="torch: bf16 autocast for bf16, and for "
                        "auto where the device computes bf16 natively; default: " + (default or "fp32, the reference "
                        "numbers"))
    parser.add_argument("--batch_size", type=int, default=None, help="texts per forward pass (default: "
                        + ", ".join(f"{size} on {backend}" for backend, size in BATCH_SIZES.items()) + ")")
    parser.add_argument("--max_seq_length", type=int, default=None,
                        help="tokens per text (default: the length the model was trained at, from its config)")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: the accelerator if there is one)")


def load_encoder(spec: str, options: EncodingOptions, trust_remote_code: bool = False) -> Encoder:
    """`tfidf`; an export of a MoE-BERT, or with an exported backend a MoE-BERT itself; a MoE-BERT; a
    sentence-transformers model (has modules.json); else any encoder, mean-pooled."""
    from transformers.utils import cached_file

    if spec == "tfidf":
        return TfidfEncoder()
    if is_export(spec) or (options.runtime in EXPORTED and is_moebert(spec)):
        runtime = options.runtime if options.runtime in EXPORTED else "onnx"
        length = options.max_seq_length or max_seq_length_of(spec, MoEBertConfig.from_pretrained(spec))
        return load_export_encoder(spec, length, options.batch_size_for(runtime), runtime)
    if not is_moebert(spec) and cached_file(spec, "modules.json", _raise_exceptions_for_missing_entries=False):
        length = options.max_seq_length or max_seq_length_of(spec, PretrainedConfig.from_pretrained(spec))
        return SentenceTransformerEncoder(spec, length, options.batch_size_for("torch"), options.device,
                                          trust_remote_code)
    model, tokenizer = load_transformer(spec, trust_remote_code)
    length = options.max_seq_length or max_seq_length_of(spec, model.config)
    return TransformerEncoder(model.to(options.device).eval(), tokenizer, length, options.batch_size_for("torch"))


def encoder_of_model(model, tokenizer, fingerprint: str, options: EncodingOptions, source: str) -> Encoder:
    """The encoder of a MoE-BERT built in memory (search's embedded model), on the options' backend; an ONNX export
    of it is cached by `fingerprint`."""
    length = options.max_seq_length or model.config.max_seq_length
    if options.runtime in EXPORTED:
        return cached_export_encoder(fingerprint, lambda: (model, tokenizer), length,
                                     options.batch_size_for(options.runtime), options.runtime, source=source)
    return TransformerEncoder(model.to(options.device).eval(), tokenizer, length, options.batch_size_for("torch"))
