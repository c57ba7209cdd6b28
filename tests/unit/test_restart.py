"""Starting a run again after a failure: before any checkpoint it starts over cleanly, and the
launcher checks `checkpoint.resume = false` once so that torchrun's restarts of the job resume.
(The restarts themselves, with a killed worker, are tests/dist/test_crash.py.)"""

from __future__ import annotations

import pytest

import plait
from plait.checkpoint import latest_checkpoint
from plait.cli import main, restartable
from plait.validation import build_config, resolve_run
from plait.report import read_metrics

SMALL = [
    "--model.name=debug", "--train.seq_len=64", "--train.global_batch_tokens=1024", "--train.micro_batch_size=8",
    "--train.eval_every=0", "--train.log_every=1", "--train.sample_tokens=0", "--run.progress=none",
    "--run.tensorboard=false", "--train.steps=6", "--checkpoint.every=0",
]


@pytest.fixture(scope="module")
def restarted(tmp_path_factory):
    """A run that died before its first checkpoint (here: it wrote none), then started again."""
    run_dir = tmp_path_factory.mktemp("restart")
    plait.train(build_config(None, [*SMALL, f"--run.dir={run_dir}", "--checkpoint.save_final=false"]))
    assert latest_checkpoint(run_dir) is None and (run_dir / "config.toml").is_file()
    first = (run_dir / "metrics.jsonl").read_text().splitlines()
    result = plait.train(build_config(None, [*SMALL, f"--run.dir={run_dir}"]))
    return run_dir, first, result


def test_restart_before_any_checkpoint_starts_over(restarted):
    import json

    run_dir, first, result = restarted
    assert result.step == 6 and latest_checkpoint(run_dir) == run_dir / "checkpoints" / "step_6"
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [(x["step"], x["loss"]) for x in lines if x["kind"] == "train"]
    # Both starts logged steps 1..6 and, starting from the same seed, the same losses.
    assert len(first) < len(lines) and train[:6] == train[6:] and [s for s, _ in train[:6]] == list(range(1, 7))
    # The report counts each step once.
    assert [(x["step"], x["loss"]) for x in read_metrics(run_dir)["train"]] == train[6:]


def test_resume_false_is_checked_once_by_the_launcher(restarted, tmp_path, capsys):
    run_dir = restarted[0]
    code = main(["train", "--nproc-per-node", "2", *SMALL, "--parallel.dp_replicate_degree=2",
                 f"--run.dir={run_dir}", "--checkpoint.resume=false"])
    assert code == 2  # refused before any worker starts
    assert "already holds checkpoints (step_6) and checkpoint.resume = false; pick a new --run.dir" in capsys.readouterr().err
    # A new directory: the workers get resume = true, so a restart resumes from the job's own checkpoints.
    fresh = resolve_run(build_config(None, [*SMALL, f"--run.dir={tmp_path / 'new'}", "--checkpoint.resume=false"]), 1)
    assert restartable(fresh).config.checkpoint.resume and not fresh.config.checkpoint.resume
    assert restartable(fresh).layout == fresh.layout
