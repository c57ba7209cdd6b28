"""Mixture-of-experts MLP: a top-k router over SwiGLU experts, capacity or dropless routing, and
the load-balancing loss. Replaces a block's dense MLP when `ModelArgs.moe_experts > 0`.

No torch.distributed here. Two places take a function from outside instead:
- `MoE.count_reduce` sums the per-expert token counts over the data-parallel ranks (set by
  `plait.parallel.expert_parallel.apply_global_load_balance`), so the balance loss sees the token
  fractions of the whole data-parallel micro-batch, not of this rank's share;
- `Experts.forward` is what expert parallelism overrides: it receives the tokens sorted by expert
  with the count per expert, and may send them to other ranks to be computed there.

Shape legend: B batch, T sequence, D hidden, N tokens (B x T), X experts, K experts per token
(top-k), A assignments (N x K), M kept assignments (A minus the dropped), F expert hidden.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from plait.model.sizes import ModelArgs


def route(logits_NX: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax over all experts, keep the top k, renormalise their weights to sum to 1 (as
    Mixtral does; equal to a softmax over the k chosen logits). Returns (probs_NX, weights_NK,
    experts_NK); probs are the full softmax, which the balance loss needs."""
    probs_NX = torch.softmax(logits_NX.float(), dim=-1)
    top_NK, experts_NK = torch.topk(probs_NX, top_k, dim=-1)
    weights_NK = top_NK / top_NK.sum(dim=-1, keepdim=True)
    return probs_NX, weights_NK, experts_NK


def capacity_keep(experts_BTK: torch.Tensor, num_experts: int, capacity_factor: float) -> torch.Tensor:
    """Which assignments fit their expert's capacity (bool, same shape as `experts_BTK`).

    Capacity is per sequence: ceil(capacity_factor x T x K / X) slots per expert in each
    sequence. Counting per sequence (GShard's "groups") makes the dropped tokens independent of
    how the batch is split over ranks and micro-batches, so every layout routes exactly as a
    single process does. Inside a sequence the first choices of all tokens are served before any
    second choice, each in token order (as Switch and GShard do): a token loses its second expert
    before another token loses its first. 0 is dropless: everything is kept."""
    if capacity_factor <= 0:
        return torch.ones_like(experts_BTK, dtype=torch.bool)
    b, t, k = experts_BTK.shape
    capacity = math.ceil(capacity_factor * t * k / num_experts)
    order_BAX = F.one_hot(experts_BTK.transpose(1, 2).reshape(b, k * t), num_experts)  # choice-major
    position_BA = ((order_BAX.cumsum(dim=1) - 1) * order_BAX).sum(dim=-1)  # slot within its expert
    keep_BKT = (position_BA < capacity).view(b, k, t)
    return keep_BKT.transpose(1, 2)


def expert_swiglu(x_MD: torch.Tensor, counts: list[int], gate_XFD: torch.Tensor, up_XFD: torch.Tensor, down_XDF: torch.Tensor) -> torch.Tensor:
    """Tokens sorted by expert (counts[i] rows for expert i) through their experts' SwiGLU."""
    outs = []
    for i, x_CD in enumerate(x_MD.split(counts)):
        h_CF = F.silu(x_CD @ gate_XFD[i].t()) * (x_CD @ up_XFD[i].t())
        outs.append(h_CF @ down_XDF[i].t())
    return torch.cat(outs) if outs else x_MD


