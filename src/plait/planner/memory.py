"""Bytes per GPU of a layout: model states, activations, buffers, by part.

Pure Python. `estimate_memory(workload, layout)` follows what plait allocates (not the ZeRO
paper's bookkeeping), tensor by tensor where the count can be exact:

- model states (`parameters`, `gradients`, `optimizer`) are exact for every layout plait trains:
  parameters are fp32 whatever the compute precision (bf16 is autocast's or FSDP's compute copy);
  gradients are fp32; AdamW keeps exp_avg and exp_avg_sq in fp32 plus a 4-byte step tensor per
  parameter tensor it steps. Tensor parallelism splits each matrix the way `tensor_parallel.py`'s
  table says (norms replicated); FSDP2 (ZeRO-2/3) pads every tensor's dim 0 to a multiple of the
  shard degree (parameter and gradient storages are padded; rank 0's optimizer moments then equal
  the padded shard); ZeRO-1 (`zero1.py`) keeps the full gradients until the end of backward, then
  a flat bucket padded to a multiple of the shard degree, and holds an fp32 copy of its slice of the
  parameters next to the moments of that slice. Expert weights are split over ep and FSDP-sharded
  over the ranks holding the same experts. Pipeline stages hold the layers of `plait.layout.pipeline`'s
  balanced split; the most loaded pipeline rank is reported.
- activations are the tensors autograd saves for backward, counted from plait's forward op by op
  (fp32 on CPU; bf16 autocast on GPUs keeps norms and the residual stream in fp32 and casts each
  linear's input separately). Checked within 10% against saved-tensor counts (docs/planner_memory.md).
- buffers and fragmentation are allowances, stated in `notes`.
- CPU offload (ZeRO-3 with FSDP2's CPUOffloadPolicy) keeps the sharded model states in host
  memory: they are reported in `MemoryEstimate.host`, not in the device total. `memory_fits`
  checks both: the device total against the device's memory, and the host bytes of all ranks of
  a node against the node's host memory less a stated reserve (for the "cpu" device, whose memory
  is the host's, the ranks' whole totals count there).

Symbols: b micro-batch sequences, t tokens of a sequence on this rank (seq_len / cp), N = b t,
D hidden, h/k query/key-value heads, e head dim, f MLP width, V vocabulary, tau the TP degree.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from plait.hardware.devices import Cluster
from plait.model.sizes import ModelArgs
from plait.layout import Layout, Workload
from plait.layout.pipeline import build_pipeline_plan
from plait.optim import OPTIMIZERS
from plait.planner.types import MemoryEstimate

FP32 = 4
# A stated allowance for the caching allocator's fragmentation: a share of the dynamic part
# (everything but the model states), which is allocated and freed every step.
FRAGMENTATION = 0.08
# A stated share of each node's host memory kept back from the ranks: the OS and its page cache,
# the CUDA driver's pinned staging buffers, the data loader and each process's own CPU memory
# (the interpreter, torch's libraries). An assumption, not a measurement.
HOST_RESERVED = 0.10


@dataclass(frozen=True)
class _Tensor:
    """One parameter tensor as the model registers it: dim 0 (`rows`) times the rest (`cols`),
    how tensor parallelism splits it, and whether it is a matrix (decayed, plait.optim.groups)."""

    rows: int
    cols: int
    tp: str  # "rows" (column-wise linear, vocabulary rows), "cols" (row-wise linear), "none"
    matrix: bool
    expert: bool = False

    def local(self, tp: int, ep: int) -> tuple[int, int]:
        """(dim 0, rest) of this rank's tensor after tensor and expert parallelism."""
        rows, cols = self.rows, self.cols
        if self.tp == "rows":
            rows //= tp
        elif self.tp == "cols":
            cols //= tp
        if self.expert:
            rows //= ep  # stacked [experts, ...]: a contiguous block of experts per ep rank
        return rows, cols


