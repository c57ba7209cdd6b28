"""Data parallelism by replication: PyTorch's DistributedDataParallel over the default group.

Each rank holds the whole model and a disjoint slice of the global batch; DDP all-reduces
(averages) the gradients in buckets, overlapped with the backward pass. With gradient
accumulation the all-reduce runs on the last micro-batch only (`no_sync` on the others).
DDP takes no DTensor parameters: with tensor parallelism, data parallelism is `zero1.py`'s
optimizer with a shard group of one rank (one bucketed all-reduce after backward)."""

from __future__ import annotations

import inspect
from contextlib import AbstractContextManager, nullcontext

from torch import nn
from torch.nn.parallel import DistributedDataParallel


def apply_data_parallel(model: nn.Module, process_group=None) -> nn.Module:
    # No buffer sync per forward: the only buffer (rotary frequencies) is computed identically
    # everywhere. Parameters start equal because every rank initialises from the same seed.
    # Newer PyTorch renamed the switch; use whichever this version has.
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return DistributedDataParallel(model, process_group=process_group, forward_sync_buffers=False)
    return DistributedDataParallel(model, process_group=process_group, broadcast_buffers=False)


def gradient_sync(model: nn.Module, last_micro_batch: bool) -> AbstractContextManager:
    """Skip DDP's all-reduce on every micro-batch but the last of a step."""
    if isinstance(model, DistributedDataParallel) and not last_micro_batch:
        return model.no_sync()
    return nullcontext()
