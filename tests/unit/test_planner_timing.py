"""The time model's CPU terms: no overlap on a CPU, memory-bound kernels, the wrappers' host time."""

from __future__ import annotations

import dataclasses

import pytest

from plait.config import Config, set_value
from plait.hardware.profile import cluster_from_flags
from plait.planner import workload_from_config
from plait.planner.timing import elementwise_elements, estimate_time
from plait.layout import Layout


def _workload(name: str = "tiny", seq: int = 256, sequences: int = 32, dtype: str = "fp32"):
    cfg = Config()
    set_value(cfg, "model.name", name)
    return workload_from_config(cfg, seq, sequences, dtype)


def test_a_cpu_hides_no_collective_behind_compute():
    work = _workload("1b", 2048, 64, "bf16")
    layout = Layout(dp_shard=8, zero_stage=3, micro_batch_size=2, mixed_precision=True)
    gpu = cluster_from_flags(8, None, "h100")
    cpu_like = dataclasses.replace(gpu, device=dataclasses.replace(gpu.device, overlaps_comm=False))
    hidden, whole = estimate_time(work, layout, gpu), estimate_time(work, layout, cpu_like)
    for name in ("fsdp_reduce_scatter", "fsdp_all_gather"):
        assert hidden.parts[name] < hidden.collectives[name]  # NCCL beside compute: mostly hidden
        assert whole.parts[name] == whole.collectives[name]  # on the compute cores: all of it


def test_memory_bound_kernels_follow_the_element_count():
    work = _workload()  # tiny: hidden 256, 4 heads x 64, 2 KV heads, SwiGLU 768; 8,192 tokens
    a = work.model
    forward = 10 * a.hidden + 2 * (a.heads + a.kv_heads) * a.head_dim + 5 * a.ffn  # per token and layer
    ddp = Layout(dp_replicate=2)
    assert elementwise_elements(work, ddp) == 8192 / 2 * a.layers * forward * 3
    cluster = cluster_from_flags(2, 2, "cpu")
    assert estimate_time(work, ddp, cluster).parts["memory_bound"] == pytest.approx(
        8192 / 2 * a.layers * forward * 3 * 4 / cluster.device.memory_bandwidth)
    # TP leaves the norms and residual adds whole on each rank; SP splits them too.
    tp, sp = Layout(tp=2), Layout(tp=2, sequence_parallel=True)
    split = forward - 10 * a.hidden
    assert elementwise_elements(work, tp) == 8192 * a.layers * (10 * a.hidden + split / 2) * 3
    assert elementwise_elements(work, sp) == 8192 * a.layers * forward / 2 * 3
    assert elementwise_elements(work, Layout(dp_replicate=2, activation_checkpointing=True)) == \
        elementwise_elements(work, ddp) * 4 / 3  # the recomputed forward


def test_host_time_of_the_wrappers_counts_calls_per_micro_batch():
    work = _workload()  # 4 layers, 32 sequences
    base = cluster_from_flags(2, 2, "cpu")
    cpu = dataclasses.replace(base, device=dataclasses.replace(base.device, tp_linear_s=1e-3, fsdp_call_s=2e-4))
    # TP 2 at micro-batch 4: 8 micro-batches x (4 layers x 7 linears + embedding and head).
    assert estimate_time(work, Layout(tp=2, micro_batch_size=4), cpu).parts["tp_host"] == pytest.approx(8 * 30 * 1e-3)
    with_ac = estimate_time(work, Layout(tp=2, micro_batch_size=4, activation_checkpointing=True), cpu)
    assert with_ac.parts["tp_host"] == pytest.approx(8 * 30 * 1e-3 * 1.5)
    # ZeRO-3 x2 at micro-batch 1: 16 micro-batches x 5 units (4 blocks + root) x 3 calls.
    z3 = estimate_time(work, Layout(dp_shard=2, zero_stage=3, micro_batch_size=1), cpu)
    assert z3.parts["fsdp_host"] == pytest.approx(16 * 5 * 3 * 2e-4)
    z2 = estimate_time(work, Layout(dp_shard=2, zero_stage=2, micro_batch_size=1), cpu)
    assert z2.parts["fsdp_host"] == pytest.approx(16 * 5 * 2 * 2e-4)
    # The GPU table prices none (the host runs ahead of the device).
    gpu = cluster_from_flags(2, 2, "h100")
    gpu_time = estimate_time(_workload(dtype="bf16"), Layout(tp=2, micro_batch_size=4), gpu)
    assert "tp_host" not in gpu_time.parts
