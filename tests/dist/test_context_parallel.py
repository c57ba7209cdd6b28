"""Ring and Ulysses attention on gloo ranks against single-process causal attention.

One spawn of four CPU workers runs every case: each rank draws the same whole-sequence q/k/v,
computes the reference (scaled_dot_product_attention with the key/value heads repeated), then runs
the context-parallel attention on its own tokens only. The loss is sum(out * w) over all tokens,
so the sum of the ranks' local losses is the reference loss and the gradients of a rank's q/k/v
shard must equal the reference gradients at the positions it holds. Rank 0 writes the largest
differences to a JSON file; one test per case compares them. The 2-rank cases run on the cp
axis of a 2 x 2 mesh, the 4-rank ones on all four ranks.

The model cases run the whole `debug` model (init std 0.2, so attention is far from uniform and
a token at a wrong rotary position changes the logits) with each rank's shard of the tokens and
their global positions: logits must equal the reference's at those positions, and the gradients,
summed over the cp ranks and divided by the degree (what DDP/FSDP do over dp x cp), must equal
the gradients of the reference's mean loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from .spawn import run_cases, run_on_ranks
from plait.layout.rules import context_parallel_problem
from plait.parallel.context_parallel import shard_positions

WORLD = 4
# name -> (cp degree, method, heads, kv heads, sequence length, dtype, CPU kernel)
CASES: dict[str, tuple[int, str, int, int, int, str, bool]] = {
    "ring-cp2-gqa": (2, "ring", 4, 2, 32, "float64", True),
    "ring-cp4-gqa": (4, "ring", 4, 2, 64, "float64", True),
    "ring-cp4-mha-fp32": (4, "ring", 4, 4, 64, "float32", True),
    "ring-cp4-gqa-math": (4, "ring", 8, 2, 64, "float64", False),
    "ulysses-cp2-gqa": (2, "ulysses", 4, 2, 32, "float64", True),
    "ulysses-cp4-gqa": (4, "ulysses", 8, 4, 64, "float64", True),
}
TOLERANCE = {"float64": 1e-10, "float32": 2e-5}
# name -> (cp degree, method)
MODEL_CASES = {"model-ring-cp2": (2, "ring"), "model-ring-cp4": (4, "ring"), "model-ulysses-cp2": (2, "ulysses")}


def _run_case(cp: int, method: str, heads: int, kv_heads: int, seq: int, dtype: str, cpu_kernel: bool, mesh) -> dict:
    from plait.parallel.context_parallel import RingAttention, UlyssesAttention, context_sharding

    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(7)
    b, e = 2, 8
    q = torch.randn(b, heads, seq, e, generator=gen, dtype=torch_dtype)
    k = torch.randn(b, kv_heads, seq, e, generator=gen, dtype=torch_dtype)
    v = torch.randn(b, kv_heads, seq, e, generator=gen, dtype=torch_dtype)
    w = torch.randn(b, heads, seq, e, generator=gen, dtype=torch_dtype)

    ref = [x.clone().requires_grad_() for x in (q, k, v)]
    groups = heads // kv_heads
    out_ref = torch.nn.functional.scaled_dot_product_attention(
        ref[0], ref[1].repeat_interleave(groups, 1), ref[2].repeat_interleave(groups, 1), is_causal=True
    )
    (out_ref * w).sum().backward()

    sharding = context_sharding(mesh, method)
    attention = RingAttention(sharding, cpu_kernel) if method == "ring" else UlyssesAttention(sharding)
    pos = shard_positions(seq, sharding.rank, cp, method)
    local = [x[:, :, pos].clone().requires_grad_() for x in (q, k, v)]
    out = attention(*local)
    (out * w[:, :, pos]).sum().backward()
    diffs = {"out": (out - out_ref[:, :, pos]).abs().max().item()}
    for name, mine, theirs in zip("qkv", local, ref):
        diffs[f"d{name}"] = (mine.grad - theirs.grad[:, :, pos]).abs().max().item()
    # The worst rank decides.
    worst = torch.tensor(list(diffs.values()), dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return dict(zip(diffs, worst.tolist()))


def _run_model_case(cp: int, method: str, mesh) -> dict:
    from plait.model import NAMED_SIZES, build_model, materialize
    from plait.parallel.context_parallel import apply_context_parallel, context_sharding

    args = NAMED_SIZES["debug"].replace(vocab=256, init_std=0.2)
    reference = materialize(build_model(args), "cpu", seed=0)
    model = materialize(build_model(args), "cpu", seed=0)
    apply_context_parallel(model, mesh, method)
    tokens = torch.randint(0, args.vocab, (2, 33), generator=torch.Generator().manual_seed(3))
    inputs_BN, targets_BN = tokens[:, :-1], tokens[:, 1:]

    logits_ref = reference(inputs_BN)
    torch.nn.functional.cross_entropy(logits_ref.flatten(0, 1), targets_BN.flatten()).backward()
    inputs_BT, targets_BT, positions_T = context_sharding(mesh, method).split(inputs_BN, targets_BN)
    logits = model(inputs_BT, positions_T)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets_BT.flatten()).backward()
    diffs = {"logits": (logits - logits_ref[:, positions_T]).abs().max().item()}
    ref_params = dict(reference.named_parameters())
    grad = 0.0
    for name, param in model.named_parameters():
        summed = param.grad.clone()
        dist.all_reduce(summed, group=mesh.get_group())
        grad = max(grad, (summed / cp - ref_params[name].grad).abs().max().item())
    diffs["grads"] = grad
    worst = torch.tensor(list(diffs.values()), dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return dict(zip(diffs, worst.tolist()))


def _ranks(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    pair = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))["cp"]
    whole = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("cp",))
    cases = {name: (lambda c=case: _run_case(*c, mesh=pair if c[0] == 2 else whole)) for name, case in CASES.items()}
    cases.update({name: (lambda c=case: _run_model_case(c[0], c[1], pair if c[0] == 2 else whole))
                  for name, case in MODEL_CASES.items()})
    return run_cases(rank, cases)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_on_ranks(_ranks, WORLD, tmp_path_factory.mktemp("cp"))


@pytest.mark.parametrize("case", list(CASES))
def test_attention_matches_single_process(results: dict, case: str) -> None:
    r = results[case]
    if "error" in r:
        pytest.fail(r["error"], pytrace=False)
    bound = TOLERANCE[CASES[case][5]]
    assert set(r) == {"out", "dq", "dk", "dv"}
    bad = {key: diff for key, diff in r.items() if not diff <= bound}
    assert not bad, f"differs from single-process attention by more than {bound}: {bad}"


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_model_matches_single_process(results: dict, case: str) -> None:
    r = results[case]
    if "error" in r:
        pytest.fail(r["error"], pytrace=False)
    assert r["logits"] <= 1e-5, f"logits differ by {r['logits']}"
    assert r["grads"] <= 1e-5, f"gradients differ by {r['grads']}"


def test_ring_positions_balance_causal_work() -> None:
    assert shard_positions(8, 0, 2, "ring").tolist() == [0, 1, 6, 7]
    assert shard_positions(8, 1, 2, "ring").tolist() == [2, 3, 4, 5]
    assert shard_positions(8, 1, 2, "ulysses").tolist() == [4, 5, 6, 7]
    every = torch.cat([shard_positions(64, r, 4, "ring") for r in range(4)]).sort().values
    assert every.tolist() == list(range(64))
    # Each rank's causal work (keys seen by its queries) is the same.
    work = {int((shard_positions(64, r, 4, "ring") + 1).sum()) for r in range(4)}
    assert len(work) == 1


def test_problems_name_fields_and_fixes() -> None:
    def text(kv_heads: int, cp: int, method: str, seq_len: int) -> str:
        found = context_parallel_problem(seq_len, kv_heads, cp, method)
        return found.message if found is not None else ""

    assert text(2, 2, "ring", 64) == ""
    assert text(2, 1, "ulysses", 63) == ""
    said = text(2, 4, "ring", 60)
    assert "train.seq_len = 60 is not divisible by 2 x parallel.cp_degree = 8" in said and "train.seq_len = 56" in said
    said = text(2, 4, "ulysses", 64)
    assert "model.kv_heads = 2 is not divisible by parallel.cp_degree = 4" in said
    assert "parallel.cp_degree in [1, 2]" in said and 'parallel.cp_method = "ring"' in said
    said = text(4, 4, "ulysses", 66)
    assert "train.seq_len = 66 is not divisible by parallel.cp_degree = 4" in said and "kv_heads" not in said


def _resume_from_step_10(run_dir: Path, nproc: int, overrides: list[str]) -> list[float]:
    """Drop the final checkpoint of a finished 20-step run and train steps 11-20 again from step 10
    under another layout; return those losses."""
    import shutil

    from .layouts import BASE, plait_cli, train_losses

    shutil.rmtree(run_dir / "checkpoints" / "step_20")
    (run_dir / "checkpoints" / "latest").write_text("step_10\n")
    (run_dir / "metrics.jsonl").unlink()
    launch = ["--nproc-per-node", str(nproc)] if nproc > 1 else []
    out = plait_cli("train", *launch, *BASE, f"--run.dir={run_dir}", *overrides)
    assert out.returncode == 0, out.stderr[-3000:]
    return train_losses(run_dir)


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["kind"] == kind]


def test_checkpoints_evaluation_and_sample_across_layouts(tmp_path) -> None:
    """Checkpoints stay layout-free: a cp2 (ring) checkpoint resumes in one process, and a
    single-process checkpoint resumes under cp2 (Ulysses), each on the curve of the run that wrote
    it. Evaluation through the context-parallel path gives the single process's validation loss,
    and the end-of-run sample (from gathered weights) is written."""
    from .layouts import STEPS, assert_parity, run_layout

    extra = ["--checkpoint.every=10", "--train.eval_every=10", "--train.sample_tokens=20"]
    cp_losses = run_layout(tmp_path / "cp", 2, ["--parallel.cp_degree=2", *extra])
    single_losses = run_layout(tmp_path / "single", 1, extra)
    cp_val = [r["val_loss"] for r in _records(tmp_path / "cp", "val")]
    single_val = [r["val_loss"] for r in _records(tmp_path / "single", "val")]
    assert len(cp_val) == len(single_val) == 2
    assert_parity(single_val, cp_val, first_rel=1e-4)
    samples = _records(tmp_path / "cp", "sample")
    assert len(samples) == 1 and len(samples[0]["text"]) > len(samples[0]["prompt"])

    resumed = _resume_from_step_10(tmp_path / "cp", 1, [])
    assert len(resumed) == STEPS - 10
    assert_parity(cp_losses[10:], resumed, first_rel=1e-4)
    resumed = _resume_from_step_10(tmp_path / "single", 2, ["--parallel.cp_degree=2", "--parallel.cp_method=ulysses"])
    assert len(resumed) == STEPS - 10
    assert_parity(single_losses[10:], resumed, first_rel=1e-4)
