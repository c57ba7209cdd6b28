"""The time model: seconds per optimizer step of one layout on one cluster, by part.

Pure Python. Compute comes from the FLOPs of `plait.model.flops` at the device's sustained rate;
each collective from its bytes (the formulas `bench/comm_volume.py` checks against measured
counts) over the link its group crosses, plus a latency per message; then what overlaps with
compute is taken off, and the pipeline bubble is added. docs/planner.md states every equation and
assumption; the numbered assumptions below are the ones it refers to.

Symbols: B micro-batch (sequences), T tokens per sequence on a rank (seq_len / cp), h hidden,
L layers on a pipeline rank, m micro-batches per step per data-parallel rank, e bytes per
activation element (2 in bf16), Psi a rank's parameters (its tp/pp/ep share).
"""

from __future__ import annotations

from plait.hardware.devices import Cluster, Link
from plait.model.flops import count_params, flops_per_token, mlp_params
from plait.layout import Layout, Workload
from plait.planner.types import TimeEstimate

# Host <-> device copies for cpu_offload (PCIe 4.0 x16 sustains about 25 GB/s per direction)
# and the CPU's AdamW update rate for offloaded states (parameters per second, a few cores).
PCIE_BANDWIDTH = 25e9
CPU_ADAM_PARAMS_PER_S = 1.0e9
# Zero-bubble (ZB-H1) leaves a third of 1F1B's bubble: the replayed schedules of bench/RESULTS.md
# ("pipeline bubble, sleep-cost stages") measure 0.083 vs 0.25 (p 2, m 4) and 0.125 vs 0.375 (p 4, m 8).
ZERO_BUBBLE_FRACTION = 1 / 3

# Mesh axes, outermost first (as parallel/mesh.py builds them): tp ranks are neighbours.
AXES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


def axis_span(layout: Layout, axis: str) -> int:
    """Consecutive ranks an axis's group spans: its degree times all inner degrees."""
    degrees = {"pp": layout.pp, "dp_replicate": layout.dp_replicate, "dp_shard": layout.dp_shard,
               "cp": layout.cp, "tp": layout.tp}
    span = 1
    for name in reversed(AXES):
        span *= degrees[name]
        if name == axis:
            return span
    raise ValueError(axis)


def link_for(layout: Layout, cluster: Cluster, axis: str) -> Link:
    """The link a group on `axis` crosses: intra-node iff its span fits in one node."""
    return cluster.intra if axis_span(layout, axis) <= cluster.gpus_per_node else cluster.inter


def ring_time(kind: str, size: float, n: int, link: Link) -> float:
    """One collective of `size` bytes (the full tensor) over `n` ranks, ring algorithm.
    all_reduce: 2(n-1)/n of the bytes in 2(n-1) steps; reduce_scatter, all_gather, all_to_all:
    (n-1)/n in n-1 steps; p2p: the whole tensor in one message."""
    if kind == "p2p":
        return size / link.bandwidth + link.latency
    if n <= 1:
        return 0.0
    steps = 2 * (n - 1) if kind == "all_reduce" else n - 1
    return steps / n * size / link.bandwidth + steps * link.latency


def local_params(workload: Workload, layout: Layout) -> float:
    """Parameters a rank holds before ZeRO sharding: dense weights / (tp pp), experts / (ep pp)."""
    args = workload.model
    total = count_params(args).total
    experts = args.layers * (mlp_params(args) - args.hidden * args.moe_experts) if args.moe_experts else 0
    return (total - experts) / (layout.tp * layout.pp) + experts / (layout.ep * layout.pp)


