"""How eval.py and search.py encode: the options they share, defined once with one set of defaults (the encoder they
make is moebert.encoders.loader's).

Defaults: torch in fp32 (the reference numbers; `--precision auto` takes bf16 where the device computes it natively;
`--backend openvino` and `--backend onnx` run int8 graphs exported once, the fastest on a CPU: docs/speed.md), the
backend's batch size, and the length the model was trained at (its config's `max_seq_length`).
"""

import argparse
from dataclasses import dataclass, replace

from moebert.device import default_device

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


def serving_options(options: EncodingOptions) -> tuple[EncodingOptions, str]:
    """The options search serves with when the backend is not given, and why: on a CPU the int8 ONNX export (it
    meets every quality target, and is the fastest backend where the CPU has VNNI; without, about as fast as fp32
    ONNX: docs/search.md; exported once, cached), on an accelerator torch
    with bf16 where it is native. `--precision` given alone keeps torch: it is torch's setting. eval.py keeps
    torch fp32, the reference numbers."""
    if options.backend is not None:
        return options, f"--backend {options.backend}, as given"
    if options.precision is not None:
        return replace(options, backend="torch"), f"torch, since --precision {options.precision} was given"
    if (options.device or "cpu") == "cpu":
        return replace(options, backend="onnx"), ("a CPU: int8 ONNX Runtime, which meets every quality target and "
                                                  "is the fastest backend where the CPU has VNNI (docs/speed.md; "
                                                  "--backend torch for fp32)")
    return replace(options, backend="torch", precision="auto"), f"{options.device}: torch, bf16 where it is native"


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
