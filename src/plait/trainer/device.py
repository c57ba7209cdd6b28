"""The device a worker trains on, its precision, and its peak memory."""

from __future__ import annotations

import resource
import sys
from contextlib import AbstractContextManager, nullcontext

import torch

from plait.errors import ConfigError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device = {name!r} is not a device; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {name!r} but this machine has no CUDA GPU; use auto or cpu")
    return device


def pick_dtype(name: str, device: torch.device) -> str:
    """"auto" is bf16 on a GPU and fp32 on a CPU: without AMX, a CPU's bf16 matmul is slower than
    its fp32 one (measured: 100 vs 220 GFLOP/s on a 2-core AVX-512 Xeon), see docs/training.md."""
    if name != "auto":
        return name
    return "bf16" if device.type == "cuda" else "fp32"


def autocast_for(device: torch.device, dtype: str) -> AbstractContextManager:
    """bf16 autocast for "bf16" (the weights stay fp32), nothing for "fp32"."""
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def memory_bytes(device: torch.device) -> int:
    """Peak memory: allocated GPU memory on CUDA, the process's peak resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB
