"""The resharding matrix: a checkpoint saved under one layout resumes under another and the
training continues on the same loss curve.

Three source runs train the debug config for 20 steps with a checkpoint at step 10 (and are
themselves parity rows: their curves match the single process). Each target layout resumes the
step-10 checkpoint and trains steps 11..20; every continuation must match the single-process
curve's steps 11..20 within the parity bounds (the first resumed step within 1e-4, since the
source run's state already differs from the single process's by summation order). The data
stream continues at the same global position, so any skipped or repeated batch would show.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .layouts import BASE, STEPS, assert_parity, plait_cli, run_layout, train_losses

ZERO3_X4 = (4, ["--parallel.dp_shard_degree=4", "--parallel.zero_stage=3"])
TP2_PP2 = (4, ["--parallel.pp_degree=2", "--parallel.tp_degree=2"])
ZERO1_X2_TP2 = (4, ["--parallel.dp_shard_degree=2", "--parallel.zero_stage=1", "--parallel.tp_degree=2"])

TARGETS = {
    "single": (1, []),
    "tp2": (2, ["--parallel.tp_degree=2"]),
    "zero1-x2-tp2": ZERO1_X2_TP2,
    "pp2": (2, ["--parallel.pp_degree=2"]),
}


def _source(tmp_path_factory, reference: list[float], layout: tuple[int, list[str]]) -> Path:
    run_dir = tmp_path_factory.mktemp("source")
    nproc, overrides = layout
    losses = run_layout(run_dir, nproc, [*overrides, "--checkpoint.every=10"])
    assert_parity(reference, losses)
    return run_dir


@pytest.fixture(scope="module")
def zero3_x4_run(tmp_path_factory, reference) -> Path:
    return _source(tmp_path_factory, reference, ZERO3_X4)


@pytest.fixture(scope="module")
def tp2_pp2_run(tmp_path_factory, reference) -> Path:
    # Saved in the background (checkpoint.async): 4 ranks writing from a thread over their own
    # process group while the pipeline trains on.
    nproc, overrides = TP2_PP2
    return _source(tmp_path_factory, reference, (nproc, [*overrides, "--checkpoint.async=true"]))


def resume_at_step_10(source: Path, run_dir: Path, layout: tuple[int, list[str]]) -> list[float]:
    """Copy a source run, keep only its step-10 checkpoint, resume it under `layout`."""
    shutil.copytree(source, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_20")
    (run_dir / "metrics.jsonl").unlink()
    nproc, overrides = layout
    launch = ["--nproc-per-node", str(nproc)] if nproc > 1 else []
    out = plait_cli("train", *launch, *BASE, f"--run.dir={run_dir}", *overrides)
    assert out.returncode == 0, out.stderr[-4000:]
    losses = train_losses(run_dir)
    assert len(losses) == STEPS - 10
    return losses


@pytest.mark.parametrize("target", list(TARGETS))
def test_zero3_x4_checkpoint_resumes_under(target, zero3_x4_run, reference, tmp_path):
    losses = resume_at_step_10(zero3_x4_run, tmp_path / target, TARGETS[target])
    assert_parity(reference[10:], losses, first_rel=1e-4)


def test_tp2_pp2_checkpoint_resumes_as_zero3_x4(tp2_pp2_run, reference, tmp_path):
    losses = resume_at_step_10(tp2_pp2_run, tmp_path / "zero3-x4", ZERO3_X4)
    assert_parity(reference[10:], losses, first_rel=1e-4)


def test_every_rank_wrote_its_own_shards(zero3_x4_run):
    """Nothing was gathered: each of the 4 ranks wrote a file, of about a quarter of the state,
    and the manifest records every file's size and checksum."""
    step = zero3_x4_run / "checkpoints" / "step_10"
    files = sorted(p.name for p in step.glob("__*_*.distcp"))
    assert [f.split("_")[2] for f in files] == ["0", "1", "2", "3"], files
    sizes = [(step / f).stat().st_size for f in files]
    assert max(sizes) < 0.5 * sum(sizes), sizes  # a gathered save would put everything on one rank
    manifest = json.loads((step / "manifest.json").read_text())
    assert set(manifest["files"]) == {*files, ".metadata.json"}
    assert manifest["layout"]["dp_shard"] == 4 and manifest["layout"]["zero_stage"] == 3
    assert manifest["loader"]["sequences_consumed"] == 10 * 32


def test_zero1_tp2_checkpoint_resumes_as_single_process(tmp_path_factory, reference, tmp_path):
    """ZeRO-1 saves its flat slices of tensor-parallel shards as boxes of the whole moments: one
    process (a plain torch AdamW) resumes them on the same curve."""
    source = _source(tmp_path_factory, reference, ZERO1_X2_TP2)
    losses = resume_at_step_10(source, tmp_path / "single", TARGETS["single"])
    assert_parity(reference[10:], losses, first_rel=1e-4)
