"""Pipeline parallelism over the `pp` mesh axis with `torch.distributed.pipelining`.

What is here:
- `split_for_rank`: the unmodified model becomes this rank's part of it, in place: the layers of
  other ranks' stages are deleted from the ModuleDict (the others keep their global index, so
  parameter names stay the full model's), and the embedding / final norm / output head are set
  to None where this rank holds neither the first nor the last stage (the model's forward then
  passes hidden states through);
- `pipeline_chunks`: the modules the schedule runs, one per stage of this rank. With one stage
  per rank it is the rank's model itself; with several (interleaved schedules) each chunk is a
  `Transformer` whose submodules are the rank model's own, so parameters, optimizer and
  checkpoints see one model per rank with the original names;
- `Pipeline`: the stages and the schedule, one training step, gradient clipping by the global
  norm over every stage, and evaluation and the end-of-run sample on whole weights gathered
  onto rank 0 (`gather_pipeline_model`: no rank holds the whole model).

The stage plan (which layers each stage holds, balanced by cost) is `plait.layout.pipeline`.

Numerics (why the loss equals the single-process one): the schedule splits the rank's batch into
m micro-batches; the loss function returns each micro-batch's mean cross-entropy divided by m
(and the schedule's own gradient scaling is off), so gradients and the summed loss are those of
the mean over the step's tokens, as `train.micro_batch_size` accumulation computes them.

Shape legend: B batch (sequences), T sequence, D hidden, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from plait.model import Transformer, build_model
from plait.layout.pipeline import PipelinePlan, build_pipeline_plan
from plait.parallel.gather import plain_model
from plait.parallel.mesh import Mesh
from plait.parallel.step import MicroBatchHooks, evaluate_batches
from plait.parallel.tensor_parallel import loss_parallel_context, tp_cross_entropy

# The attribute of a split model that holds its `RankStages` (a plain attribute, not a submodule,
# so parameter names do not change).
_ATTR = "pipeline_stages"


@dataclass
class RankStages:
    """This rank's share of the pipeline: its stages, their modules and its groups."""

    plan: PipelinePlan
    pp_rank: int
    stage_ids: list[int]
    pp_group: dist.ProcessGroup
    # First rank of its stage's data/context/tensor-parallel group: it contributes the stage's
    # tensors to checkpoints (the others hold the same whole tensors after gathering).
    representative: bool
    chunks: list[nn.Module] = field(default_factory=list)

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last(self) -> bool:
        return self.plan.num_stages - 1 in self.stage_ids


def pipeline_of(model: nn.Module) -> RankStages | None:
    """The pipeline stages of a split model; None for a model that is not split."""
    return getattr(model, _ATTR, None)


def split_for_rank(model: Transformer, mesh: Mesh, seq_len: int) -> PipelinePlan:
    """Delete, in place, what this rank's stages do not hold; return the whole pipeline's plan."""
    plan = build_pipeline_plan(model.args, seq_len, mesh.layout.pp, mesh.layout.pp_virtual_stages)
    pp_rank = mesh.coordinate("pp")
    stage_ids = plan.stages_of_rank(pp_rank)
    keep = {str(i) for s in stage_ids for i in plan.layers_of_stage[s]}
    for key in [k for k in model.layers if k not in keep]:
        del model.layers[key]
    if 0 not in stage_ids:
        model.embed = None
    if plan.num_stages - 1 not in stage_ids:
        model.norm = None
        model.output = None
    others = [axis for axis in ("dp_replicate", "dp_shard", "cp", "tp") if mesh.coordinate(axis) != 0]
    info = RankStages(plan, pp_rank, stage_ids, mesh.submesh("pp").get_group(), representative=not others)
    setattr(model, _ATTR, info)  # survives FSDP's in-place class swap (the instance dict is kept)
    return plan


def pipeline_chunks(model: nn.Module) -> list[nn.Module]:
    """The modules that run this rank's stages, in stage order ([model] when it is not split).

    Built on first call and kept: call it after the transformations that replace blocks
    (activation checkpointing wraps them), before the ones that must see the chunks (FSDP wraps
    each chunk, since each is a root the schedule calls)."""
    info = pipeline_of(model)
    if info is None:
        return [model]
    if info.chunks:
        return info.chunks
    if len(info.stage_ids) == 1:
        info.chunks = [model]
        return info.chunks
    for s in info.stage_ids:
        # A model on the meta device (free) whose modules are then replaced by the rank model's.
        chunk = build_model(model.args)
        chunk.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in info.plan.layers_of_stage[s]})
        chunk.embed = model.embed if s == 0 else None
        last = s == info.plan.num_stages - 1
        chunk.norm = model.norm if last else None
        chunk.output = model.output if last else None
        chunk.inv_freq = model.inv_freq
        info.chunks.append(chunk)
    return info.chunks


_SCHEDULES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved-1f1b": ScheduleInterleaved1F1B,
    "zero-bubble": ScheduleInterleavedZeroBubble,
}