def _block_tensors(args: ModelArgs) -> list[_Tensor]:
    """One transformer block's parameters in registration order (attn_norm, attn, mlp_norm, mlp)."""
    d, e = args.hidden, args.head_dim
    out = [_Tensor(d, 1, "none", False)]
    out += [_Tensor(args.heads * e, d, "rows", True), _Tensor(args.kv_heads * e, d, "rows", True),
            _Tensor(args.kv_heads * e, d, "rows", True), _Tensor(d, args.heads * e, "cols", True)]
    out.append(_Tensor(d, 1, "none", False))
    if args.moe_experts > 0:
        x, f = args.moe_experts, args.moe_ffn
        out.append(_Tensor(x, d, "none", True))  # router (X, D): dense, data parallel
        out += [_Tensor(x, f * d, "none", True, expert=True), _Tensor(x, f * d, "none", True, expert=True),
                _Tensor(x, d * f, "none", True, expert=True)]
    elif args.mlp == "swiglu":
        out += [_Tensor(args.ffn, d, "rows", True), _Tensor(args.ffn, d, "rows", True), _Tensor(d, args.ffn, "cols", True)]
    else:
        out += [_Tensor(args.ffn, d, "rows", True), _Tensor(d, args.ffn, "cols", True)]
    return out


@dataclass(frozen=True)
class _States:
    """Model-state element counts of one group of tensors on one rank."""

    local: int  # elements after TP/EP (what the forward uses, unsharded by FSDP)
    sharded: int  # FSDP: the padded shard held; else = local
    tensors: int  # parameter tensors (AdamW keeps one step tensor each)
    matmul: int  # elements of local matrices (what bf16 autocast casts)


