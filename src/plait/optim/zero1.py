"""ZeRO-1: each data-parallel rank keeps the optimizer state of 1/N of the parameters.

After the step's backward, `Zero1Optimizer` flattens this rank's gradients (for a tensor-parallel
DTensor, its local shard) into one bucket and reduce-scatters it over the `dp_shard` axis, so each
rank holds the average of its 1/N slice; with replicas (`dp_replicate > 1`) it all-reduces that
slice over `dp_replicate` as well. It then runs the inner optimizer (any element-wise optimizer
of plait.optim.OPTIMIZERS: AdamW by default) on the slice only, so its state (AdamW's fp32
moments) exists for 1/N of the parameters: the memory ZeRO-1 saves. Finally it all-gathers the
updated slices into every rank's parameters. That is 2 (n-1)/n of the parameter bytes per rank
and step, a reduce-scatter plus an all-gather: the volume of one gradient all-reduce (PAPERS.md,
ZeRO).

Element-wise: the optimizer's update of each element depends only on that element's gradient
and state (AdamW, SGD with momentum, Adagrad; not Muon or Shampoo, which orthogonalise or
precondition whole matrices). A slice cuts through parameters and joins the ends of others, so
only such an optimizer steps it as it would step the whole parameters. Its state is then, per
view it steps, tensors of the view's shape (moments, momentum buffers), which are sharded like
the slice, and scalars (AdamW's `step`), one per group; the wrapper knows no key by name.
Optimizers declare it in their spec (`OptimizerSpec.elementwise`).

Why by hand: FSDP2 has no stage that shards the optimizer state alone, and PyTorch's
ZeroRedundancyOptimizer works next to DDP, which takes no DTensor parameters and costs twice
these bytes (a full gradient all-reduce, then every partition broadcast). Working on local
tensors gives one code path for plain and tensor-parallel parameters: an element-wise optimizer
steps a slice of local shards like any other tensor.

With a shard axis of one rank the same optimizer is plain data parallelism for tensor-parallel
models (`zero_stage = 0`, `tp_degree > 1`, where DDP refuses DTensors): one bucketed all-reduce
after the last micro-batch, then the inner optimizer on the whole bucket.

Nothing is sent while micro-batches accumulate: gradients add up locally in `.grad`, and the
bucket is reduced once, by `clip_grad_norm_` or by `step`, whichever comes first in the step.
After that the parameters' `.grad` are None: the averaged gradients exist only as this rank's
slice, inside the optimizer.

Checkpoints see the state through `ShardedState` (plait.optim.sharded_state): this rank's part
of every parameter's state entries, as views of the live state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor

from plait.config import OptimSection
from plait.optim import OPTIMIZERS
from plait.optim.groups import param_groups
from plait.optim.sharded_state import StatePiece

# PyTorch 2.13 renamed the flat-tensor collectives (the old names warn); older versions have only those.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (call under no_grad: then it is the stored tensor itself)."""
    return t.to_local() if isinstance(t, DTensor) else t


def _tp_sharded(p: torch.Tensor) -> bool:
    """Whether tensor-parallel ranks hold different elements of `p` (else they hold copies)."""
    return isinstance(p, DTensor) and any(placement.is_shard() for placement in p.placements)


def _options(group: dict[str, Any]) -> dict[str, Any]:
    """A parameter group's hyperparameters: everything but its parameters."""
    return {k: v for k, v in group.items() if k != "params"}


@dataclass(frozen=True)
class _Piece:
    """One parameter's local tensor in the flat bucket: elements [start, start + numel).
    `group` is the index of its parameter group."""

    group: int
    param: nn.Parameter
    start: int
    numel: int
    tp_sharded: bool


def _size(group: ProcessGroup | None) -> int:
    return dist.get_world_size(group) if group is not None else 1