class Pipeline:
    """The schedule over this rank's stages and what a training step needs from it."""

    def __init__(
        self, model: nn.Module, schedule: str, num_microbatches: int, device: torch.device,
        tp: bool, autocast: AbstractContextManager | None = None,
    ) -> None:
        info = pipeline_of(model)
        assert info is not None, "split the model with split_for_rank first"
        self.model, self.info, self.tp, self.num_microbatches = model, info, tp, num_microbatches
        self.autocast = autocast if autocast is not None else nullcontext()
        chunks = pipeline_chunks(model)
        self.stages = [
            PipelineStage(chunk, stage_index=s, num_stages=info.plan.num_stages, device=device, group=info.pp_group)
            for chunk, s in zip(chunks, info.stage_ids)
        ]
        self.schedule_name = schedule
        cls = _SCHEDULES[schedule]
        # scale_grads=False: the loss is already divided by the number of micro-batches.
        if cls in (ScheduleGPipe, Schedule1F1B):
            self.schedule = cls(self.stages[0], num_microbatches, loss_fn=self._loss, scale_grads=False)
        else:
            self.schedule = cls(self.stages, num_microbatches, loss_fn=self._loss, scale_grads=False)

    def _loss(self, logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
        # Equal micro-batches: the mean over the step's tokens is the sum of the micro-batch means / m.
        return tp_cross_entropy(logits_BTV, targets_BT) / self.num_microbatches

    def train_step(self, batch_BT1: torch.Tensor) -> torch.Tensor:
        """Forward and backward of one step's batch (this data-parallel rank's share) through the
        pipeline; gradients are left in the stage parameters.

        Returns the value to add to the loop's loss sum, which is then averaged over all ranks:
        pp_degree x the step loss on the rank with the last stage, 0 on the others, so the mean
        over the world is the mean over the data-parallel replicas of the step loss."""
        args = (batch_BT1[:, :-1],) if self.info.has_first else ()
        target = batch_BT1[:, 1:] if self.info.has_last else None
        losses: list[torch.Tensor] | None = [] if self.info.has_last else None
        # The loss-parallel rule of the vocabulary-sharded loss must be active in backward too,
        # which runs inside step().
        with self.autocast, loss_parallel_context(self.tp):
            self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
        if losses:
            return torch.stack([x.detach() for x in losses]).sum() * self.info.plan.pp_degree
        return torch.zeros((), device=batch_BT1.device)

    def describe(self) -> str:
        """The start-of-run line: the schedule, its micro-batches and the stages' layers."""
        return f"pipeline: {self.schedule_name}, {self.num_microbatches} micro-batches per step; {self.info.plan.describe()}"

    def forward_backward(self, batch_BT1: torch.Tensor, hooks: MicroBatchHooks) -> torch.Tensor:
        """The step through the schedule, as `AccumulatedStep.forward_backward` (the hooks are
        for mixture-of-experts layers, which do not run under a pipeline)."""
        step_loss = torch.zeros((), device=batch_BT1.device)
        step_loss += self.train_step(batch_BT1)
        return step_loss

    def evaluate(self, batches: Iterable[torch.Tensor], device: torch.device) -> float:
        """Validation loss: the stages hold parts of the model, so rank 0 evaluates a whole copy
        gathered from them (the checkpoint's cost in memory, as the end-of-run sample) and
        broadcasts the number, so that every rank returns the same value."""
        plain = self.gather_whole(device)
        loss = torch.zeros((), dtype=torch.float64, device=device)
        if plain is not None:
            loss.fill_(evaluate_batches(plain, batches, device, self.autocast))
        dist.broadcast(loss, src=0)
        return loss.item()

    def gather_whole(self, device: torch.device) -> nn.Module | None:
        """A plain model with the whole weights on rank 0 (None on the others); a collective."""
        tensors = gather_pipeline_model(self.model)
        return plain_model(self.model.args, tensors, device) if dist.get_rank() == 0 else None

    @torch.no_grad()
    def clip_grad_norm(self, parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip by the global gradient norm of the whole model: each rank's squared norm (each
        gradient made whole over its own mesh first, for FSDP or tensor-parallel DTensors),
        summed over the pipeline ranks. Same clip rule as torch's clip_grad_norm_."""
        grads = [p.grad for p in parameters if p.grad is not None]
        squares = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else None)
        for g in grads:
            n = torch.linalg.vector_norm(g, 2.0, dtype=torch.float32)
            n = n.full_tensor() if isinstance(n, DTensor) else n
            squares = squares + n * n
        dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=self.info.pp_group)
        total = squares.sqrt()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            # Scaling the local piece scales the whole, whatever its placement.
            (g._local_tensor if isinstance(g, DTensor) else g).mul_(coef.to(g.dtype))
        return total



# Whole tensors on every rank of a stage's group (cpu_offload would keep them on global rank 0
# only, which is not a member of the later stages' groups).
_WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=False)


def gather_pipeline_model(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole on rank 0 (empty elsewhere), in the unsplit model's order: each
    rank assembles its stages' tensors over its own data/tensor-parallel group, the first rank of
    each group (the stage's representative) sends them to rank 0, which merges the stages."""
    info = pipeline_of(model)
    assert info is not None
    state = get_model_state_dict(model, options=_WHOLE)
    local = {name: t.detach().cpu().contiguous().clone() for name, t in state.items()}
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local if info.representative else None, gathered, dst=0)
    if gathered is None:
        return {}
    order = {name: i for i, name in enumerate(dict(build_model(model.args).named_parameters()))}  # meta: free
    merged = {name: t for part in gathered if part is not None for name, t in part.items()}
    return dict(sorted(merged.items(), key=lambda item: order.get(item[0], len(order))))
