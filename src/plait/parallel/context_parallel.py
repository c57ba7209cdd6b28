"""Context parallelism: each sequence is split over the ranks of the `cp` axis, and attention runs
across them; every other layer is per token and runs on the local shard unchanged.

Both methods are written by hand here: PyTorch's own `context_parallel` fails on CPU (there is no
sharding strategy for the CPU flash-attention op, and FlexAttention has no CPU backward).

- ring: each rank keeps its query shard; key/value shards travel around the cp ring
  (point-to-point isend/irecv, the next transfer posted before the current block is computed) and
  the partial results are merged by log-sum-exp. The backward is a ring too: the key/value shards
  travel again, and their gradient accumulators follow them back to their owners; the whole
  sequence is never gathered. Causal load balancing: the sequence is cut into 2 x cp chunks and
  rank r holds chunks r and 2cp-1-r, so every rank does the same causal work; fully masked blocks
  are skipped and diagonal blocks use the causal mask.
- ulysses: an all-to-all turns the sequence shard of all heads into the whole sequence of cp_degree-th
  of the heads (query and key/value heads alike: the degree divides the KV heads, nothing is
  replicated), causal attention runs locally, and a second all-to-all turns the result back. The
  shards are contiguous: every rank attends over the whole sequence for its heads, so the causal
  work is balanced without reordering.

Grouped-query attention works in both: key/value heads are sent as they are and repeated for their
query heads only inside a block. Rotary embeddings use each token's global position
(`ContextSharding.split`), which under the ring's load balancing are not contiguous.

Shape legend: B batch, T tokens of this rank, N tokens of the whole sequence, C chunk (T / 2 in the
ring), H query heads, K key/value heads, E head dim, h = H / cp and k = K / cp (Ulysses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

METHODS = ("ring", "ulysses")


def shard_positions(seq_len: int, cp_rank: int, cp_degree: int, method: str) -> torch.Tensor:
    """Global positions (int64) of the tokens rank `cp_rank` holds, in the order it holds them."""
    if method == "ring":
        chunk = seq_len // (2 * cp_degree)
        first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
        last = torch.arange((2 * cp_degree - 1 - cp_rank) * chunk, (2 * cp_degree - cp_rank) * chunk)
        return torch.cat([first, last])
    local = seq_len // cp_degree
    return torch.arange(cp_rank * local, (cp_rank + 1) * local)


@dataclass
class ContextSharding:
    """This rank's place on the cp axis: which tokens of every sequence it keeps, and the group
    that averages what its ranks computed on different tokens."""

    group: dist.ProcessGroup
    rank: int
    degree: int
    method: str

    def split(self, inputs_BN: torch.Tensor, targets_BN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's inputs_BT, targets_BT and their global positions_T."""
        positions_T = shard_positions(inputs_BN.shape[1], self.rank, self.degree, self.method).to(inputs_BN.device)
        return inputs_BN[:, positions_T], targets_BN[:, positions_T], positions_T

    def average(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over the cp ranks of a per-rank mean (shards are equal-sized, so this is the
        mean over all tokens of the sequences)."""
        total = value.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total / self.degree


def context_sharding(cp_mesh: DeviceMesh, method: str) -> ContextSharding:
    return ContextSharding(cp_mesh.get_group(), cp_mesh.get_local_rank(), cp_mesh.size(), method)


def apply_context_parallel(model: nn.Module, cp_mesh: DeviceMesh, method: str) -> None:
    """Make every block's attention run over the sequence spread across `cp_mesh`. The model then
    expects this rank's tokens (`ContextSharding.split`) and their global positions."""
    if method not in METHODS:
        raise ValueError(f"parallel.cp_method = {method!r} must be one of {METHODS}")
    sharding = context_sharding(cp_mesh, method)
    attention = RingAttention(sharding) if method == "ring" else UlyssesAttention(sharding)
    for block in model.layers.values():
        block.attn.attention_fn = attention


# --- ring attention ---------------------------------------------------------------------------


def _expand_kv(x_BKCE: torch.Tensor, heads: int) -> torch.Tensor:
    groups = heads // x_BKCE.shape[1]
    return x_BKCE if groups == 1 else x_BKCE.repeat_interleave(groups, dim=1)


def _fold_kv(grad_BHCE: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Gradient of `_expand_kv`: the query heads that shared a key/value head add up."""
    b, h, c, e = grad_BHCE.shape
    return grad_BHCE if h == kv_heads else grad_BHCE.view(b, kv_heads, h // kv_heads, c, e).sum(2)


def _block_forward(q_BHCE, k_BHCE, v_BHCE, causal: bool, cpu_kernel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query chunk to one key/value chunk: out_BHCE and its logsumexp_BHC (fp32)."""
    if cpu_kernel and q_BHCE.device.type == "cpu":
        # The CPU flash-attention kernel that scaled_dot_product_attention uses, called directly
        # because it also returns the log-sum-exp needed to merge blocks.
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q_BHCE, k_BHCE, v_BHCE, 0.0, causal)
        return out, lse.to(_accumulation_dtype(q_BHCE))
    scores = _scores(q_BHCE, k_BHCE, causal)
    lse = scores.logsumexp(-1)
    return ((scores - lse[..., None]).exp() @ v_BHCE.to(scores.dtype)).to(q_BHCE.dtype), lse


def _block_backward(dout_BHCE, q_BHCE, k_BHCE, v_BHCE, out_BHCE, lse_BHC, causal: bool, cpu_kernel: bool):
    """dq, dk, dv of one block, given the merged output and log-sum-exp of the whole row: with
    those, each block's share of the softmax gradient is exact on its own."""
    if cpu_kernel and q_BHCE.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout_BHCE, q_BHCE, k_BHCE, v_BHCE, out_BHCE, lse_BHC, 0.0, causal
        )
    return _block_backward_math(dout_BHCE, q_BHCE, k_BHCE, v_BHCE, out_BHCE, lse_BHC, causal)


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """Partial results are merged and gradients summed in fp32 (fp64 for fp64 inputs)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _scores(q_BHCE, k_BHCE, causal: bool) -> torch.Tensor:
    acc = _accumulation_dtype(q_BHCE)
    scores = (q_BHCE.to(acc) @ k_BHCE.to(acc).transpose(-1, -2)) / math.sqrt(q_BHCE.shape[-1])
    if causal:
        c = scores.shape[-1]
        scores = scores.masked_fill(torch.ones(c, c, dtype=torch.bool, device=scores.device).triu(1), float("-inf"))
    return scores


def _block_backward_math(dout_BHCE, q_BHCE, k_BHCE, v_BHCE, out_BHCE, lse_BHC, causal: bool):
    """The same as the CPU kernel's backward in plain tensor algebra (for other devices)."""
    p = (_scores(q_BHCE, k_BHCE, causal) - lse_BHC[..., None]).exp()
    acc = p.dtype
    do = dout_BHCE.to(acc)
    dv = p.transpose(-1, -2) @ do
    dp = do @ v_BHCE.to(acc).transpose(-1, -2)
    ds = p * (dp - (do * out_BHCE.to(acc)).sum(-1, keepdim=True)) / math.sqrt(q_BHCE.shape[-1])
    dq, dk = ds @ k_BHCE.to(acc), ds.transpose(-1, -2) @ q_BHCE.to(acc)
    return dq.to(q_BHCE.dtype), dk.to(q_BHCE.dtype), dv.to(q_BHCE.dtype)


