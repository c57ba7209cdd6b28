"""train.nan_policy on one process: "stop" names the step, the rank and the fix; "skip" leaves the
weights of a bad step unchanged and goes on; "rollback" returns to the newest checkpoint, passes
over the bad batch and finishes, or gives up with a clear error when rolling back cannot help.

Two ways to a non-finite loss: a learning rate that makes the model overflow within a few steps
(a real run gone wrong: every later step fails too), and one poisoned batch, injected here by
wrapping the loss function (the loop has no test hook), for the policies that must go on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import plait
from plait.checkpoint import iter_model_tensors
import plait.parallel.step as step
from plait.validation import build_config
from plait.data import TrainLoader
from plait.trainer.nan_guard import MAX_ROLLBACKS, NonFiniteLossError

SMALL = [
    "--model.name=debug", "--train.seq_len=64", "--train.global_batch_tokens=1024", "--train.micro_batch_size=8",
    "--train.eval_every=0", "--train.log_every=1", "--train.sample_tokens=0", "--run.progress=none",
    "--run.tensorboard=false", "--optim.warmup_steps=0",
]
EXPLODE = "--optim.lr=1e6"  # AdamW moves every weight by ~lr: the model overflows within a few steps
POISONED = 4  # the global batch index (0-based) of step 5


def config(run_dir: Path, *extra: str):
    return build_config(None, SMALL + [f"--run.dir={run_dir}", *extra])


def train_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["kind"] == "train"]


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return dict(iter_model_tensors(run_dir / "checkpoints" / f"step_{step}"))


@pytest.fixture
def poisoned_batch(monkeypatch):
    """The loss of the batch with global index POISONED is NaN, wherever the loader serves it."""
    current = {"index": -1}
    next_batch, lm_loss = TrainLoader.next_batch, step.lm_loss

    def tracking_next_batch(self):
        current["index"] = self.steps_consumed
        return next_batch(self)

    def poisoned_lm_loss(*args, **kwargs):
        loss = lm_loss(*args, **kwargs)
        return loss * math.nan if current["index"] == POISONED else loss

    monkeypatch.setattr(TrainLoader, "next_batch", tracking_next_batch)
    monkeypatch.setattr(step, "lm_loss", poisoned_lm_loss)


def test_stop_names_step_rank_and_fix(tmp_path):
    with pytest.raises(NonFiniteLossError) as info:
        plait.train(config(tmp_path, EXPLODE, "--train.steps=10"))
    message = str(info.value)
    step = int(message.split(":", 1)[0].removeprefix("step "))
    assert "is not finite (NaN or inf) on rank 0" in message
    assert 'train.nan_policy = "stop"' in message and "lower optim.lr" in message
    assert [x["step"] for x in train_lines(tmp_path)] == list(range(1, step))  # logged up to the step before


def test_skip_leaves_weights_unchanged_and_goes_on(tmp_path, poisoned_batch):
    result = plait.train(config(tmp_path, "--train.nan_policy=skip", "--train.steps=7", "--checkpoint.every=1",
                                "--checkpoint.keep_last=10"))
    assert result.step == 7
    lines = {x["step"]: x for x in train_lines(tmp_path)}
    assert lines[5]["loss"] is None and lines[5]["skipped_steps"] == 1
    assert all(math.isfinite(lines[s]["loss"]) for s in (1, 2, 3, 4, 6, 7))
    assert lines[4]["skipped_steps"] == 0 and lines[7]["skipped_steps"] == 1
    before, skipped, after = weights(tmp_path, 4), weights(tmp_path, 5), weights(tmp_path, 6)
    assert all(torch.equal(before[k], skipped[k]) for k in before)  # no update from the bad step...
    assert not all(torch.equal(skipped[k], after[k]) for k in before)  # ...and the next one trains
    assert all(torch.isfinite(t).all() for t in after.values())


def test_rollback_skips_the_bad_batch_and_finishes(tmp_path, poisoned_batch):
    result = plait.train(config(tmp_path, "--train.nan_policy=rollback", "--train.steps=8", "--checkpoint.every=2"))
    assert result.step == 8 and math.isfinite(result.loss)
    lines = train_lines(tmp_path)
    # Steps 1-4 logged, step 5 failed and went back to step_4, then steps 5-8 ran again.
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert lines[3]["rollbacks"] == 0 and lines[-1]["rollbacks"] == 1
    assert all(math.isfinite(x["loss"]) for x in lines)
    state = json.loads((tmp_path / "checkpoints" / "step_8" / "manifest.json").read_text())
    assert state["loader"]["sequences_consumed"] == 9 * 16  # 8 steps trained, one batch passed over


def test_rollback_gives_up_when_the_cause_is_not_one_batch(tmp_path):
    with pytest.raises(NonFiniteLossError, match=f"again after {MAX_ROLLBACKS} rollbacks to step_\\d+.*lower optim.lr"):
        plait.train(config(tmp_path, EXPLODE, "--train.nan_policy=rollback", "--train.steps=10", "--checkpoint.every=1"))


def test_rollback_without_checkpoint_says_so(tmp_path):
    with pytest.raises(NonFiniteLossError, match='has no checkpoint to return to.*smaller checkpoint.every'):
        plait.train(config(tmp_path, EXPLODE, "--train.nan_policy=rollback", "--train.steps=10", "--checkpoint.every=50"))
