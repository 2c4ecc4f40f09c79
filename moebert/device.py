"""Which device a model runs on, whether bf16 pays there, the one autocast every forward pass runs under, and the
check that launched processes form one group."""

import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def cpu_forced() -> bool:
    """Whether this run was told to stay on the CPU (ACCELERATE_USE_CPU true, 1 or yes), GPUs or not."""
    return os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes", "y", "on")


def default_device() -> str:
    """The accelerator when there is one and the run is not told to stay on the CPU: every transformer model of a
    comparison runs on the same device."""
    if cpu_forced():
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def bf16_is_native(device: str) -> bool:
    """Whether this device computes bf16 matrix products natively: a CUDA device of compute capability 8.0 or newer
    (Ampere+; older GPUs emulate bf16, slowly), an x86 CPU with AVX512-BF16 or AMX. Elsewhere bf16 is slower than
    fp32."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_capability(torch.device(device)) >= (8, 0)
    cpuinfo = Path("/proc/cpuinfo")
    return device == "cpu" and cpuinfo.exists() and bool({"avx512_bf16", "amx_bf16"} & set(cpuinfo.read_text().split()))


def autocast(device: str, precision: str):
    """The autocast of a precision, as encoding (fp32, bf16, auto) and Accelerate's mixed precision (no, fp16, bf16)
    name them: bf16 for `bf16`, and for `auto` where bf16 is native (else fp32, and says so); fp16 for `fp16`; none
    for `fp32` and `no`."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if precision == "auto":
        dtype = torch.bfloat16 if bf16_is_native(device) else None
        if dtype is None:
            logger.info(f"encoding in fp32: bf16 is not native on {device}")
    return torch.autocast(device.split(":")[0], dtype=dtype or torch.bfloat16, enabled=dtype is not None)


class ProcessGroupError(RuntimeError):
    """Processes were launched that do not form one group."""


def check_process_group(num_processes: int):
    """Processes that `accelerate launch` started but that do not form one group would each work alone and overwrite
    each other's files: refused in one line that says how to launch on a machine without GPUs."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != num_processes:
        raise ProcessGroupError(
            f"{launched} processes were launched but Accelerate sees {num_processes}. On a machine without GPUs, "
            "launch with ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N ..."
        )