def _block_pairs(rank: int, source: int, cp: int):
    """(query chunk, key/value chunk, causal) of the blocks to compute when this rank holds the
    key/values of `source`: local chunk 0 is global chunk r, chunk 1 is 2cp-1-r. A query chunk
    after the key chunk sees all of it, the same chunk is causal, an earlier one is skipped."""
    q_global, kv_global = (rank, 2 * cp - 1 - rank), (source, 2 * cp - 1 - source)
    for qi in (0, 1):
        for ki in (0, 1):
            if q_global[qi] >= kv_global[ki]:
                yield qi, ki, q_global[qi] == kv_global[ki]


class _Ring:
    """Point-to-point exchanges with the cp neighbours: send to rank+1, receive from rank-1."""

    def __init__(self, sharding: ContextSharding, cpu_kernel: bool) -> None:
        self.group, self.rank, self.degree = sharding.group, sharding.rank, sharding.degree
        self.cpu_kernel = cpu_kernel
        self.next = dist.get_global_rank(self.group, (self.rank + 1) % self.degree)
        self.prev = dist.get_global_rank(self.group, (self.rank - 1) % self.degree)

    def start(self, send: torch.Tensor, tag: int) -> tuple[torch.Tensor, list]:
        """Post the send of `send` and the receive of the neighbour's same-shaped tensor; return
        the receive buffer and the work to wait on. Distinct tags keep the key/value and the
        gradient streams apart (gloo matches messages by tag)."""
        recv = torch.empty_like(send)
        works = [
            dist.isend(send, self.next, group=self.group, tag=tag),
            dist.irecv(recv, self.prev, group=self.group, tag=tag),
        ]
        return recv, works