def _states(tensors: list[_Tensor], layout: Layout, fsdp: int, expert_fsdp: int) -> _States:
    local = sharded = matmul = 0
    for t in tensors:
        rows, cols = t.local(layout.tp, layout.ep)
        local += rows * cols
        shards = expert_fsdp if t.expert else fsdp
        # FSDP2 chunks dim 0 of the local tensor into `shards` pieces padded to the largest.
        sharded += -(-rows // shards) * cols if shards > 1 else rows * cols
        matmul += rows * cols if t.matrix else 0
    return _States(local, sharded, len(tensors), matmul)


@functools.lru_cache(maxsize=4096)
def _stage_layers(args: ModelArgs, seq_len: int, pp: int, virtual: int) -> tuple[tuple[int, bool, bool], ...]:
    """Per pipeline rank: (layers held, holds the embedding, holds the output head), from plait's
    own balanced split (plait.layout.pipeline, pure Python)."""
    if pp == 1:
        return ((args.layers, True, True),)
    plan = build_pipeline_plan(args, seq_len, pp, virtual)
    ranks = []
    for r in range(pp):
        stages = plan.stages_of_rank(r)
        ranks.append((sum(len(plan.layers_of_stage[s]) for s in stages), 0 in stages, plan.num_stages - 1 in stages))
    return tuple(ranks)


def _inflight(layout: Layout, microbatches: int, pp_rank: int) -> float:
    """Micro-batches of this rank's activations alive at the peak, by schedule (in units of the
    whole rank's activations of one micro-batch)."""
    p, v, m = layout.pp, layout.pp_virtual_stages, microbatches
    if p == 1:
        return 1.0
    if layout.pp_schedule == "gpipe":
        return float(m)  # every forward before any backward
    if layout.pp_schedule == "1f1b":
        return float(min(m, p - pp_rank))  # warm-up of p - r forwards, then one in, one out
    # Interleaved (and PyTorch's interleaved zero-bubble, whose warm-up is the same): Megatron's
    # warm-up of (v - 1) p + 2 (p - 1 - r) chunk forwards, plus the one in the steady phase;
    # each chunk is 1/v of the rank's layers.
    chunks = min(m * v, (v - 1) * p + 2 * (p - 1 - pp_rank) + 1)
    return chunks / v


def _norm_bytes(n: int, d: int, act: int, consumers: int, tp: int, sp: bool) -> int:
    """A norm region: RMSNorm saves its input x and x * rsqrt (fp32, N D each) and rsqrt (N);
    the linears after it save their input: in fp32 the norm's output (one tensor, N D), under
    bf16 autocast one bf16 cast per linear (autocast does not cache activation casts). Sequence
    parallelism splits the norm's own tensors by tp; the linears see the gathered sequence."""
    split = tp if sp else 1
    own = (2 * n * d + n) * FP32 // split
    inputs = n * d * FP32 if act == FP32 else consumers * n * d * act
    return own + inputs


def _block_activations(args: ModelArgs, layout: Layout, b: int, t: int, act: int) -> int:
    """Bytes autograd saves for one block and one micro-batch (no checkpointing)."""
    n, d, tp, sp = b * t, args.hidden, layout.tp, layout.sequence_parallel
    h, k, e = args.heads // tp, args.kv_heads // tp, args.head_dim
    total = _norm_bytes(n, d, act, 3, tp, sp)  # attention norm -> q, k, v
    if layout.cp > 1 and layout.cp_method == "ring":
        # Ring attention saves q, k, v (k heads, not repeated), out and lse (fp32); out is
        # (B, H, T, E) contiguous, so o_proj saves a transposed copy of it.
        total += (2 * n * h * e + 2 * n * k * e + n * h * e) * act + n * h * FP32
    else:
        # scaled_dot_product_attention saves q, k and v repeated to h heads, out (whose transpose
        # o_proj reads as a view) and the fp32 log-sum-exp; Ulysses the same on h/cp heads x T,
        # and its all-to-all back returns (B, H, T, E) contiguous: o_proj saves a copy.
        total += 4 * n * h * e * act + n * h * FP32
        if layout.cp > 1:
            total += n * h * e * act
    if args.moe_experts > 0:
        total += _norm_bytes(n, d, act, 1, tp, sp) + _moe_activations(args, layout, n, act)
    else:
        consumers, saved = (2, 4) if args.mlp == "swiglu" else (1, 2)
        # SwiGLU: gate out, silu(gate), up out, their product; GELU: up out, gelu(up).
        total += _norm_bytes(n, d, act, consumers, tp, sp) + saved * n * (args.ffn // tp) * act
    return total


def _moe_assignments(args: ModelArgs, n: int, b: int) -> int:
    """Kept (token, expert) assignments of N tokens: N k dropless, else at most the capacity."""
    a = n * args.moe_top_k
    if args.moe_capacity_factor > 0:
        t = n // b
        a = min(a, b * args.moe_experts * -(-int(args.moe_capacity_factor * t * args.moe_top_k) // args.moe_experts))
    return a


def _moe_activations(args: ModelArgs, layout: Layout, n: int, act: int) -> int:
    """An MoE block's MLP part: the router's fp32 probabilities (N X) and indices, the gathered
    token rows (M D) into the experts, each expert's SwiGLU (4 M F) and the outputs (M D); with
    balanced routing each ep rank computes as many rows as it sends (M)."""
    m = _moe_assignments(args, n, max(1, layout.micro_batch_size))
    router = n * args.moe_experts * FP32 * 2 + n * args.moe_top_k * 8
    return router + (2 * m * args.hidden + 4 * m * args.moe_ffn) * act + m * (8 + FP32)


def estimate_memory(workload: Workload, layout: Layout) -> MemoryEstimate:
    """Bytes per GPU of the most loaded rank, by part (see the module docstring); `host` is
    that of the rank with the most host bytes (pipeline stages hold different shares), so that
    ranks x `host_total` bounds a node's host bytes from above."""
    stages = estimate_memory_by_stage(workload, layout)
    worst = max(stages, key=lambda e: e.total)
    if len(stages) > 1:
        worst.host = max(stages, key=lambda e: e.host_total).host
    return worst


def estimate_memory_by_stage(workload: Workload, layout: Layout) -> list[MemoryEstimate]:
    """The estimate of each pipeline rank (one entry without a pipeline); the other axes'
    ranks are counted at their most loaded (rank 0 of FSDP's padded shards, the fullest ZeRO-1
    slice)."""
    args = workload.model
    assert args.vocab is not None, "the workload's model needs its vocabulary"
    notes: list[str] = []
    act = 2 if workload.dtype == "bf16" else FP32
    zero, dp_shard = layout.zero_stage, layout.dp_shard
    fsdp = dp_shard * layout.cp if zero >= 2 else 1  # FSDP2 shards over dp_shard x cp (apply.py)
    expert_fsdp = max(1, dp_shard * layout.cp // layout.ep) if zero >= 2 else 1
    block = _states(_block_tensors(args), layout, fsdp, expert_fsdp)
    d, v = args.hidden, args.vocab
    embed = _states([_Tensor(v, d, "rows", True)], layout, fsdp, expert_fsdp)
    head = [_Tensor(d, 1, "none", False)] + ([] if args.tie_embeddings else [_Tensor(v, d, "rows", True)])
    head_states = _states(head, layout, fsdp, expert_fsdp)

    b, t = layout.micro_batch_size, workload.seq_len // layout.cp
    n = b * t
    m = max(1, layout.microbatches(workload))
    estimates: list[MemoryEstimate] = []
    for pp_rank, (layers, first, last) in enumerate(_stage_layers(args, workload.seq_len, layout.pp, layout.pp_virtual_stages)):
        groups = [block] * layers + ([embed] if first else []) + ([head_states] if last else [])
        local = sum(g.local for g in groups)
        sharded = sum(g.sharded for g in groups)
        tensors = sum(g.tensors for g in groups)
        parts, host = _model_states(layout, local, sharded, tensors, first, last, block, embed, head_states, args, act != FP32,
                                     OPTIMIZERS[workload.optimizer].state_bytes_per_param)

        # Activations of one micro-batch on this rank.
        per_block = _block_activations(args, layout, b, t, act)
        if layout.activation_checkpointing:
            # checkpoint_wrapper keeps each block's input (the fp32 residual stream, split by tp
            # under sequence parallelism); backward recomputes one block at a time.
            blocks = layers * n * d * FP32 // (layout.tp if layout.sequence_parallel else 1)
        else:
            blocks = layers * per_block
        top = 2 * t * args.head_dim * FP32  # rotary cos and sin, shared by the layers
        if first:
            top += b * (workload.seq_len // layout.cp + 1) * 8  # the int64 micro-batch of tokens
        if last:
            # Final norm (one linear after it), and log_softmax's fp32 output over the
            # (vocabulary-sharded) logits: N V / tau x 4, often the largest single activation.
            top += _norm_bytes(n, d, act, 1, layout.tp, layout.sequence_parallel) + n * (v // layout.tp) * FP32
        one = blocks + top
        parts["activations"] = one
        parts["pipeline_inflight"] = int((_inflight(layout, m, pp_rank) - 1) * one)
        # Temporaries of backward: the largest of the loss (logits, their fp32 copy under
        # autocast, their gradient) and, with checkpointing, one block recomputed with its grads.
        logits = n * (v // layout.tp) * (act + (FP32 if act != FP32 else 0) + FP32) if last else 0
        recompute = 2 * per_block if layout.activation_checkpointing else 0
        parts["temporaries"] = max(logits, recompute)
        parts["moe_buffers"] = _moe_buffers(args, layout, n, act) if layers else 0
        parts["comm_buffers"] = _comm_buffers(layout, local, sharded, block, embed, head_states, layers, first, last, n, d, act)
        dynamic = sum(parts[k] for k in ("activations", "pipeline_inflight", "temporaries", "moe_buffers", "comm_buffers", "compute_weights"))
        parts["fragmentation"] = int(FRAGMENTATION * dynamic)
        estimates.append(MemoryEstimate(parts, host=host))
    notes.append(
        "model states exact for plait's allocation: fp32 parameters, fp32 gradients, AdamW fp32 moments "
        "(+ a 4-byte step per tensor); activations counted from autograd's saved tensors"
    )
    if layout.pp > 1:
        notes.append(f"pipeline: the most loaded of {layout.pp} ranks ({layout.pp_schedule}, {m} micro-batches)")
    if layout.cpu_offload:
        notes.append("cpu_offload: sharded parameters, gradients and optimizer state live in host memory "
                     f"(host, per rank); a node keeps {HOST_RESERVED:.0%} of its host memory for the OS and buffers")
    if args.moe_experts > 0:
        notes.append("MoE: balanced routing assumed (each ep rank computes as many token rows as it sends)")
    notes.append(f"fragmentation: a {FRAGMENTATION:.0%} allowance on the dynamic part (assumption)")
    for estimate in estimates:
        estimate.notes = list(notes)
    return estimates


def _model_states(
    layout: Layout, local: int, sharded: int, tensors: int, first: bool, last: bool,
    block: _States, embed: _States, head: _States, args: ModelArgs, autocast: bool, state_bytes: int,
) -> tuple[dict[str, int], dict[str, int]]:
    """(device parts, host parts) of the model states and the compute copies of the weights.
    `state_bytes`: the optimizer's state per parameter element (its `OptimizerSpec`; AdamW's two
    fp32 moments are 8), plus a 4-byte step tensor per parameter tensor."""
    zero = layout.zero_stage
    parts: dict[str, int] = {}
    host: dict[str, int] = {}
    zero1_optimizer = layout.dp > 1 and (zero == 1 or (zero == 0 and layout.tp > 1))
    if zero >= 2:
        params, grads = sharded, sharded  # FSDP2: padded shards; gradients one padded flat per unit
        # zeros_like of rank 0's shard: its unpadded size equals the padded one.
        optim = sharded * state_bytes + tensors * FP32
    elif zero1_optimizer:
        params, grads = local, local  # full gradients exist at the end of backward
        optim = _zero1_optimizer_bytes(args, layout, local, state_bytes)
    else:
        params, grads = local, local
        optim = local * state_bytes + tensors * FP32
    params_b, grads_b = params * FP32, grads * FP32
    if layout.cpu_offload and zero == 3:
        # CPUOffloadPolicy: the sharded fp32 parameters live on the host (copied to the device
        # for each all-gather), the reduce-scattered gradient shards are copied back to the host,
        # and AdamW steps there, so its moments are host tensors too.
        host = {"parameters": params_b, "gradients": grads_b, "optimizer": optim}
        params_b, grads_b, optim = 0, 0, 0
    parts["parameters"], parts["gradients"], parts["optimizer"] = params_b, grads_b, optim
    # Compute copies of the weights during forward and backward (not model states):
    # ZeRO-2 keeps every unit of the rank gathered from its forward to its backward; ZeRO-3
    # the root unit (embedding, norm, head: FSDP2 does not reshard the root after forward) and
    # two blocks (the current one and the prefetched next). In bf16 with FSDP mixed precision,
    # else fp32. Without FSDP mixed precision, bf16 autocast caches a bf16 copy of every weight
    # it casts until the forward ends, and backward keeps them (saved for the matmuls).
    mixed = zero >= 2 and layout.mixed_precision
    gathered_bytes = 2 if mixed else FP32
    layers_local = local - (embed.local if first else 0) - (head.local if last else 0)
    root = (embed.local if first else 0) + (head.local if last else 0)
    if zero == 2:
        gathered = local
    elif zero == 3:
        gathered = root + min(2 * block.local, layers_local)
    else:
        gathered = 0
    parts["gathered_parameters"] = gathered * gathered_bytes
    autocast_copies = 0
    if autocast and not mixed:
        matmul = (block.matmul * (layers_local // block.local if block.local else 0)
                  + (embed.matmul if first else 0) + (head.matmul if last else 0))
        autocast_copies = 2 * matmul
    parts["compute_weights"] = autocast_copies
    return parts, host


def _zero1_optimizer_bytes(args: ModelArgs, layout: Layout, local: int, state_bytes: int) -> int:
    """ZeRO-1 on the most loaded rank: an fp32 copy of its slice of the flat bucket
    (ceil(P / N) elements, the bucket padded to a multiple of N), the state (AdamW's moments) for the part of
    the slice that holds parameters, and one step tensor per parameter group (matrices, then
    vectors, in bucket order) the slice overlaps."""
    shards = layout.dp_shard
    s = -(-local // shards)
    vectors = args.hidden * (2 * args.layers + 1)  # norm weights (no TP split, no PP with ZeRO-1)
    matrices = local - vectors
    worst = 0
    for r in {0, min(matrices // s, shards - 1), shards - 1}:
        lo, hi = r * s, min((r + 1) * s, local)
        held = max(0, hi - lo)
        groups = int(lo < matrices and hi > lo) + int(hi > matrices and held > 0)
        worst = max(worst, s * FP32 + held * state_bytes + groups * FP32)
    return worst


def _moe_buffers(args: ModelArgs, layout: Layout, n: int, act: int) -> int:
    """Expert parallelism: the all-to-all receive buffers of one MoE block (dispatch and
    combine, M rows of D each), alive while the block runs."""
    if args.moe_experts == 0 or layout.ep == 1:
        return 0
    return 2 * _moe_assignments(args, n, max(1, layout.micro_batch_size)) * args.hidden * act


def _comm_buffers(
    layout: Layout, local: int, sharded: int, block: _States, embed: _States, head: _States,
    layers: int, first: bool, last: bool, n: int, d: int, act: int,
) -> int:
    """Buffers of the collectives: DDP's gradient buckets (gradient_as_bucket_view is off, so
    they are a second copy of the gradients), ZeRO-1's flat bucket and the all-gathered bucket of
    its step, FSDP's reduce-scatter input (a unit's unsharded fp32 gradients, padded), pipeline
    send and receive buffers of one micro-batch's hidden states."""
    zero = layout.zero_stage
    total = 0
    if zero == 0 and layout.tp == 1 and layout.dp * layout.cp > 1:
        total += local * FP32
    elif layout.dp > 1 and (zero == 1 or (zero == 0 and layout.tp > 1)):
        s = -(-local // layout.dp_shard)
        total += s * layout.dp_shard * FP32  # the bucket at the reduction, or the gathered one at the step
    elif zero >= 2:
        largest = max(block.local if layers else 0, (embed.local if first else 0) + (head.local if last else 0))
        total += largest * FP32
    if layout.pp > 1:
        total += 2 * n * d * act
    return total


# ---- fitting the cluster --------------------------------------------------------------------


def usable_host_bytes(cluster: Cluster) -> int:
    """A node's host memory the ranks may fill: all of it less the `HOST_RESERVED` share."""
    return int(cluster.host_memory_bytes * (1 - HOST_RESERVED))


def host_bytes_per_node(memory: MemoryEstimate, cluster: Cluster) -> int:
    """Host memory the ranks of one node need: each rank's offloaded states (`memory.host`),
    and, when the device is the host ("cpu"), each rank's whole device total as well. Every
    rank of the node is counted at the most loaded one (`estimate_memory`): an upper bound when
    the node's ranks hold different pipeline stages."""
    per_rank = memory.host_total + (memory.total if cluster.device_is_host else 0)
    return cluster.ranks_per_node * per_rank


def memory_ratios(memory: MemoryEstimate, cluster: Cluster) -> tuple[float, float]:
    """(device bytes / device memory, a node's host bytes / its usable host memory): the layout
    fits when both are at most 1; the larger says how far a layout is from fitting."""
    return (memory.total / cluster.device.memory_bytes,
            host_bytes_per_node(memory, cluster) / max(1, usable_host_bytes(cluster)))


def memory_fits(memory: MemoryEstimate, cluster: Cluster) -> bool:
    """The device total within the device's memory, and the node's host bytes within its usable
    host memory (see `usable_host_bytes`)."""
    return (memory.total <= cluster.device.memory_bytes
            and host_bytes_per_node(memory, cluster) <= usable_host_bytes(cluster))
