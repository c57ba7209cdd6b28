"""Peak dense matmul rates of accelerators, for MFU. Shared by the progress display and the planner:
the numbers live in the planner's device table (`plait.planner.cluster`), with their sources.
"""

from __future__ import annotations


def peak_flops(device_name: str, dtype: str) -> float | None:
    """The dense peak in FLOP/s for a device name as the runtime reports it (e.g. "NVIDIA H100 80GB
    HBM3") and a dtype ("bf16", "fp32", "fp8", "tf32"), or None when unknown (e.g. a CPU).

    "fp32" is the plain FP32 rate: PyTorch runs fp32 matmuls without TF32 unless a run enables it.
    An MI250X is one GCD (PyTorch's device), half of the module's datasheet figures."""
    from plait.planner.cluster import DEVICES, device_for_name

    key = device_for_name(device_name)
    if key is None:
        return None
    return DEVICES[key].peak_flops.get(dtype)