class Zero1Optimizer(torch.optim.Optimizer):
    """An element-wise optimizer over the data-parallel ranks, its state sharded over `shard_group`.

    `build_inner(groups)` builds the inner optimizer over `groups`: one per outer group, with
    its options and, as its one parameter, a 1-D view of this rank's slice of that group (none
    where the slice holds nothing of it). The interface is torch's: the loop sets
    `param_groups[i]["lr"]` (the outer groups carry the inner optimizer's hyperparameters), calls
    `step()` and `zero_grad(set_to_none=True)`; `clip_grad_norm_(max_norm)` clips by the global
    norm. The groups' parameters are the model's own (plain tensors or DTensors, one dtype);
    every rank must pass them in the same order. `replicate_group` joins ranks that hold the
    same slice, `tp_group` ranks that hold different tensor-parallel shards of one parameter.
    """

    def __init__(
        self,
        groups: list[dict[str, Any]],
        build_inner: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
        shard_group: ProcessGroup | None,
        replicate_group: ProcessGroup | None = None,
        tp_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__(groups, {})
        self._shard_group, self._replicate_group, self._tp_group = shard_group, replicate_group, tp_group
        shards = _size(shard_group)
        # Each gradient enters the sum once per data-parallel rank: dividing first gives the mean.
        self._dp_degree = shards * _size(replicate_group)

        self._pieces: list[_Piece] = []
        bounds = []  # each group's [start, end) in the bucket: groups differ in weight decay
        offset = 0
        with torch.no_grad():
            for g, group in enumerate(self.param_groups):
                start = offset
                for p in group["params"]:
                    numel = _local(p).numel()
                    self._pieces.append(_Piece(g, p, offset, numel, _tp_sharded(p)))
                    offset += numel
                bounds.append((start, offset))
        first = self._pieces[0].param
        dtypes = {piece.param.dtype for piece in self._pieces}
        assert len(dtypes) == 1, f"one flat bucket needs one dtype, got {dtypes}"
        # The bucket is padded to a multiple of the shard count; the padding is never stepped.
        self._slice_numel = -(-offset // shards)
        self._lo = (dist.get_rank(shard_group) if shards > 1 else 0) * self._slice_numel
        hi = self._lo + self._slice_numel
        # (piece, start, end): the part of a parameter inside this rank's slice, bucket offsets.
        self._overlaps = [
            (piece, max(piece.start, self._lo), min(piece.start + piece.numel, hi))
            for piece in self._pieces
            if piece.start < hi and piece.start + piece.numel > self._lo
        ]
        # This rank's slice of the parameter values, refreshed from the model before each step;
        # the inner optimizer steps views of it, one per group, so it holds state for the slice only.
        self._param_slice = torch.zeros(self._slice_numel, dtype=first.dtype, device=_local(first).device)
        # Per group: its part of the slice, as (start, end) in the slice and the view the inner
        # optimizer steps (None where the slice holds nothing of that group).
        self._views: list[tuple[int, int, torch.Tensor] | None] = []
        inner_groups = []
        for group, (start, end) in zip(self.param_groups, bounds):
            a, b = max(start, self._lo) - self._lo, min(end, hi) - self._lo
            view = (a, b, self._param_slice[a:b]) if a < b else None
            self._views.append(view)
            inner_groups.append({**_options(group), "params": [view[2]] if view is not None else []})
        self._inner = build_inner(inner_groups)
        for group, inner in zip(self.param_groups, self._inner.param_groups):
            group.update(_options(inner))  # the inner defaults (lr, betas, ...) complete the groups
        self._grad_slice: torch.Tensor | None = None  # this step's averaged gradients, once reduced

    @torch.no_grad()
    def _reduce_gradients(self) -> torch.Tensor:
        """This rank's slice of the gradients averaged over all data-parallel ranks (once per step)."""
        if self._grad_slice is not None:
            return self._grad_slice
        first = self._pieces[0].param
        bucket = torch.zeros(self._slice_numel * _size(self._shard_group), dtype=first.dtype, device=self._param_slice.device)
        for piece in self._pieces:
            if piece.param.grad is not None:  # an unused parameter contributes zeros
                bucket[piece.start : piece.start + piece.numel].copy_(_local(piece.param.grad).reshape(-1))
                # The bucket now holds it, and this rank's unaveraged gradient is not the step's:
                # free it (the bucket takes the gradients' place instead of adding to them).
                piece.param.grad = None
        bucket.div_(self._dp_degree)
        if _size(self._shard_group) > 1:
            grad_slice = torch.empty_like(self._param_slice)
            _reduce_scatter_flat(grad_slice, bucket, group=self._shard_group)
        else:
            grad_slice = bucket
        if _size(self._replicate_group) > 1:
            dist.all_reduce(grad_slice, group=self._replicate_group)
        self._grad_slice = grad_slice
        return grad_slice

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale the averaged gradients so their global 2-norm is at most `max_norm`; return the
        norm before clipping (the same on every rank). Reduces the gradients first."""
        grad_slice = self._reduce_gradients()
        squares = {True: grad_slice.new_zeros(()), False: grad_slice.new_zeros(())}
        for piece, a, b in self._overlaps:
            squares[piece.tp_sharded] += grad_slice[a - self._lo : b - self._lo].square().sum()
        sharded, total = squares[True], squares[False]
        # Tensor-parallel shards are different elements on each tp rank; replicated parameters
        # are copies there and count once. Shard ranks hold different slices; replicas the same.
        if _size(self._tp_group) > 1:
            dist.all_reduce(sharded, group=self._tp_group)
        total += sharded
        if _size(self._shard_group) > 1:
            dist.all_reduce(total, group=self._shard_group)
        norm = total.sqrt()
        # The same coefficient as torch.nn.utils.clip_grad_norm_.
        grad_slice.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        assert closure is None, "Zero1Optimizer takes no closure"
        grad_slice = self._reduce_gradients()
        for piece, a, b in self._overlaps:  # the model's values: a checkpoint may have replaced them
            self._param_slice[a - self._lo : b - self._lo].copy_(_local(piece.param).reshape(-1)[a - piece.start : b - piece.start])
        for group, inner, view in zip(self.param_groups, self._inner.param_groups, self._views):
            inner.update(_options(group))  # what the loop or a checkpoint set on the outer groups
            if view is not None:
                a, b, tensor = view
                tensor.grad = grad_slice[a:b]
        self._inner.step()
        for group, inner in zip(self.param_groups, self._inner.param_groups):
            group.update(_options(inner))  # an optimizer may adapt its own options as it steps
        self._write_back(self._all_gather(self._param_slice))

    def _all_gather(self, slice_: torch.Tensor) -> torch.Tensor:
        """Every rank's slice, concatenated: the whole (padded) bucket."""
        shards = _size(self._shard_group)
        if shards == 1:
            return slice_
        full = slice_.new_empty(self._slice_numel * shards)
        _all_gather_flat(full, slice_.contiguous(), group=self._shard_group)
        return full

    def _write_back(self, bucket: torch.Tensor) -> None:
        for piece in self._pieces:
            local = _local(piece.param)
            local.copy_(bucket[piece.start : piece.start + piece.numel].view(local.shape))

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._inner.zero_grad(set_to_none=True)
        self._grad_slice = None

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError("ZeRO-1 state is per rank; plait.checkpoint.sharded saves it with state_pieces")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        raise NotImplementedError("ZeRO-1 state is per rank; plait.checkpoint.sharded loads it with state_pieces")

    # --- sharded checkpoints (plait.optim.sharded_state): this rank's part of each parameter's state ---

    @torch.no_grad()
    def _create_state(self) -> None:
        """Give the inner optimizer its state before its first step, for a checkpoint to load
        into: one step on zero gradients creates it (as torch's get_optimizer_state_dict does),
        then it is zeroed, the state of no step taken. The slice's values that step changes are
        refreshed from the model before the next one."""
        views = [view[2] for view in self._views if view is not None]
        if all(tensor in self._inner.state for tensor in views):
            return
        for tensor in views:
            tensor.grad = torch.zeros_like(tensor)
        self._inner.step()
        for tensor in views:
            tensor.grad = None
            for value in self._inner.state[tensor].values():
                value.zero_()

    @torch.no_grad()
    def state_pieces(self) -> list[StatePiece]:
        """This rank's part of every parameter's state entries, as views of the live state:
        per-element entries as the parameter's elements in this rank's slice, scalar entries
        (one per group) whole, for each parameter of the group as torch's optimizers keep them."""
        self._create_state()
        pieces = []
        for piece, a, b in self._overlaps:
            group_start, _, tensor = self._views[piece.group]
            p = piece.param
            offset = (0,) * p.dim()
            if isinstance(p, DTensor):
                from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

                offset = tuple(compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)[1])
            for key, value in self._inner.state[tensor].items():
                assert isinstance(value, torch.Tensor) and value.shape in (tensor.shape, torch.Size()), (
                    f"{type(self._inner).__name__} state {key!r} is neither per element nor a scalar: "
                    "ZeRO-1 needs an element-wise optimizer"
                )
                if value.dim() == 0:
                    pieces.append(StatePiece(p, key, (), (), (), 0, value.view(1)))
                    continue
                flat = value[a - self._lo - group_start : b - self._lo - group_start]
                pieces.append(StatePiece(p, key, tuple(p.shape), tuple(_local(p).shape), offset, a - piece.start, flat))
        return pieces


def build_zero1_optimizer(
    model: nn.Module, cfg: OptimSection, shard_group: ProcessGroup | None,
    replicate_group: ProcessGroup | None, tp_group: ProcessGroup | None,
) -> Zero1Optimizer:
    """ZeRO-1 over the optimizer `cfg.name` names (plait.optim.OPTIMIZERS), with the shared
    parameter groups (plait.optim.groups); a `shard_group` of one rank (or None) is plain data
    parallelism."""
    spec = OPTIMIZERS[cfg.name]
    # Refused with a message for people when the config is checked; here it is an invariant.
    assert spec.elementwise, f"ZeRO-1 steps flat slices, which {spec.name!r} (not element-wise) cannot step"
    # foreach: one kernel per group, as the unsharded optimizer; the slice's views are plain tensors.
    return Zero1Optimizer(
        param_groups(model, cfg), lambda groups: spec.build(groups, cfg, True), shard_group, replicate_group, tp_group
    )
