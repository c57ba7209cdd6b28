"""The one place that transforms the model for training, in a fixed order.

Order and why:
1. tensor (and sequence) parallelism first: it replaces parameters by DTensor shards on the `tp`
   axis, and everything after must see those shards;
   context parallelism next: it only swaps each block's attention function for one that runs
   across the `cp` axis, so it must reach the bare blocks before checkpointing, compilation and
   data parallelism wrap them (recomputation then re-runs the ring or all-to-all too);
2. activation checkpointing wraps each block, so compilation (3) sees the recomputation
   boundary and compiles the block's inside once;
3. torch.compile per block (not the whole model): blocks share code, so one compiled graph
   serves every layer, and a graph break stays local to a block;
4. data parallelism last, over the data-parallel axes: FSDP2 (ZeRO-2/3, HSDP) must wrap the
   final modules and parameters; DDP (plain or with ZeRO-1's sharded optimizer) likewise, and
   its gradient hooks then fire after any recomputation. With context parallelism the cp axis
   joins them: its ranks hold the same parameters and see different tokens, so their gradients
   are averaged with the data-parallel ones (DDP over dp x cp; FSDP2 shards over dp_shard x cp,
   as torchtitan does).
"""

from __future__ import annotations

import torch
from torch import nn

from plait.config import OptimSection, ParallelSection, TrainSection
from plait.optim import build_optimizer
from plait.parallel.activation_checkpoint import apply_activation_checkpointing
from plait.parallel.data_parallel import apply_data_parallel
from plait.parallel.mesh import Layout


def apply_layout(model: nn.Module, train: TrainSection, parallel: ParallelSection | None = None, layout: Layout | None = None) -> nn.Module:
    """The model to train: `model` itself transformed in place, or a DDP wrapper around it."""
    degrees = layout.degrees if layout is not None else None
    if degrees is not None and degrees.tp > 1:
        from plait.parallel.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, layout.submesh("tp"), parallel.sequence_parallel)
    if degrees is not None and degrees.cp > 1:
        from plait.parallel.context_parallel import apply_context_parallel

        apply_context_parallel(model, layout.submesh("cp"), parallel.cp_method)
    if train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if train.compile:
        for block in model.layers.values():
            # In place (Module.compile), so parameter names do not gain an "_orig_mod." part.
            block.compile()
    if degrees is None or degrees.dp * degrees.cp == 1:
        return model
    if parallel.zero_stage >= 2:
        from plait.parallel.fully_shard import apply_fully_shard

        dp_axes = ("dp_replicate", "dp_shard") if degrees.dp_replicate > 1 else ("dp_shard",)
        mesh = layout.submesh(*dp_axes) if degrees.cp == 1 else layout.flat_mesh("dp_shard", "cp")
        apply_fully_shard(model, mesh, parallel.zero_stage, parallel.mixed_precision, parallel.cpu_offload)
        return model
    group = layout.dp_group() if degrees.cp == 1 else layout.flat_mesh("dp_replicate", "dp_shard", "cp").get_group()
    return apply_data_parallel(model, group)


def build_layout_optimizer(model: nn.Module, cfg: OptimSection, parallel: ParallelSection | None, layout: Layout | None) -> torch.optim.Optimizer:
    if parallel is not None and parallel.zero_stage == 1 and layout is not None and layout.mesh is not None:
        from plait.parallel.zero1 import build_zero1_optimizer

        return build_zero1_optimizer(model, cfg, layout.submesh("dp_shard"))
    # foreach kernels need every tensor of a group on one placement; tensor-parallel groups mix
    # sharded and replicated DTensors.
    foreach = not (layout is not None and layout.degrees.tp > 1)
    return build_optimizer(model, cfg, foreach=foreach)
