"""The parity matrix: each layout's loss curve equals the single-process curve (gloo, CPU).

fp32 bounds: step 1 within 1e-6 relative, every later step within 1e-4 relative. The only
difference a layout may make is the order of floating-point sums (gradient averaging across
ranks instead of accumulation on one), which moves the loss by ~1e-7 per step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import plait

from .layouts import BASE, STEPS, assert_parity, plait_cli, run_layout, train_losses


@pytest.fixture(scope="module")
def reference_with(tmp_path_factory):
    """Single-process curves of the debug model with extra overrides (e.g. more layers), each
    run once per module: `reference_with(("--model.layers=4",))`."""
    curves: dict[tuple[str, ...], list[float]] = {}

    def get(overrides: tuple[str, ...]) -> list[float]:
        if overrides not in curves:
            curves[overrides] = run_layout(tmp_path_factory.mktemp("single-variant"), 1, list(overrides))
        return curves[overrides]

    return get


# Layouts whose model differs from the default debug model: compared with a single process of the
# same model (the overrides that start with --model.).
LAYOUTS = {
    "ddp2": (2, ["--parallel.dp_replicate_degree=2"]),
    "ddp2-activation-checkpointing": (2, ["--parallel.dp_replicate_degree=2", "--train.activation_checkpointing=true"]),
    "ddp2-accumulate4": (2, ["--parallel.dp_replicate_degree=2", "--train.micro_batch_size=4"]),
    "zero1-x2-accumulate4": (2, ["--parallel.dp_shard_degree=2", "--parallel.zero_stage=1", "--train.micro_batch_size=4"]),
    "zero2-x2": (2, ["--parallel.dp_shard_degree=2", "--parallel.zero_stage=2"]),
    # zero3-x4, pp2-tp2 and zero1-x2-tp2: in test_reshard.py, where their checkpoints are resumed
    # under other layouts.
    "zero3-x2-accumulate4-offload": (2, ["--parallel.dp_shard_degree=2", "--parallel.zero_stage=3",
                                         "--train.micro_batch_size=4", "--parallel.cpu_offload=true"]),
    "hsdp-2x2": (4, ["--parallel.dp_replicate_degree=2", "--parallel.dp_shard_degree=2", "--parallel.zero_stage=3"]),
    "tp2": (2, ["--parallel.tp_degree=2"]),
    "tp2-sp": (2, ["--parallel.tp_degree=2", "--parallel.sequence_parallel=true"]),
    "ddp2-tp2": (4, ["--parallel.dp_replicate_degree=2", "--parallel.tp_degree=2"]),
    # No zero_stage: the default (-1, auto) is FSDP over a shard axis.
    "fsdp2-tp2-activation-checkpointing": (4, ["--parallel.dp_shard_degree=2", "--parallel.tp_degree=2",
                                               "--train.activation_checkpointing=true"]),
    "zero3-x2-compile": (2, ["--parallel.dp_shard_degree=2", "--parallel.zero_stage=3", "--train.compile=true"]),
    "cp2-ulysses": (2, ["--parallel.cp_degree=2", "--parallel.cp_method=ulysses"]),
    "cp2-ring-activation-checkpointing": (2, ["--parallel.cp_degree=2", "--train.activation_checkpointing=true"]),
    "cp2-ring-compile": (2, ["--parallel.cp_degree=2", "--train.compile=true"]),
    "cp2-ddp2": (4, ["--parallel.cp_degree=2", "--parallel.dp_replicate_degree=2"]),
    "cp2-fsdp2": (4, ["--parallel.cp_degree=2", "--parallel.dp_shard_degree=2", "--parallel.zero_stage=3"]),
    "pp2-gpipe": (2, ["--parallel.pp_degree=2", "--parallel.pp_schedule=gpipe"]),
    "pp2-1f1b": (2, ["--parallel.pp_degree=2", "--parallel.pp_schedule=1f1b"]),
    "pp2-interleaved-1f1b": (2, ["--parallel.pp_degree=2", "--parallel.pp_schedule=interleaved-1f1b",
                                 "--parallel.pp_virtual_stages=2", "--model.layers=4"]),
    "pp2-zero-bubble": (2, ["--parallel.pp_degree=2", "--parallel.pp_schedule=zero-bubble"]),
    "pp2-fsdp2": (4, ["--parallel.pp_degree=2", "--parallel.dp_shard_degree=2", "--parallel.zero_stage=3",
                      "--parallel.pp_microbatches=2"]),
    "fsdp2-pp2-tp2": (8, ["--parallel.pp_degree=2", "--parallel.dp_shard_degree=2", "--parallel.zero_stage=3",
                          "--parallel.tp_degree=2", "--parallel.pp_microbatches=2"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, reference, reference_with, tmp_path):
    nproc, overrides = LAYOUTS[name]
    model_overrides = tuple(x for x in overrides if x.startswith("--model."))
    losses = run_layout(tmp_path / name, nproc, overrides)
    assert_parity(reference_with(model_overrides) if model_overrides else reference, losses)
    assert losses[-1] < losses[0] - 0.5  # and it trains


# Mixture of experts: the reference is the single-process `debug-moe` model. One micro-batch per
# rank and step (micro_batch_size 32 >= every rank's share): the balance loss's token fractions
# are summed over the data-parallel ranks per micro-batch, so with one micro-batch they cover the
# whole step in every layout, as in the single process (see docs/expert_parallel.md).
MOE = ["--model.name=debug-moe", "--train.micro_batch_size=32"]
EP2 = ["--parallel.dp_shard_degree=2", "--parallel.zero_stage=3", "--parallel.ep_degree=2"]
MOE_LAYOUTS = {
    "moe-ddp2": (2, ["--parallel.dp_replicate_degree=2"]),
    "ep2": (2, EP2),
    "ep2-fsdp2": (4, ["--parallel.dp_shard_degree=4", "--parallel.zero_stage=3", "--parallel.ep_degree=2"]),
    # Replicas too: expert gradients are summed over dp_replicate and divided by the whole dp degree.
    "hsdp2x2-ep2": (4, ["--parallel.dp_replicate_degree=2", "--parallel.dp_shard_degree=2", "--parallel.zero_stage=3",
                        "--parallel.ep_degree=2"]),
}


@pytest.fixture(scope="module")
def moe_reference(tmp_path_factory) -> tuple[Path, list[float]]:
    """The single-process MoE run (checkpoints at steps 10 and 20, for the resume tests)."""
    run_dir = tmp_path_factory.mktemp("single-moe")
    return run_dir, run_layout(run_dir, 1, [*MOE, "--checkpoint.every=10"])


@pytest.fixture(scope="module")
def ep2_run(tmp_path_factory) -> tuple[Path, list[float]]:
    run_dir = tmp_path_factory.mktemp("ep2")
    return run_dir, run_layout(run_dir, 2, [*MOE, *EP2, "--checkpoint.every=10"])


@pytest.mark.parametrize("name", list(MOE_LAYOUTS))
def test_moe_layout_matches_single_process(name, moe_reference, request, tmp_path):
    nproc, overrides = MOE_LAYOUTS[name]
    losses = request.getfixturevalue("ep2_run")[1] if name == "ep2" else run_layout(tmp_path / name, nproc, [*MOE, *overrides])
    assert_parity(moe_reference[1], losses)
    assert losses[-1] < losses[0] - 0.5


def _resume_from_step_10(run_dir: Path, nproc: int, overrides: list[str]) -> list[float]:
    shutil.rmtree(run_dir / "checkpoints" / "step_20")
    (run_dir / "checkpoints" / "latest").write_text("step_10\n")
    (run_dir / "metrics.jsonl").unlink()
    launch = ["--nproc-per-node", str(nproc)] if nproc > 1 else []
    out = plait_cli("train", *launch, *BASE, f"--run.dir={run_dir}", *MOE, *overrides)
    assert out.returncode == 0, out.stderr[-3000:]
    return train_losses(run_dir)


def test_ep_checkpoint_resumes_as_single_process(moe_reference, ep2_run, tmp_path):
    """Expert shards are gathered whole into the checkpoint: one process continues the EP run."""
    run_dir = tmp_path / "ep2"
    shutil.copytree(ep2_run[0], run_dir)
    resumed = _resume_from_step_10(run_dir, 1, [])
    assert len(resumed) == STEPS - 10
    assert_parity(moe_reference[1][10:], resumed, first_rel=1e-4)


def test_single_process_checkpoint_resumes_under_ep(moe_reference, tmp_path):
    """And the other way: each EP rank restores its slice of the whole expert tensors."""
    run_dir = tmp_path / "single"
    shutil.copytree(moe_reference[0], run_dir)
    resumed = _resume_from_step_10(run_dir, 2, EP2)
    assert len(resumed) == STEPS - 10
    assert_parity(moe_reference[1][10:], resumed, first_rel=1e-4)


def test_bf16_mixed_precision_within_looser_bound(reference, tmp_path):
    """ZeRO-3 with bf16 parameters against the fp32 single process. bf16 keeps 8 bits of
    mantissa (relative rounding 2^-9 = 2e-3 per operation), so the first loss may move by a few
    1e-3 and later steps drift further as rounded updates accumulate; 2e-2 relative over 20 steps
    still catches real errors (a wrong gradient scale or a lost shard moves the curve by far more)."""
    losses = run_layout(tmp_path / "bf16", 2, ["--parallel.dp_shard_degree=2", "--parallel.zero_stage=3",
                                              "--parallel.mixed_precision=true"])
    assert_parity(reference, losses, first_rel=5e-3, later_rel=2e-2)


def test_pipeline_checkpoint_resumes_across_layouts(reference, tmp_path):
    """A pipeline (pp 2) checkpoint resumes in one process on the same curve, and a checkpoint
    that single process writes resumes under the pipeline again: the files are layout-free and
    each stage gets back its own parameters and optimizer state."""
    run_dir = tmp_path / "resume-pp"
    run_layout(run_dir, 2, ["--parallel.pp_degree=2", "--checkpoint.every=10"])
    shutil.rmtree(run_dir / "checkpoints" / "step_20")
    (run_dir / "checkpoints" / "latest").write_text("step_10\n")
    (run_dir / "metrics.jsonl").unlink()
    out = plait_cli("train", *BASE, f"--run.dir={run_dir}", "--checkpoint.every=5", "--train.eval_every=10")
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = train_losses(run_dir)
    assert len(resumed) == STEPS - 10
    assert_parity(reference[10:], resumed, first_rel=1e-4)
    single_val = val_losses(run_dir)[-1]

    shutil.rmtree(run_dir / "checkpoints" / "step_20")
    (run_dir / "checkpoints" / "latest").write_text("step_15\n")  # written by the single process
    (run_dir / "metrics.jsonl").unlink()
    out = plait_cli("train", "--nproc-per-node", "2", *BASE, f"--run.dir={run_dir}", "--parallel.pp_degree=2",
                    "--parallel.pp_schedule=gpipe", "--train.eval_every=10", "--train.sample_tokens=8")
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = train_losses(run_dir)
    assert len(resumed) == STEPS - 15
    assert_parity(reference[15:], resumed, first_rel=1e-4)
    # Evaluation under the pipeline (on gathered weights) gives the single process's number.
    assert abs(val_losses(run_dir)[-1] - single_val) <= 1e-4 * single_val
    samples = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "sample"]
    assert samples and samples[-1]["text"].startswith("def ")  # the end-of-run sample from gathered weights


def val_losses(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["val_loss"] for x in lines if x["kind"] == "val"]


def test_layout_errors_before_any_worker(tmp_path):
    out = plait_cli("train", "--nproc-per-node", "2", "--parallel.dp_replicate_degree=4", f"--run.dir={tmp_path}", timeout=120)
    assert out.returncode == 2
    assert "set parallel.dp_replicate_degree = 2" in out.stderr
    assert "torch.distributed" not in out.stderr  # refused before torchrun started anything
    assert not (tmp_path / "config.toml").exists()


def test_torchrun_starts_plait_directly(reference, tmp_path):
    """`torchrun ... -m plait train` is the same job as `plait train --nproc-per-node`."""
    env = {**os.environ, "PYTHONPATH": str(Path(plait.__file__).parents[1])}
    run_dir = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "plait", "train", *BASE, f"--run.dir={run_dir}", "--parallel.dp_shard_degree=-1",
           "--parallel.zero_stage=3"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert_parity(reference, train_losses(run_dir))
