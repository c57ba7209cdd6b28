"""The collective byte counter against the formulas (ZeRO, tensor, expert and Ulysses context
parallelism; bench/comm_volume.py states them), on real gloo jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import plait

BENCH = Path(__file__).resolve().parents[2] / "bench" / "comm_volume.py"


def counted(nproc: int, overrides: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(plait.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(BENCH), "--worker", *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize(
    "overrides, factor, units",
    # ZeRO-1: one reduce-scatter of the gradient bucket + one all-gather of the updated slices
    [(["--parallel.dp_shard_degree=2", "--parallel.zero_stage=1"], 2.0, 1),
     (["--parallel.dp_shard_degree=2", "--parallel.zero_stage=2"], 2.0, 3),  # reduce-scatter + all-gather
     (["--parallel.dp_shard_degree=2", "--parallel.zero_stage=3"], 3.0, 3)],  # + all-gather again in backward
)
def test_zero_bytes_match_formula(overrides, factor, units):
    r = counted(2, overrides)
    expected = factor * (2 - 1) / 2 * 4 * r["params"]
    assert r["wire_bytes"] == pytest.approx(expected, rel=1e-9)
    assert r["by_kind"]["reduce_scatter"]["calls"] == units  # FSDP: one per unit (2 blocks + root); ZeRO-1: one bucket


def test_ddp_bytes_match_one_gradient_all_reduce():
    r = counted(2, ["--parallel.dp_replicate_degree=2"])
    assert r["by_kind"]["all_reduce"]["payload_bytes"] == 4 * r["params"]
    assert r["by_kind"]["all_reduce"]["wire_bytes"] == pytest.approx(2 * (2 - 1) / 2 * 4 * r["params"])


@pytest.mark.parametrize("sp", [False, True])
def test_tensor_parallel_bytes_match_megatron(sp):
    """2 all-reduces per layer forward and 2 backward (SP: equal-volume reduce-scatter/all-gather
    pairs), plus the vocabulary-parallel embedding forward and the output head's input gradient."""
    overrides = ["--parallel.tp_degree=2"] + (["--parallel.sequence_parallel=true"] if sp else [])
    r = counted(2, overrides)
    activations = 8 * 64 * r["hidden"] * 4  # the bench's 8 sequences of 64 tokens, fp32
    expected = (4 * r["layers"] + 2) * 2 * (2 - 1) / 2 * activations
    # SP adds the small all-reduces of the norm weights' gradients (hidden floats each).
    assert r["wire_bytes"] == pytest.approx(expected, rel=2e-3 if sp else 1e-9)


def test_expert_parallel_all_to_all_bytes_match_routing():
    """EP 2 over 2 ranks: the token all-to-alls move 2 (S + R) rows of hidden floats per MoE
    layer (S assignments sent to the other rank's experts, R received from it), plus the counts."""
    from importlib import util

    spec = util.spec_from_file_location("expert_parallel_bench", BENCH.parent / "expert_parallel.py")
    bench = util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    env = {**os.environ, "PYTHONPATH": str(Path(plait.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(BENCH.parent / "expert_parallel.py"), "--worker", *bench.LAYOUTS["ep2, fsdp x2"][1]]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    uniform, routed, counts = bench.formulas(r)
    a2a = r["by_kind"]["all_to_all"]
    assert a2a["calls"] == 5 * r["layers"]  # counts + dispatch + combine, and their two reverses
    assert a2a["wire_bytes"] == routed
    assert sum(r["sent_assignments"]) > 0 and sum(r["received_assignments"]) > 0
    # Routing is uneven but not wildly so for this model: the planning formula is close.
    assert a2a["wire_bytes"] == pytest.approx(uniform, rel=0.2)


def test_ulysses_all_to_all_bytes_match_formula():
    """Ulysses cp 2: per layer, forward all-to-alls of q (H heads), k, v (K heads) and the output
    (H), each sending (cp-1)/cp of its local bytes, and their inverses in backward; the gradients
    are then averaged over the cp ranks by DDP like a data-parallel all-reduce."""
    r = counted(2, ["--parallel.cp_degree=2", "--parallel.cp_method=ulysses"])
    assert r["kv_heads"] < r["heads"]  # grouped-query attention: k and v are smaller than q
    tokens = 64 // 2  # the bench's sequences of 64 tokens, half on each rank
    per_pass = r["layers"] * (2 - 1) / 2 * 8 * tokens * r["head_dim"] * (2 * r["heads"] + 2 * r["kv_heads"]) * 4
    a2a = r["by_kind"]["all_to_all"]
    assert a2a["calls"] == 2 * 4 * r["layers"]
    assert a2a["wire_bytes"] == 2 * per_pass
    assert r["by_kind"]["all_reduce"]["payload_bytes"] == 4 * r["params"]