def elementwise_elements(workload: Workload, layout: Layout) -> float:
    """Elements that memory-bound kernels read and write per step on one rank, forward and
    backward (and the recomputed forward). Per token and layer, forward: two RMSNorms (read and
    write h each) and two residual adds (read 2h, write h each), 10h, which tensor parallelism
    leaves whole on every rank unless sequence parallelism splits them; rotary embedding of q and
    k (read and write (H + K) E) and the MLP's activation (SwiGLU: silu of the gate and the
    product with up, 5f; GELU 2f; MoE: top-k experts' worth), split by tp. Backward moves about
    twice the forward's traffic (the incoming gradient, the saved input, the outgoing gradient)."""
    a = workload.model
    replicated = 10 * a.hidden
    if a.moe_experts:
        mlp = 5 * a.moe_ffn * a.moe_top_k
    else:
        mlp = 5 * a.ffn if a.mlp == "swiglu" else 2 * a.ffn
    split = 2 * (a.heads + a.kv_heads) * a.head_dim + mlp
    per_token_layer = replicated / (layout.tp if layout.sequence_parallel else 1) + split / layout.tp
    passes = 4 if layout.activation_checkpointing else 3
    tokens = workload.global_batch_tokens / (layout.dp * layout.cp)  # a rank's tokens (tp ranks share them)
    return tokens * (a.layers / layout.pp) * per_token_layer * passes