def _wait(works: list) -> None:
    for work in works:
        work.wait()


KV_TAG, GRAD_TAG = 11, 12


class _RingAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_BHTE: torch.Tensor, k_BKTE: torch.Tensor, v_BKTE: torch.Tensor, ring: _Ring) -> torch.Tensor:
        heads = q_BHTE.shape[1]
        q_chunks = q_BHTE.chunk(2, dim=2)
        # Keys and values travel as one tensor: one message per step.
        kv_2BKTE = torch.stack([k_BKTE, v_BKTE])
        outs: list[torch.Tensor | None] = [None, None]
        lses: list[torch.Tensor | None] = [None, None]
        for step in range(ring.degree):
            source = (ring.rank - step) % ring.degree
            if step < ring.degree - 1:  # the next block's transfer runs while this one computes
                next_kv, works = ring.start(kv_2BKTE, KV_TAG)
            k_chunks, v_chunks = kv_2BKTE[0].chunk(2, dim=2), kv_2BKTE[1].chunk(2, dim=2)
            for qi, ki, causal in _block_pairs(ring.rank, source, ring.degree):
                out, lse = _block_forward(
                    q_chunks[qi], _expand_kv(k_chunks[ki], heads), _expand_kv(v_chunks[ki], heads), causal, ring.cpu_kernel
                )
                if outs[qi] is None:  # step 0 computes both diagonal blocks first: lse is finite after
                    outs[qi], lses[qi] = out.to(lse.dtype), lse
                else:
                    merged = torch.logaddexp(lses[qi], lse)
                    outs[qi] = outs[qi] * (lses[qi] - merged).exp()[..., None] + out.to(lse.dtype) * (lse - merged).exp()[..., None]
                    lses[qi] = merged
            if step < ring.degree - 1:
                _wait(works)
                kv_2BKTE = next_kv
        out_BHTE = torch.cat(outs, dim=2).to(q_BHTE.dtype)
        lse_BHT = torch.cat(lses, dim=2)
        ctx.save_for_backward(q_BHTE, k_BKTE, v_BKTE, out_BHTE, lse_BHT)
        ctx.ring = ring
        return out_BHTE

    @staticmethod
    def backward(ctx, dout_BHTE: torch.Tensor):
        q_BHTE, k_BKTE, v_BKTE, out_BHTE, lse_BHT = ctx.saved_tensors
        ring: _Ring = ctx.ring
        heads, kv_heads = q_BHTE.shape[1], k_BKTE.shape[1]
        dout_BHTE = dout_BHTE.contiguous()
        q_chunks, out_chunks = q_BHTE.chunk(2, dim=2), out_BHTE.chunk(2, dim=2)
        dout_chunks, lse_chunks = dout_BHTE.chunk(2, dim=2), lse_BHT.chunk(2, dim=2)
        acc = _accumulation_dtype(q_BHTE)
        dq_BHTE = torch.zeros_like(q_BHTE, dtype=acc)
        dq_chunks = dq_BHTE.chunk(2, dim=2)
        kv_2BKTE = torch.stack([k_BKTE, v_BKTE])
        grad_works: list = []
        for step in range(ring.degree):
            source = (ring.rank - step) % ring.degree
            if step < ring.degree - 1:
                next_kv, kv_works = ring.start(kv_2BKTE, KV_TAG)
            k_chunks, v_chunks = kv_2BKTE[0].chunk(2, dim=2), kv_2BKTE[1].chunk(2, dim=2)
            # Gradients (fp32) of the key/values held now, i.e. `source`'s.
            dkv_2BKTE = torch.zeros(kv_2BKTE.shape, dtype=acc, device=kv_2BKTE.device)
            dk_chunks, dv_chunks = dkv_2BKTE[0].chunk(2, dim=2), dkv_2BKTE[1].chunk(2, dim=2)
            for qi, ki, causal in _block_pairs(ring.rank, source, ring.degree):
                dq, dk, dv = _block_backward(
                    dout_chunks[qi], q_chunks[qi], _expand_kv(k_chunks[ki], heads), _expand_kv(v_chunks[ki], heads),
                    out_chunks[qi], lse_chunks[qi], causal, ring.cpu_kernel,
                )
                dq_chunks[qi].add_(dq)
                dk_chunks[ki].add_(_fold_kv(dk, kv_heads))
                dv_chunks[ki].add_(_fold_kv(dv, kv_heads))
            if step > 0:  # add what the ranks before this one contributed to `source`'s gradient
                _wait(grad_works)
                dkv_2BKTE += incoming
            # The accumulator follows its key/values one rank on; after the last step that is
            # back to their owner.
            incoming, grad_works = ring.start(dkv_2BKTE, GRAD_TAG)
            if step < ring.degree - 1:
                _wait(kv_works)
                kv_2BKTE = next_kv
        _wait(grad_works)
        dk_BKTE, dv_BKTE = incoming[0].to(k_BKTE.dtype), incoming[1].to(v_BKTE.dtype)
        return dq_BHTE.to(q_BHTE.dtype), dk_BKTE, dv_BKTE, None


