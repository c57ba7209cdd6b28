"""Expert parallelism: the experts of each MoE block spread over the `ep` axis, tokens sent to
the rank holding their expert by all-to-all and brought back the same way.

The ep ranks are taken from the data-parallel shard axis (`Layout.ep_mesh()` views the dp_shard
ranks as (ep_shard, ep)): each rank holds experts/ep experts, a contiguous block of dim 0 of the
stacked expert weights, as a DTensor `Shard(0)` on the ep axis (so checkpoints gather whole
tensors and restore a slice per rank through the same state-dict helpers as the dense weights).
Routing is untouched: the router is a dense (data-parallel) weight and picks the same top-k as in
one process; only where each expert's tokens are computed changes.

Per MoE block and step, with the tokens sorted by expert (plait.model.moe):
  1. all-to-all of the counts (tokens per expert from each rank), so every rank knows the uneven
     splits it will send and receive;
  2. all-to-all of the tokens (dispatch), computation of the local experts, all-to-all back
     (combine); backward runs the same two exchanges in reverse (`_AllToAll.backward`).
Gradients: an expert's gradient on its rank already sums the contributions of every rank's
tokens, so it must not be averaged over `ep`; it is averaged over the ranks that hold the same
experts (ep_shard, and dp_replicate) by FSDP, with the divide factor set to the whole data-parallel
degree, which is what the dense gradients are averaged over (the loss of each rank is a mean over
its own tokens). `apply_global_load_balance` is separate: with any data parallelism it sums the
router's token counts over the data-parallel ranks for the balance loss.

Shape legend: M token rows (kept assignments), D hidden, P ep ranks, L local experts (X / P).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from plait.model.moe import expert_swiglu, moe_layers


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; its gradient is the reverse exchange."""

    @staticmethod
    def forward(ctx, x_MD: torch.Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup) -> torch.Tensor:  # noqa: ANN001
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        out_MD = x_MD.new_empty((sum(output_splits), *x_MD.shape[1:]))
        dist.all_to_all_single(out_MD, x_MD.contiguous(), output_splits, input_splits, group=group)
        return out_MD

    @staticmethod
    def backward(ctx, grad_MD: torch.Tensor):  # noqa: ANN205
        out_MD = grad_MD.new_empty((sum(ctx.input_splits), *grad_MD.shape[1:]))
        dist.all_to_all_single(out_MD, grad_MD.contiguous(), ctx.input_splits, ctx.output_splits, group=ctx.group)
        return out_MD, None, None, None


def all_to_all(x_MD: torch.Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable uneven all-to-all of rows: `input_splits[p]` rows go to rank p,
    `output_splits[p]` rows come from it."""
    return _AllToAll.apply(x_MD, output_splits, input_splits, group)


def _local(weight: torch.Tensor) -> torch.Tensor:
    # Differentiable: the gradient of the local block lands in the DTensor's gradient.
    return weight.to_local() if isinstance(weight, DTensor) else weight


class ExpertParallelExperts(nn.Module):
    """Stands in for `plait.model.moe.Experts` (same parameter names, so checkpoints and
    optimizer state keep their keys): holds this rank's experts and exchanges tokens."""

    def __init__(self, gate_proj: nn.Parameter, up_proj: nn.Parameter, down_proj: nn.Parameter, ep_mesh: DeviceMesh) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.group = ep_mesh.get_group()
        self.ep = ep_mesh.size()

    def forward(self, x_MD: torch.Tensor, counts_X: torch.Tensor) -> torch.Tensor:
        p = self.ep
        send_PL = counts_X.view(p, -1)  # rank q holds experts q*L .. q*L+L-1
        recv_PL = torch.empty_like(send_PL)
        dist.all_to_all_single(recv_PL, send_PL.contiguous(), group=self.group)
        input_splits, output_splits = send_PL.sum(1).tolist(), recv_PL.sum(1).tolist()
        x_recv_MD = all_to_all(x_MD, output_splits, input_splits, self.group)

        # Received rows are grouped by source rank, then by expert; the experts want them grouped
        # by expert (then source): permute, compute, and undo the permutation.
        local = send_PL.shape[1]
        chunks = torch.arange(x_recv_MD.shape[0], device=x_MD.device).split(recv_PL.flatten().tolist())
        perm = torch.cat([chunks[q * local + j] for j in range(local) for q in range(p)])
        y_MD = expert_swiglu(x_recv_MD[perm], recv_PL.sum(0).tolist(),
                             _local(self.gate_proj), _local(self.up_proj), _local(self.down_proj))
        y_recv_MD = y_MD[torch.argsort(perm)]
        return all_to_all(y_recv_MD, input_splits, output_splits, self.group)


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Replace each MoE block's experts by this rank's block of experts (DTensor Shard(0) on the
    1-D `ep_mesh`) and the all-to-all exchange. Every rank starts from the full, identically
    initialised weights, so the shards are cut locally without communication."""
    p, rank = ep_mesh.size(), ep_mesh.get_local_rank()
    for moe in moe_layers(model):
        old = moe.experts
        shards = [
            nn.Parameter(DTensor.from_local(w.detach().chunk(p)[rank].clone(), ep_mesh, [Shard(0)], run_check=False))
            for w in (old.gate_proj, old.up_proj, old.down_proj)
        ]
        moe.experts = ExpertParallelExperts(*shards, ep_mesh)


def apply_expert_fully_shard(model: nn.Module, expert_dp_mesh: DeviceMesh, dp_degree: int, zero_stage: int, mixed_precision: bool) -> None:
    """FSDP for the expert weights over the ranks that hold the same experts (`expert_dp_mesh`:
    ep_shard, or dp_replicate x ep_shard), each MoE block's experts their own unit, before the
    dense FSDP units (which then leave these parameters alone).

    FSDP would average over `expert_dp_mesh` only; the divide factor makes it sum and divide by
    the whole data-parallel degree instead (see the module docstring). Sum reduction is forced
    because the pre-scaled sum FSDP would otherwise use (PREMUL_SUM) is NCCL-only; gloo lacks it."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # The same policy as the dense units (plait.parallel.fully_shard); CPU offload is refused with EP.
    kwargs: dict = {"mesh": expert_dp_mesh, "reshard_after_forward": zero_stage == 3}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    shard_ranks = expert_dp_mesh.size(expert_dp_mesh.ndim - 1)
    for moe in moe_layers(model):
        fully_shard(moe.experts, **kwargs)
        moe.experts.set_gradient_divide_factor(float(dp_degree))
        # Only with a real shard group: in PyTorch 2.13, with one shard rank FSDP divides in its
        # single-rank copy and, when sum reduction is forced, again after it (gradients halved).
        # With one shard rank no reduce-scatter runs, so there is no PREMUL_SUM to avoid.
        moe.experts.set_force_sum_reduction_for_comms(shard_ranks > 1)


def apply_global_load_balance(model: nn.Module, group: dist.ProcessGroup | None) -> None:
    """Make every MoE layer's balance loss see the token counts of all data-parallel ranks: the
    per-expert counts (a few numbers per layer) are summed over `group` (None: all ranks) in
    each forward. See plait.model.moe for what stays local to a micro-batch."""

    def reduce(stats: torch.Tensor) -> torch.Tensor:
        total = stats.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    for moe in moe_layers(model):
        moe.count_reduce = reduce
