"""The memory model's formulas (plait.planner.memory), without running a model.

Exact agreement with measured bytes is tests/dist/test_planner_memory.py; here: the ZeRO
identities of PAPERS.md in plait's bookkeeping (fp32 parameters and gradients, fp32 Adam moments:
16 Psi bytes per parameter unsharded), monotonicity in the degrees, and orders of magnitude of
real models."""

from __future__ import annotations

import pytest

from plait.model import NAMED_SIZES, count_params
from plait.planner.memory import estimate_memory, estimate_memory_by_stage
from plait.layout import Layout, Workload

GIB = 2**30


def _states(workload: Workload, layout: Layout) -> int:
    parts = estimate_memory(workload, layout).parts
    return parts["parameters"] + parts["gradients"] + parts["optimizer"]


def test_unsharded_model_states_are_16_bytes_per_parameter() -> None:
    args = NAMED_SIZES["8b"]
    psi = count_params(args).total
    states = _states(Workload(args, 4096, 64), Layout())
    tensors = 2 + args.layers * 9 + 1  # embedding, 9 per block, final norm, head: 4-byte steps
    assert states == 16 * psi + 4 * tensors


@pytest.mark.parametrize("n", [2, 8, 64])
def test_zero_formulas_in_plaits_precision(n: int) -> None:
    """fp32 parameters 4 Psi, gradients 4 Psi, AdamW 8 Psi: ZeRO-3 holds 16 Psi / N (the paper's
    figure), ZeRO-2 keeps the same states (FSDP2 reshards after backward either way), ZeRO-1
    8 Psi + 12 Psi / N (its optimizer also holds an fp32 copy of its slice, 4 Psi / N)."""
    args = NAMED_SIZES["8b"]
    psi = count_params(args).total
    w = Workload(args, 4096, 1024)
    z3 = _states(w, Layout(dp_shard=n, zero_stage=3, mixed_precision=True))
    z2 = _states(w, Layout(dp_shard=n, zero_stage=2, mixed_precision=True))
    z1 = _states(w, Layout(dp_shard=n, zero_stage=1))
    # Padding and the 4-byte step tensors are the only differences from the formulas.
    assert z3 == pytest.approx(16 * psi / n, rel=1e-3)
    assert z2 == z3
    assert z1 == pytest.approx(8 * psi + 12 * psi / n, rel=1e-3)
    # ZeRO-2 keeps the whole (bf16) model gathered through the step; ZeRO-3 only a few units.
    gathered2 = estimate_memory(w, Layout(dp_shard=n, zero_stage=2, mixed_precision=True)).parts["gathered_parameters"]
    gathered3 = estimate_memory(w, Layout(dp_shard=n, zero_stage=3, mixed_precision=True)).parts["gathered_parameters"]
    assert gathered2 == 2 * psi
    assert gathered3 < gathered2 / 4


def test_fsdp_pads_dim0_to_the_shard_degree() -> None:
    args = NAMED_SIZES["debug"].replace(vocab=257)
    w = Workload(args, 32, 4, dtype="fp32")
    parts = estimate_memory(w, Layout(dp_shard=2, zero_stage=3, mixed_precision=False)).parts
    padded_embedding = 129 * 64  # ceil(257 / 2) rows
    unpadded = estimate_memory(Workload(args.replace(vocab=256), 32, 4, dtype="fp32"),
                               Layout(dp_shard=2, zero_stage=3, mixed_precision=False)).parts
    assert parts["parameters"] - unpadded["parameters"] == 2 * (padded_embedding - 128 * 64) * 4


@pytest.mark.parametrize("knob", ["dp_shard", "tp", "pp", "cp"])
def test_memory_falls_as_a_degree_grows(knob: str) -> None:
    args = NAMED_SIZES["70b"]
    w = Workload(args, 8192, 512)
    base = {"dp_shard": 8, "zero_stage": 3} if knob != "dp_shard" else {"zero_stage": 3}
    base["mixed_precision"] = True  # as plait trains sharded bf16 layouts
    totals = []
    for degree in (1, 2, 4, 8):
        if knob == "dp_shard" and degree == 1:
            layout = Layout()
        else:
            layout = Layout(**{**base, knob: degree})
        totals.append(estimate_memory(w, layout).total)
    assert totals == sorted(totals, reverse=True) and totals[0] > totals[-1], totals


def test_70b_needs_sharding_on_80gb() -> None:
    w = Workload(NAMED_SIZES["70b"], 8192, 512)
    eighty = 80 * 10**9
    psi = count_params(NAMED_SIZES["70b"]).total
    assert estimate_memory(w, Layout(activation_checkpointing=True)).total > 8 * eighty  # states alone ~1.1 TB
    # 16 Psi / 8 = 141 GB: one node's worth of ZeRO-3 does not hold 70B with AdamW...
    node = estimate_memory(w, Layout(dp_shard=8, zero_stage=3, mixed_precision=True, activation_checkpointing=True))
    assert sum(node.parts[k] for k in ("parameters", "gradients", "optimizer")) == pytest.approx(16 * psi / 8, rel=1e-3)
    assert node.total > eighty
    # ...eight nodes do, with TP 8 and sequence parallelism for the activations.
    nodes = estimate_memory(w, Layout(dp_shard=8, tp=8, zero_stage=3, mixed_precision=True, sequence_parallel=True, activation_checkpointing=True))
    assert nodes.total < eighty, nodes.parts


