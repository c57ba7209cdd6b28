"""Host time that plait's parallel wrappers add per call, measured for `plait plan --calibrate`.

A collective's wire time is the link fit's business (calibrate.py). What is measured here is the
rest: the Python and dispatch work around it, which on a CPU runs on the same cores as the
matmuls and so adds to the step (on a GPU the host runs ahead of the device's queue and the time
model leaves it out). Both are measured on a process group of one rank, where the collectives
themselves cost next to nothing, by timing forward + backward of a small stack of linear layers
with and without the wrapper:

- `tp_linear_s`: per tensor-parallel linear per micro-batch (forward + backward): the DTensor
  dispatch, sharding propagation and the redistribution hooks of a ColwiseParallel /
  RowwiseParallel pair, as plait's tensor-parallel plan uses them;
- `fsdp_call_s`: per FSDP2 collective call (a ZeRO-3 unit issues three per micro-batch: the
  all-gathers of forward and backward and the gradient reduce-scatter): the hooks, the copy into
  and out of the flat buffers.

Imports torch inside `measure_overheads` only (calibrate.py's workers call it).
"""

from __future__ import annotations

import time
from typing import Any

WIDTH = 32  # small layers: the wrapper's fixed cost, not the matmul, is measured
LAYERS = 8


def _timed(step: Any, seconds: float) -> float:
    """Best mean seconds of `step()` over a few windows of about `seconds / 3` each."""
    for _ in range(3):
        step()
    best = float("inf")
    for _ in range(3):
        count, start = 0, time.perf_counter()
        while True:
            step()
            count += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds / 3:
                break
        best = min(best, elapsed / count)
    return best


def measure_overheads(seconds: float = 0.3) -> dict[str, float]:
    """{"tp_linear_s", "fsdp_call_s"} for this process, measured on a process group holding only
    this rank (every rank of the job must call this: the groups are created collectively)."""
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    own, _ = dist.new_subgroups(group_size=1)
    mesh = DeviceMesh.from_group(own, "cpu")
    x = torch.randn(4, WIDTH)

    def stack() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])

    def step_of(model: nn.Module):
        def step() -> None:
            model(x).sum().backward()
        return step

    plain = _timed(step_of(stack()), seconds)
    tp = stack()
    parallelize_module(tp, mesh, {str(i): (ColwiseParallel() if i % 2 == 0 else RowwiseParallel()) for i in range(LAYERS)})
    tp_time = _timed(step_of(tp), seconds)
    fsdp = stack()
    for layer in fsdp:
        fully_shard(layer, mesh=mesh)
    fully_shard(fsdp, mesh=mesh)
    fsdp_time = _timed(step_of(fsdp), seconds)
    return {"tp_linear_s": max(0.0, (tp_time - plain) / LAYERS),
            "fsdp_call_s": max(0.0, (fsdp_time - plain) / (3 * LAYERS))}
