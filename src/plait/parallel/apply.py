"""The one place that transforms the model for training, in a fixed order.

Order and why:
0. the pipeline split first (`pp_degree > 1`): every other parallelism applies to the stage
   modules, so the layers of other stages are deleted before anything shards or wraps them;
1. tensor (and sequence) parallelism first: it replaces parameters by DTensor shards on the `tp`
   axis, and everything after must see those shards;
   context parallelism next: it only swaps each block's attention function for one that runs
   across the `cp` axis, so it must reach the bare blocks before checkpointing, compilation and
   data parallelism wrap them (recomputation then re-runs the ring or all-to-all too);
   expert parallelism next (plait.parallel.expert_parallel): it swaps each MoE block's experts
   for this rank's shard and the all-to-all exchange, so checkpointing, compilation and FSDP
   wrap the module that really runs (it does not combine with TP in this version);
2. activation checkpointing wraps each block, so compilation (3) sees the recomputation
   boundary and compiles the block's inside once;
3. torch.compile per block (not the whole model): blocks share code, so one compiled graph
   serves every layer, and a graph break stays local to a block;
4. data parallelism last, over the data-parallel axes: FSDP2 (ZeRO-2/3, HSDP) must wrap the
   final modules and parameters; DDP (plain data parallelism without TP) likewise, and its
   gradient hooks then fire after any recomputation. ZeRO-1, and plain data parallelism with
   TP (DDP takes no DTensor parameters), leave the model alone: their optimizer
   (`build_layout_optimizer`, zero1.py) averages the gradients after backward.
   With context parallelism the cp axis joins the data-parallel axes: its ranks hold the same
   parameters and see different tokens, so their gradients are averaged with the data-parallel
   ones (DDP over dp x cp; FSDP2 shards over dp_shard x cp, as torchtitan does).
   Under expert parallelism the expert weights get their own FSDP units first, over the ranks
   holding the same experts, and the dense units then leave them alone. MoE layers also sum
   their router counts over the data-parallel ranks (global balance loss).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from plait.config import OptimSection, ParallelSection, TrainSection
from plait.optim import build_optimizer
from plait.optim.zero1 import Zero1Optimizer, build_zero1_optimizer
from plait.parallel.activation_checkpoint import apply_activation_checkpointing
from plait.parallel.data_parallel import apply_data_parallel
from plait.parallel.expert_parallel import apply_expert_fully_shard, apply_expert_parallel, apply_global_load_balance, moe_layers
from plait.parallel.mesh import Layout
from plait.parallel.tensor_parallel import apply_tensor_parallel, clip_grad_norm_mixed

if TYPE_CHECKING:
    from plait.parallel.pipeline_parallel import Pipeline


def apply_layout(model: nn.Module, train: TrainSection, parallel: ParallelSection | None = None, layout: Layout | None = None) -> nn.Module:
    """The model to train: `model` itself transformed in place, or a DDP wrapper around it."""
    degrees = layout.degrees if layout is not None else None
    if degrees is not None and degrees.pp > 1:
        from plait.parallel.pipeline_parallel import split_for_rank

        split_for_rank(model, layout, parallel.pp_virtual_stages, train.seq_len)
    if degrees is not None and degrees.tp > 1:
        apply_tensor_parallel(model, layout.submesh("tp"), parallel.sequence_parallel)
    if degrees is not None and degrees.cp > 1:
        from plait.parallel.context_parallel import apply_context_parallel

        apply_context_parallel(model, layout.submesh("cp"), parallel.cp_method)
    if degrees is not None and degrees.ep > 1:
        apply_expert_parallel(model, layout.ep_mesh()["ep"])
    if train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if train.compile:
        for block in model.layers.values():
            # In place (Module.compile), so parameter names do not gain an "_orig_mod." part.
            block.compile()
    if degrees is None or degrees.dp * degrees.cp == 1:
        return model
    assert parallel.zero_stage in (0, 1, 2, 3), f"resolve zero_stage {parallel.zero_stage} first (config.with_resolved_zero_stage)"
    if degrees.dp > 1 and moe_layers(model):
        apply_global_load_balance(model, layout.dp_group())
    if parallel.zero_stage >= 2:
        from plait.parallel.fully_shard import apply_fully_shard
        from plait.parallel.pipeline_parallel import pipeline_chunks

        if degrees.ep > 1:
            # Over the ranks that hold the same experts: ep_shard (and the replicas).
            expert_mesh = layout.ep_mesh()[("dp_replicate", "ep_shard") if degrees.dp_replicate > 1 else "ep_shard"]
            apply_expert_fully_shard(model, expert_mesh, degrees.dp, parallel.zero_stage, parallel.mixed_precision)
        dp_axes = ("dp_replicate", "dp_shard") if degrees.dp_replicate > 1 else ("dp_shard",)
        mesh = layout.submesh(*dp_axes) if degrees.cp == 1 else layout.flat_mesh("dp_shard", "cp")
        # Each pipeline chunk is a root the schedule calls, so each is sharded as a model of its own.
        for target in pipeline_chunks(model):
            apply_fully_shard(target, mesh, parallel.zero_stage, parallel.mixed_precision, parallel.cpu_offload)
        return model
    if _optimizer_averages_gradients(parallel, layout):
        return model
    # DDP (tp = 1) over the data-parallel ranks, and the context-parallel ones when cp > 1.
    group = layout.dp_group() if degrees.cp == 1 else layout.flat_mesh("dp_replicate", "dp_shard", "cp").get_group()
    return apply_data_parallel(model, group)


def _optimizer_averages_gradients(parallel: ParallelSection | None, layout: Layout | None) -> bool:
    """ZeRO-1, or plain data parallelism with TP: Zero1Optimizer reduces the gradients."""
    if parallel is None or layout is None or layout.mesh is None or layout.degrees.dp == 1:
        return False
    return parallel.zero_stage == 1 or (parallel.zero_stage == 0 and layout.degrees.tp > 1)


def build_layout_optimizer(model: nn.Module, cfg: OptimSection, parallel: ParallelSection | None, layout: Layout | None) -> torch.optim.Optimizer:
    if _optimizer_averages_gradients(parallel, layout):
        # zero_stage 0 has dp_shard = 1 (validated), so its shard group is one rank: no sharding.
        shard, replicate, tp = (layout.submesh(axis).get_group() for axis in ("dp_shard", "dp_replicate", "tp"))
        return build_zero1_optimizer(model, cfg, shard, replicate, tp)
    # foreach kernels need every tensor of a group on one placement; tensor-parallel groups mix
    # sharded and replicated DTensors.
    # Expert parallelism likewise mixes meshes (experts on the ep mesh, dense weights on dp_shard).
    foreach = not (layout is not None and (layout.degrees.tp > 1 or layout.degrees.ep > 1))
    return build_optimizer(model, cfg, foreach=foreach)


def build_grad_clipper(
    model: nn.Module, optimizer: torch.optim.Optimizer, tp: bool, pipeline: "Pipeline | None" = None
) -> Callable[[float], torch.Tensor]:
    """`clip(max_norm)`: clip the step's gradients by their global 2-norm, return the norm.

    torch's clip_grad_norm_ cannot mix plain and DTensor gradients (tensor parallelism does);
    Zero1Optimizer holds the averaged gradients itself, in per-rank slices, so it clips them there.
    """
    if pipeline is not None:  # the norm of the whole model: summed over the stages
        return lambda max_norm: pipeline.clip_grad_norm(model.parameters(), max_norm)
    if isinstance(optimizer, Zero1Optimizer):
        return optimizer.clip_grad_norm_
    clip = clip_grad_norm_mixed if tp else nn.utils.clip_grad_norm_
    return lambda max_norm: clip(model.parameters(), max_norm)