class RingAttention:
    """Causal attention over a sequence held in load-balanced chunks by the cp ranks."""

    def __init__(self, sharding: ContextSharding, cpu_kernel: bool = True) -> None:
        # cpu_kernel=False computes the blocks in plain tensor algebra on a CPU too (as on other
        # devices), so that path is tested here.
        self.ring = _Ring(sharding, cpu_kernel)

    def __call__(self, q_BHTE: torch.Tensor, k_BKTE: torch.Tensor, v_BKTE: torch.Tensor) -> torch.Tensor:
        return _RingAttentionFunction.apply(q_BHTE.contiguous(), k_BKTE.contiguous(), v_BKTE.contiguous(), self.ring)


# --- Ulysses (all-to-all) attention -----------------------------------------------------------


def _sequence_to_heads(x_BHTE: torch.Tensor, group: dist.ProcessGroup, cp: int) -> torch.Tensor:
    """(B, H, T, E) of this rank's tokens -> (B, H/cp, N, E) of this rank's heads."""
    b, heads, t, e = x_BHTE.shape
    send = x_BHTE.reshape(b, cp, heads // cp, t, e).transpose(0, 1).contiguous()  # block j -> rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[i]: rank i's tokens of this rank's heads
    return recv.permute(1, 2, 0, 3, 4).reshape(b, heads // cp, cp * t, e)


def _heads_to_sequence(x_BhNE: torch.Tensor, group: dist.ProcessGroup, cp: int) -> torch.Tensor:
    """The inverse: (B, H/cp, N, E) of this rank's heads -> (B, H, T, E) of this rank's tokens."""
    b, h, n, e = x_BhNE.shape
    send = x_BhNE.reshape(b, h, cp, n // cp, e).permute(2, 0, 1, 3, 4).contiguous()  # rank j's tokens
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[i]: this rank's tokens of rank i's heads
    return recv.transpose(0, 1).reshape(b, cp * h, n // cp, e)


class _AllToAll(torch.autograd.Function):
    """One of the two all-to-alls; its backward is the other (they are inverse permutations)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sharding: ContextSharding, to_heads: bool) -> torch.Tensor:
        ctx.sharding, ctx.to_heads = sharding, to_heads
        move = _sequence_to_heads if to_heads else _heads_to_sequence
        return move(x, sharding.group, sharding.degree)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        move = _heads_to_sequence if ctx.to_heads else _sequence_to_heads
        return move(grad.contiguous(), ctx.sharding.group, ctx.sharding.degree), None, None


class UlyssesAttention:
    """Causal attention with the sequence gathered per head group by all-to-all (DeepSpeed Ulysses)."""

    def __init__(self, sharding: ContextSharding) -> None:
        self.sharding = sharding

    def __call__(self, q_BHTE: torch.Tensor, k_BKTE: torch.Tensor, v_BKTE: torch.Tensor) -> torch.Tensor:
        s = self.sharding
        # Contiguous head blocks: rank j gets query heads [j h, (j+1) h) and key/value heads
        # [j k, (j+1) k), which are exactly the key/value heads those query heads use.
        q_BhNE = _AllToAll.apply(q_BHTE, s, True)
        k_BkNE = _AllToAll.apply(k_BKTE, s, True)
        v_BkNE = _AllToAll.apply(v_BKTE, s, True)
        groups = q_BhNE.shape[1] // k_BkNE.shape[1]
        if groups > 1:
            k_BkNE = k_BkNE.repeat_interleave(groups, dim=1)
            v_BkNE = v_BkNE.repeat_interleave(groups, dim=1)
        out_BhNE = F.scaled_dot_product_attention(q_BhNE, k_BkNE, v_BkNE, is_causal=True)
        return _AllToAll.apply(out_BhNE, s, False)