def estimate_time(workload: Workload, layout: Layout, cluster: Cluster) -> TimeEstimate:
    args, device = workload.model, cluster.device
    est = TimeEstimate()
    parts, coll = est.parts, est.collectives
    act_bytes = 2 if workload.dtype == "bf16" else 4
    rate = device.peak_flops.get(workload.dtype, device.peak_flops.get("fp32", 0.0)) * device.matmul_efficiency
    if rate <= 0:
        raise ValueError(f"device {device.name!r} has no peak rate for {workload.dtype}")
    world, m = layout.world, max(1, layout.microbatches(workload))
    tokens = workload.global_batch_tokens
    ac = layout.activation_checkpointing

    def exposed(full: float, window: float, floor: float) -> float:
        """What of a collective taking `full` seconds is left after hiding it behind `window`
        seconds of compute, never less than `floor` (the part that cannot start earlier).
        Where the device does not overlap (a CPU), all of it."""
        return max(full - window, floor) if device.overlaps_comm else full

    # Compute: the step's FLOPs split evenly over the world (tp, cp and pp split a forward's work,
    # dp the batch); recompute is the extra forward of full activation checkpointing.
    base = flops_per_token(args, workload.seq_len) * tokens / world
    parts["compute"] = base / rate
    if ac:
        parts["recompute"] = (flops_per_token(args, workload.seq_len, recompute=True) * tokens / world - base) / rate
    else:
        parts["recompute"] = 0.0
    # Memory-bound kernels, at the device's sustained bandwidth (not overlapped with matmuls).
    parts["memory_bound"] = elementwise_elements(workload, layout) * act_bytes / device.memory_bandwidth
    backward_per_micro = parts["compute"] * 2 / 3 / m  # backward is 4 of the 6 FLOPs per parameter
    layers = args.layers / layout.pp  # on one pipeline rank
    b, t, h = layout.micro_batch_size, workload.seq_len // layout.cp, args.hidden
    activation = b * t * h * act_bytes  # one layer's input on a rank, one micro-batch
    passes = 3 if ac else 2  # forward, backward (+ the recomputed forward)

    # (1) Tensor parallel: 2 all-reduces per layer per forward pass, 2 per backward, plus the
    # vocabulary-parallel embedding and the head's input gradient; SP turns each into a
    # reduce-scatter + all-gather of the same volume. Exposed: they sit between dependent matmuls.
    if layout.tp > 1:
        link = link_for(layout, cluster, "tp")
        calls = (2 * passes * layers + 2) * m
        coll["tp_allreduce" if not layout.sequence_parallel else "tp_reduce_scatter_all_gather"] = (
            calls * ring_time("all_reduce", activation, layout.tp, link))

    # (2) Data parallel gradients and ZeRO. Gradients average over dp x cp ranks; they travel in
    # fp32 (plait reduces in fp32 under mixed precision), parameters are gathered in bf16.
    psi = local_params(workload, layout)
    dense_psi = psi  # experts are sharded over ep and reduced over dp_shard x cp / ep (counted alike)
    grad_bytes = 4.0
    param_bytes = act_bytes if layout.mixed_precision else 4.0
    n_data = layout.dp * layout.cp
    z = layout.zero_stage
    data_axis = "dp_replicate" if layout.dp_replicate > 1 else ("dp_shard" if layout.dp_shard > 1 else "cp")
    data_link = link_for(layout, cluster, data_axis)
    shard_n = layout.dp_shard * layout.cp
    shard_link = link_for(layout, cluster, "dp_shard" if layout.dp_shard > 1 else "cp")
    backward_total = backward_per_micro * m
    exposed_data = 0.0
    if n_data > 1 and z == 0:
        # (2a) DDP: one all-reduce on the last micro-batch (no_sync before); it overlaps that
        # micro-batch's backward except the last bucket (1/L of it).
        full = ring_time("all_reduce", dense_psi * grad_bytes, n_data, data_link)
        coll["dp_allreduce"] = full
        if layout.tp > 1:
            # Under TP plait does not use DDP: Zero1Optimizer with one shard all-reduces the flat
            # gradient bucket inside the optimizer step, after backward (apply.py): all exposed.
            exposed_data = full
        else:
            exposed_data = exposed(full, backward_per_micro, full / max(layers, 1))
        parts["dp_allreduce"] = exposed_data
    elif n_data > 1 and z == 1:
        # (2b) ZeRO-1 (zero1.py): reduce-scatter + all-gather of the flat bucket after the last
        # backward, around the optimizer step: exposed.
        full = (ring_time("reduce_scatter", dense_psi * grad_bytes, n_data, data_link)
                + ring_time("all_gather", dense_psi * 4.0, n_data, data_link))
        coll["zero1_reduce_scatter_all_gather"] = full
        parts["zero1_reduce_scatter_all_gather"] = full
    elif n_data > 1 and z >= 2:
        # (2c) FSDP2 syncs gradients on every micro-batch: m reduce-scatters over the shard axis
        # (and, for HSDP, all-reduces of the shard over the replicas); all-gathers of parameters
        # once per micro-batch forward, ZeRO-3 again in backward. Prefetched all-gathers overlap
        # compute; reduce-scatters overlap backward except the last layer's bucket.
        rs = m * ring_time("reduce_scatter", dense_psi * grad_bytes, shard_n, shard_link)
        if layout.dp_replicate > 1:
            rs += m * ring_time("all_reduce", dense_psi * grad_bytes / shard_n, layout.dp_replicate,
                                link_for(layout, cluster, "dp_replicate"))
        gathers = 2 if z == 3 else 1
        ag = m * gathers * ring_time("all_gather", dense_psi * param_bytes, shard_n, shard_link)
        coll["fsdp_reduce_scatter"] = rs
        coll["fsdp_all_gather"] = ag
        parts["fsdp_reduce_scatter"] = exposed(rs, backward_total, rs / max(m * layers, 1))
        parts["fsdp_all_gather"] = exposed(ag, parts["compute"] + parts["recompute"], ag / max(m * gathers * layers, 1))

    # (3) Offload (ZeRO-3 cpu_offload): per micro-batch the shard's parameters go host->device for
    # forward and backward and its gradients device->host; the AdamW step runs on the CPU. Exposed.
    if layout.cpu_offload:
        shard = dense_psi / max(shard_n, 1)
        copies = m * (2 * shard * param_bytes + shard * grad_bytes) / PCIE_BANDWIDTH
        parts["offload_pcie"] = copies
        parts["offload_cpu_adam"] = shard / CPU_ADAM_PARAMS_PER_S
        coll["offload_pcie"] = copies

    # (4) Context parallel, per layer and pass (f = passes). Ring: cp-1 sends of the k/v shard
    # (2 B K T E e) per pass, plus cp sends of the fp32 gradient accumulator in backward; hidden
    # behind the attention compute of the same layer up to its length. Ulysses: 4 all-to-alls of
    # B T E (2H + 2K) e per pass, exposed (attention waits for them).
    if layout.cp > 1:
        link = link_for(layout, cluster, "cp")
        kv = 2 * b * args.kv_heads * t * args.head_dim
        if layout.cp_method == "ring":
            sends = layers * m * (passes * (layout.cp - 1) * ring_time("p2p", kv * act_bytes, 2, link)
                                  + layout.cp * ring_time("p2p", kv * 4, 2, link))
            attention = 12 * args.layers * h * workload.seq_len * (passes / 2) * tokens / world / rate
            coll["cp_ring_p2p"] = sends
            parts["cp_ring_p2p"] = exposed(sends, attention, 0.0)
        else:
            size = b * t * args.head_dim * (2 * args.heads + 2 * args.kv_heads) * act_bytes
            full = layers * m * passes * ring_time("all_to_all", size, layout.cp, link)
            coll["cp_ulysses_all_to_all"] = full
            parts["cp_ulysses_all_to_all"] = full

    # (5) Expert parallel: per MoE layer 2 all-to-alls forward (dispatch, combine) and 2 backward
    # of the rank's B T k rows of h (uniform routing), plus the recomputed forward's two. Exposed.
    if layout.ep > 1 and args.moe_experts:
        link = cluster.intra if layout.ep * layout.tp <= cluster.gpus_per_node else cluster.inter
        rows = b * t * args.moe_top_k
        calls = layers * m * (2 * passes)
        full = calls * ring_time("all_to_all", rows * h * act_bytes, layout.ep, link)
        coll["ep_all_to_all"] = full
        parts["ep_all_to_all"] = full

    # (6) Host time of the wrappers, where it adds to the step (device.tp_linear_s and
    # fsdp_call_s, measured by --calibrate; 0 in the GPU table). Tensor parallelism: every linear
    # of a block (attention 4, SwiGLU 3, GELU 2) plus the vocabulary-parallel embedding and head,
    # per micro-batch; the recomputed forward adds half again. FSDP2: per micro-batch, each unit
    # (the blocks and the root) issues its all-gathers (ZeRO-3: forward and backward) and one
    # reduce-scatter.
    if layout.tp > 1 and device.tp_linear_s:
        per_block = 4 + (0 if args.moe_experts else (3 if args.mlp == "swiglu" else 2))
        linears = layers * per_block + 2 / layout.pp
        parts["tp_host"] = m * linears * device.tp_linear_s * (1.5 if ac else 1.0)
    if z >= 2 and n_data > 1 and device.fsdp_call_s:
        parts["fsdp_host"] = m * (layers + 1) * ((2 if z == 3 else 1) + 1) * device.fsdp_call_s

    for name in ("tp_allreduce", "tp_reduce_scatter_all_gather"):
        if name in coll:
            parts[name] = coll[name]

    # (7) Pipeline: one send forward and one backward per micro-batch and model chunk at each stage
    # boundary (on the critical path), and the bubble as a fraction of a rank's busy time.
    if layout.pp > 1:
        link = link_for(layout, cluster, "pp")
        size = activation / (layout.tp if layout.sequence_parallel else 1)
        v = layout.pp_virtual_stages
        p2p = 2 * m * v * ring_time("p2p", size, 2, link)
        coll["pp_p2p"] = p2p
        parts["pp_p2p"] = p2p
        busy = sum(parts[k] for k in parts if k in ("compute", "recompute", "memory_bound")
                   or k.startswith(("tp_", "cp_", "ep_")))
        fraction = (layout.pp - 1) / (v * m)
        if layout.pp_schedule == "zero-bubble":
            fraction *= ZERO_BUBBLE_FRACTION
        parts["pipeline_bubble"] = fraction * busy
    return est
