"""On a CUDA device: the same run as on the CPU, and bf16 training that learns.

Skipped where no CUDA device is present (every CI run); run them on a GPU machine with
`pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

import pytest
import torch

from dist.layouts import BASE, STEPS, assert_parity, run_layout

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_fp32_matches_cpu(tmp_path):
    """fp32 on the GPU (TF32 off, as plait leaves it) against fp32 on the CPU: the same curve up
    to the order of floating-point sums in the kernels, which differs between devices (~1e-6 per
    step), so the later-step bound is the parity bound and the first step a looser 1e-5."""
    cpu = run_layout(tmp_path / "cpu", 1, ["--train.device=cpu"])
    gpu = run_layout(tmp_path / "gpu", 1, ["--train.device=cuda"])
    assert_parity(cpu, gpu, first_rel=1e-5, later_rel=1e-4)


def test_cuda_bf16_trains(tmp_path):
    losses = run_layout(tmp_path / "bf16", 1, ["--train.device=cuda", "--train.dtype=bf16"])
    assert len(losses) == STEPS
    assert losses[-1] < losses[0] - 0.5
