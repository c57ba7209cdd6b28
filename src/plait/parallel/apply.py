"""The one place that transforms the model for training, in a fixed order, and the object the
training step runs (`parallelize` -> `Parallelized`: the transformed model, its optimizer, the
forward/backward of a step, gradient clipping, evaluation and whole weights for sampling, each
chosen here once from the layout, so that the loop has no branch per parallelism).

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
   (`build_layout_optimizer`, plait.optim.zero1) averages the gradients after backward.
   With context parallelism the cp axis joins the data-parallel axes: its ranks hold the same
   parameters and see different tokens, so their gradients are averaged with the data-parallel
   ones (DDP over dp x cp; FSDP2 shards over dp_shard x cp, as torchtitan does).
   Under expert parallelism the expert weights get their own FSDP units first, over the ranks
   holding the same experts, and the dense units then leave them alone. MoE layers also sum
   their router counts over the data-parallel ranks (global balance loss).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from plait.config import OptimSection
from plait.layout import Layout
from plait.optim import build_optimizer
from plait.optim.zero1 import Zero1Optimizer, build_zero1_optimizer
from plait.parallel.activation_checkpoint import apply_activation_checkpointing
from plait.parallel.context_parallel import apply_context_parallel, context_sharding
from plait.parallel.data_parallel import apply_data_parallel
from plait.parallel.expert_parallel import apply_expert_fully_shard, apply_expert_parallel, apply_global_load_balance, moe_layers
from plait.parallel.fully_shard import apply_fully_shard
from plait.parallel.mesh import Mesh
from plait.parallel.pipeline_parallel import Pipeline, pipeline_chunks, split_for_rank
from plait.parallel.step import AccumulatedStep, MicroBatchHooks
from plait.parallel.tensor_parallel import apply_tensor_parallel, clip_grad_norm_mixed


def apply_layout(model: nn.Module, mesh: Mesh, seq_len: int) -> nn.Module:
    """The model to train: `model` itself transformed in place, or a DDP wrapper around it."""
    lay = mesh.layout
    if lay.pp > 1:
        split_for_rank(model, mesh, seq_len)
    if lay.tp > 1:
        apply_tensor_parallel(model, mesh.submesh("tp"), lay.sequence_parallel)
    if lay.cp > 1:
        apply_context_parallel(model, mesh.submesh("cp"), lay.cp_method)
    if lay.ep > 1:
        apply_expert_parallel(model, mesh.ep_mesh()["ep"])
    if lay.activation_checkpointing:
        apply_activation_checkpointing(model)
    if lay.compile:
        for block in model.layers.values():
            # In place (Module.compile), so parameter names do not gain an "_orig_mod." part.
            block.compile()
    if lay.dp * lay.cp == 1:
        return model
    if lay.dp > 1 and moe_layers(model):
        apply_global_load_balance(model, mesh.dp_group())
    if lay.zero_stage >= 2:
        if lay.ep > 1:
            # Over the ranks that hold the same experts: ep_shard (and the replicas).
            expert_mesh = mesh.ep_mesh()[("dp_replicate", "ep_shard") if lay.dp_replicate > 1 else "ep_shard"]
            apply_expert_fully_shard(model, expert_mesh, lay.dp, lay.zero_stage, lay.mixed_precision)
        dp_axes = ("dp_replicate", "dp_shard") if lay.dp_replicate > 1 else ("dp_shard",)
        dp_mesh = mesh.submesh(*dp_axes) if lay.cp == 1 else mesh.flat_mesh("dp_shard", "cp")
        # Each pipeline chunk is a root the schedule calls, so each is sharded as a model of its own.
        for target in pipeline_chunks(model):
            apply_fully_shard(target, dp_mesh, lay.zero_stage, lay.mixed_precision, lay.cpu_offload)
        return model
    if _optimizer_averages_gradients(mesh):
        return model
    # DDP (tp = 1) over the data-parallel ranks, and the context-parallel ones when cp > 1.
    group = mesh.dp_group() if lay.cp == 1 else mesh.flat_mesh("dp_replicate", "dp_shard", "cp").get_group()
    return apply_data_parallel(model, group)


def _optimizer_averages_gradients(mesh: Mesh) -> bool:
    """ZeRO-1, or plain data parallelism with TP: the ZeRO-1 optimizer reduces the gradients."""
    lay = mesh.layout
    if mesh.device_mesh is None or lay.dp == 1:
        return False
    return lay.zero_stage == 1 or (lay.zero_stage == 0 and lay.tp > 1)


def build_layout_optimizer(model: nn.Module, cfg: OptimSection, mesh: Mesh) -> torch.optim.Optimizer:
    if _optimizer_averages_gradients(mesh):
        # zero_stage 0 has dp_shard = 1 (validated), so its shard group is one rank: no sharding.
        shard, replicate, tp = (mesh.submesh(axis).get_group() for axis in ("dp_shard", "dp_replicate", "tp"))
        return build_zero1_optimizer(model, cfg, shard, replicate, tp)
    # foreach kernels need every tensor of a group on one placement; tensor-parallel groups mix
    # sharded and replicated DTensors.
    # Expert parallelism likewise mixes meshes (experts on the ep mesh, dense weights on dp_shard).
    foreach = not (mesh.layout.tp > 1 or mesh.layout.ep > 1)
    return build_optimizer(model, cfg, foreach=foreach)


def build_grad_clipper(
    model: nn.Module, optimizer: torch.optim.Optimizer, layout: Layout, pipeline: Pipeline | None = None
) -> Callable[[float], torch.Tensor]:
    """`clip(max_norm)`: clip the step's gradients by their global 2-norm, return the norm (a
    plain tensor, the same on every rank).

    torch's clip_grad_norm_ cannot mix plain and DTensor gradients (tensor parallelism does, and
    expert parallelism: experts on the ep mesh); the ZeRO-1 optimizer holds the averaged
    gradients itself, in per-rank slices, so it clips them there.
    """
    if pipeline is not None:  # the norm of the whole model: summed over the stages
        return lambda max_norm: pipeline.clip_grad_norm(model.parameters(), max_norm)
    if isinstance(optimizer, Zero1Optimizer):
        return optimizer.clip_grad_norm_
    clip = clip_grad_norm_mixed if layout.tp > 1 or layout.ep > 1 else nn.utils.clip_grad_norm_

    def clip_whole(max_norm: float) -> torch.Tensor:
        norm = clip(model.parameters(), max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm  # sharded gradients: a DTensor norm

    return clip_whole


@dataclass
class Parallelized:
    """A model transformed for a layout, with everything the training step needs of it."""

    mesh: Mesh
    model: nn.Module  # what runs: the module transformed in place, or a DDP wrapper around it
    module: nn.Module  # the model without a DDP wrapper (checkpoint names, evaluation)
    optimizer: torch.optim.Optimizer
    runner: AccumulatedStep | Pipeline  # forward/backward of a step; evaluation
    clip_grad_norm: Callable[[float], torch.Tensor]

    @property
    def layout(self) -> Layout:
        return self.mesh.layout

    def forward_backward(self, batch_BT1: torch.Tensor, hooks: MicroBatchHooks) -> torch.Tensor:
        """One step's forward and backward over this data-parallel rank's share of the batch;
        returns the step loss (to be averaged over the ranks), gradients left for the optimizer."""
        return self.runner.forward_backward(batch_BT1, hooks)

    def describe(self) -> str | None:
        """A line about the layout's step for the start of the run (the pipeline's stages), or None."""
        return self.runner.describe()

    def evaluate(self, batches: Iterable[torch.Tensor], device: torch.device) -> float:
        """Mean validation loss over `batches` (the same number on every rank)."""
        return self.runner.evaluate(batches, device)

    def whole_model(self, device: torch.device) -> nn.Module | None:
        """A plain one-process model with the whole weights on rank 0 (None on the others), for
        sampling: gathered where the layout splits parameters or sequences (a collective), the
        module itself where every rank holds all of it."""
        return self.runner.gather_whole(device)


def parallelize(module: nn.Module, mesh: Mesh, optim: OptimSection, seq_len: int, accumulation_steps: int,
                device: torch.device, autocast: AbstractContextManager) -> Parallelized:
    """Transform `module` (materialised, initialised) for `mesh`'s layout and build its optimizer,
    step and clipping: what the training loop runs."""
    lay = mesh.layout
    model = apply_layout(module, mesh, seq_len)
    optimizer = build_layout_optimizer(model, optim, mesh)
    pipeline, runner = None, None
    if lay.pp > 1:  # `model` is this rank's stages; the schedule runs every micro-batch of a step
        pipeline = Pipeline(model, lay.pp_schedule, accumulation_steps, device, lay.tp > 1, autocast)
        runner = pipeline
    else:
        cp = context_sharding(mesh.submesh("cp"), lay.cp_method) if lay.cp > 1 else None
        split = lay.tp > 1 or lay.zero_stage >= 2 or lay.cp > 1  # parameters or sequences over ranks
        runner = AccumulatedStep(model, module, lay.micro_batch_size, accumulation_steps, lay.tp > 1, cp, autocast, split)
    clip = build_grad_clipper(model, optimizer, lay, pipeline)
    return Parallelized(mesh, model, module, optimizer, runner, clip)
