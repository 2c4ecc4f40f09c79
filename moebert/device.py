"""Which device a model runs on and whether bf16 pays there."""

import os
import sys
from pathlib import Path

import torch


def default_device() -> str:
    """The accelerator when there is one: every transformer model of a comparison runs on the same device."""
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
    """bf16 autocast for `bf16`, and for `auto` where bf16 is native (else fp32, and says so); fp32 for `fp32`."""
    use_bf16 = precision == "bf16" or (precision == "auto" and bf16_is_native(device))
    if precision == "auto" and not use_bf16:
        print(f"encoding in fp32: bf16 is not native on {device}", file=sys.stderr)
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=use_bf16)


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
