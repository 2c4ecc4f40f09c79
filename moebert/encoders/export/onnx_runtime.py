"""The ONNX Runtime backend: each domain's graph fused for BERT and, with int8 (the default), its weights stored as
int8, for fast CPU encoding anywhere ONNX Runtime runs.

onnxruntime's transformer optimizer fuses the plain graph (one Attention op per layer), and its dynamic quantizer
stores the weights as int8, per channel (activations are quantized as the graph runs).
"""

import functools
import logging
from pathlib import Path

import torch

from moebert.encoders.export.encoder import ExportedEncoder
from moebert.encoders.export.graph import write_plain_graph
from moebert.encoders.export.manifest import Runtime

logger = logging.getLogger(__name__)


def write_graph(model, tokenizer, domain: str, path: Path, quantize: str, metadata: dict, calibration=None):
    """Export, fuse and (for int8) quantize one domain's graph, and stamp it with `metadata` (int8 weights need no
    `calibration`: activations are quantized as the graph runs)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    exported, fused = path.with_suffix(".exported.onnx"), path.with_suffix(".fused.onnx")
    write_plain_graph(model, tokenizer, domain, exported)
    optimized = optimize_model(str(exported), model_type="bert", num_heads=model.config.num_attention_heads,
                               hidden_size=model.config.hidden_size)
    if not optimized.get_fused_operator_statistics().get("Attention"):
        logger.warning(f"onnxruntime {onnxruntime_version()} fused no attention in {domain}'s graph: it runs unfused "
                       f"(correct, slower); {unfused_attention_reason(model.config.base_model_type)}")
    optimized.save_model_to_file(str(fused))
    if quantize == "int8":
        quantize_dynamic(str(fused), str(fused), weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})  # fused ops lack shape info
    proto = onnx.load(str(fused))
    onnx.helper.set_model_props(proto, metadata)
    onnx.save(proto, str(path))
    exported.unlink()
    fused.unlink()


def unfused_attention_reason(base_model_type: str) -> str:
    """Why an attention may stay unfused: MPNet's relative position bias is no pattern onnxruntime fuses; BERT's and
    RoBERTa's is, from onnxruntime 1.32 (1.30 does not fuse it)."""
    if base_model_type == "mpnet":
        return "onnxruntime fuses no attention with MPNet's relative position bias"
    return "onnxruntime 1.32 (requirements.txt) fuses it"


def onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def versions() -> dict:
    import onnx

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime_version()}


class OnnxEncoder(ExportedEncoder):
    """Encodes texts with an ONNX Runtime export."""

    def open_graph(self, path: Path):
        import numpy as np
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = torch.get_num_threads()  # one process per core under accelerate launch
        options.add_session_config_entry("session.use_env_allocators", "1")
        register_shared_arena()
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def run(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
            return session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})[0]

        return session.get_modelmeta().custom_metadata_map, run


@functools.cache
def register_shared_arena():
    """One memory arena for every graph's activations: each session's own arena would grow to its largest batch, nine
    domains to 3.5 GB instead of 1.3 GB (measured on 2026-11-29, 256-token batches of 32)."""
    import onnxruntime

    cpu = onnxruntime.OrtMemoryInfo("Cpu", onnxruntime.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                    onnxruntime.OrtMemType.DEFAULT)
    onnxruntime.create_and_register_allocator(cpu, onnxruntime.OrtArenaCfg(0, -1, -1, -1))


RUNTIME = Runtime("onnx", ".onnx", write_graph, OnnxEncoder, versions)