def test_checkpointing_and_sequence_parallel_cut_activations() -> None:
    w = Workload(NAMED_SIZES["8b"], 8192, 64)
    plain = estimate_memory(w, Layout(tp=4)).parts["activations"]
    sp = estimate_memory(w, Layout(tp=4, sequence_parallel=True)).parts["activations"]
    ac = estimate_memory(w, Layout(tp=4, activation_checkpointing=True)).parts["activations"]
    assert ac < sp < plain
    # bf16 autocast activations per block: roughly Korthikanti's 34 s b h (+ the SwiGLU width).
    args = NAMED_SIZES["8b"]
    one_layer = (estimate_memory(w, Layout()).parts["activations"]
                 - estimate_memory(w.__class__(args.replace(layers=args.layers - 1), 8192, 64), Layout()).parts["activations"])
    n, d, f = 8192, args.hidden, args.ffn
    # 26 N D (norms) + 2 N (q + out) + 2 * 2 N (k, v repeated) ... = 34 N D + 8 N F at h e = D
    assert one_layer == pytest.approx(34 * n * d + 8 * n * f, rel=0.01)


def test_pipeline_schedules_order_inflight_activations() -> None:
    args = NAMED_SIZES["70b"]
    w = Workload(args, 4096, 64)
    common = {"pp": 8, "dp_shard": 1, "tp": 8}
    gpipe = estimate_memory(w, Layout(pp_schedule="gpipe", **common)).parts["pipeline_inflight"]
    one_f = estimate_memory(w, Layout(pp_schedule="1f1b", **common)).parts["pipeline_inflight"]
    assert gpipe > one_f > 0
    stages = estimate_memory_by_stage(w, Layout(pp_schedule="1f1b", **common))
    assert len(stages) == 8
    # 1F1B: the first rank keeps p micro-batches in flight, the last one.
    assert stages[0].parts["pipeline_inflight"] > stages[-1].parts["pipeline_inflight"]


def test_expert_parallel_divides_expert_states() -> None:
    args = NAMED_SIZES["mixtral-8x7b"]
    w = Workload(args, 4096, 256)
    one = _states(w, Layout(dp_shard=8, zero_stage=3, mixed_precision=True))
    ep = _states(w, Layout(dp_shard=8, zero_stage=3, mixed_precision=True, ep=8))
    # With FSDP over 8 ranks the expert states are already 1/8: ep moves them, same bytes.
    assert ep == pytest.approx(one, rel=1e-3)
    moe = estimate_memory(w, Layout(dp_shard=8, zero_stage=3, mixed_precision=True, ep=8)).parts
    assert moe["moe_buffers"] > 0


def test_fast_enough_for_search() -> None:
    """405B with a deep pipeline: the stage split is computed once per shape (cached)."""
    w = Workload(NAMED_SIZES["405b"], 8192, 2048)
    for mb in (1, 2, 4):
        e = estimate_memory(w, Layout(tp=8, pp=16, dp_shard=8, zero_stage=3, mixed_precision=True, micro_batch_size=mb))
        assert e.total > 0 and e.notes


def test_cpu_offload_moves_the_states_to_the_host() -> None:
    """CPU offload keeps ZeRO-3's sharded states (the same bytes) in host memory: reported in
    `host`, left out of the device total; everything else on the device is unchanged."""
    w = Workload(NAMED_SIZES["70b"], 4096, 64)
    z3 = estimate_memory(w, Layout(dp_shard=8, zero_stage=3, mixed_precision=True, activation_checkpointing=True))
    off = estimate_memory(w, Layout(dp_shard=8, zero_stage=3, mixed_precision=True, activation_checkpointing=True,
                                    cpu_offload=True))
    states = ("parameters", "gradients", "optimizer")
    assert off.host == {k: z3.parts[k] for k in states} and z3.host == {}
    assert all(off.parts[k] == 0 for k in states)
    assert off.total == z3.total - sum(z3.parts[k] for k in states)
    assert off.host_total == pytest.approx(16 * count_params(NAMED_SIZES["70b"]).total / 8, rel=1e-3)
    # With a pipeline the host bytes are those of the stage holding the most.
    stages = estimate_memory_by_stage(w, Layout(pp=4, dp_shard=2, zero_stage=3, mixed_precision=True, cpu_offload=True))
    piped = estimate_memory(w, Layout(pp=4, dp_shard=2, zero_stage=3, mixed_precision=True, cpu_offload=True))
    assert piped.host_total == max(s.host_total for s in stages) and piped.total == max(s.total for s in stages)
