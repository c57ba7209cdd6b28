"""Peak dense matmul rates of accelerators, for MFU. Shared by the progress display and the planner.

Numbers are the vendors' dense (no sparsity) peaks per device, in FLOP/s.
"""

from __future__ import annotations

# name fragment (lower case, as in torch.cuda.get_device_name) -> (bf16 peak, fp32/tf32 peak)
GPU_PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "h200": (989e12, 494e12),
    "h100": (989e12, 494e12),
    "b200": (2250e12, 1100e12),
    "a100": (312e12, 156e12),
    "mi250x": (383e12, 95.7e12),
    "l40s": (362e12, 183e12),
}


def peak_flops(device_name: str, dtype: str) -> float | None:
    """The peak for a device name and "bf16"/"fp32", or None when unknown (e.g. a CPU)."""
    name = device_name.lower()
    for fragment, (bf16, fp32) in GPU_PEAK_FLOPS.items():
        if fragment in name:
            return bf16 if dtype == "bf16" else fp32
    return None