class Experts(nn.Module):
    """X SwiGLU experts as stacked 3-D weights [experts, ...], so expert parallelism can shard
    dim 0 (each rank keeps a contiguous block of experts)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        x, d, f = args.moe_experts, args.hidden, args.moe_ffn
        self.gate_proj = nn.Parameter(torch.empty(x, f, d))
        self.up_proj = nn.Parameter(torch.empty(x, f, d))
        self.down_proj = nn.Parameter(torch.empty(x, d, f))

    def forward(self, x_MD: torch.Tensor, counts_X: torch.Tensor) -> torch.Tensor:
        """x_MD: kept assignments sorted by expert; counts_X: how many rows each expert has."""
        return expert_swiglu(x_MD, counts_X.tolist(), self.gate_proj, self.up_proj, self.down_proj)


class MoE(nn.Module):
    """Router + experts. After each forward, `aux_loss` holds this layer's balance loss (times
    its coefficient, with gradient) and `stats` the detached counts for the metrics:
    [tokens per expert (X values, before capacity), dropped assignments], summed over the
    data-parallel ranks when `count_reduce` is set."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.num_experts, self.top_k = args.moe_experts, args.moe_top_k
        self.capacity_factor, self.aux_loss_coef = args.moe_capacity_factor, args.moe_aux_loss_coef
        self.router = nn.Linear(args.hidden, args.moe_experts, bias=False)
        self.experts = Experts(args)
        self.count_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.aux_loss: torch.Tensor | None = None
        self.stats: torch.Tensor | None = None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        b, t, d = x_BTD.shape
        x_ND = x_BTD.reshape(b * t, d)
        # The router runs in fp32 (also under autocast): its softmax decides where tokens go, and
        # a rounding flip of near-tied logits would send a token elsewhere.
        logits_NX = F.linear(x_ND.float(), self.router.weight.float())
        probs_NX, weights_NK, experts_NK = route(logits_NX, self.top_k)
        keep_NK = capacity_keep(experts_NK.view(b, t, -1), self.num_experts, self.capacity_factor).reshape(b * t, -1)

        # Balance loss (Switch; "Demons in the Detail"): X * sum_i f_i * P_i with f_i the share of
        # the assignments that chose expert i (before capacity), P_i the mean router probability.
        # f_i is a count, so it can be summed over the data-parallel ranks first (count_reduce):
        # it is then the fraction over the whole data-parallel micro-batch; P_i stays this rank's
        # mean and carries the gradient, and the gradient average over the ranks makes it global.
        # What stays micro-batch-local: with gradient accumulation each micro-batch uses its own f_i.
        counts_X = torch.bincount(experts_NK.flatten(), minlength=self.num_experts)
        stats = torch.cat([counts_X, (~keep_NK).sum().view(1)]).float()
        if self.count_reduce is not None:
            stats = self.count_reduce(stats)
        f_X = stats[:-1] / stats[:-1].sum()
        self.aux_loss = self.aux_loss_coef * self.num_experts * (f_X * probs_NX.mean(dim=0)).sum()
        self.stats = stats.detach()

        # Dispatch: the kept (token, expert) assignments, sorted by expert (stable, so each
        # expert sees its tokens in token order).
        token_A = torch.arange(b * t, device=x_BTD.device).repeat_interleave(self.top_k)
        expert_A, weight_A, keep_A = experts_NK.flatten(), weights_NK.flatten(), keep_NK.flatten()
        expert_M, token_M, weight_M = expert_A[keep_A], token_A[keep_A], weight_A[keep_A]
        order_M = torch.argsort(expert_M, stable=True)
        token_M, weight_M = token_M[order_M], weight_M[order_M]
        kept_counts_X = torch.bincount(expert_M, minlength=self.num_experts)
        y_MD = self.experts(x_ND[token_M], kept_counts_X)
        # Combine: each token sums its experts' outputs times the router weights; a dropped
        # assignment adds nothing (the token passes through the residual connection only). The
        # sum is in fp32 (the router weights are fp32; under autocast the experts' outputs are
        # bf16), returned in the experts' dtype as a dense MLP would.
        out_ND = torch.zeros(x_ND.shape, dtype=torch.float32, device=x_ND.device)
        out_ND.index_add_(0, token_M, y_MD.float() * weight_M[:, None])
        return out_ND.to(y_MD.dtype).view(b, t, d)


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]
