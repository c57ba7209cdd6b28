"""What a NaN or infinite loss does (`train.nan_policy`): stop, skip the step, or roll back.

Every step, before the optimizer steps, each rank checks its step loss and the gradient norm
(when clipping computed one: a finite loss can still overflow in backward and poison the
weights). One all-reduce MIN of a small integer gives every rank the same verdict and names the
lowest offending rank; reading it costs one host sync per step.

- "stop": raise NonFiniteLossError naming the step, the rank and the fix.
- "skip": drop the step's gradients, do not step the optimizer, count the step as skipped.
- "rollback": raise RollbackRequested, which `train()` catches: it resumes from the newest
  checkpoint through the start-up path, and the data batch that gave the non-finite loss is
  skipped when the loader reaches it again, so the same NaN is not replayed. More than
  MAX_ROLLBACKS rollbacks to the same checkpoint stop the run: the cause is not one batch.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import torch

from plait.config import Config
from plait.data import TrainLoader
from plait.parallel.job import DistInfo, min_across_ranks

MAX_ROLLBACKS = 3
_FIX = 'lower optim.lr or raise optim.warmup_steps, or check the data'


class NonFiniteLossError(FloatingPointError):
    """The loss (or gradient norm) was NaN or infinite and train.nan_policy could not go on."""


class Offender(NamedTuple):
    rank: int  # the lowest rank that saw it
    what: str  # "loss" or "gradient norm"


class RollbackRequested(Exception):
    """Internal: leave the loop so that `train()` resumes from the newest checkpoint."""

    def __init__(self, step: int, offender: Offender, batch_index: int) -> None:
        super().__init__(f"step {step}: the {offender.what} is not finite on rank {offender.rank}")
        self.step, self.offender, self.batch_index = step, offender, batch_index


class NanGuard:
    """The policy and its memory across rollbacks (one per `train()` call, shared by its loops)."""

    def __init__(self, policy: str, dist_info: DistInfo) -> None:
        self.policy = policy
        self.dist_info = dist_info
        self.skipped_steps = 0
        self.rollbacks = 0
        self._bad_batches: set[int] = set()  # global batch indices, as the loader counts them
        self._batch_index = -1
        self._target: str | None = None  # the checkpoint the last rollback returned to
        self._rollbacks_to_target = 0

    def next_batch(self, loader: TrainLoader) -> torch.Tensor:
        """The loader's next batch, passing over those that gave a non-finite loss before."""
        while loader.steps_consumed in self._bad_batches:
            loader.next_batch()
        self._batch_index = loader.steps_consumed
        return loader.next_batch()

    def find_offender(self, step_loss: torch.Tensor, grad_norm: torch.Tensor | None) -> Offender | None:
        """A collective: every rank gets the same answer. Each rank sends 2 x rank (+1 when only
        its gradient norm is bad) if something is not finite, else 2 x world size; the minimum
        is the lowest offending rank."""
        world = self.dist_info.world_size
        loss_bad = ~torch.isfinite(step_loss.detach().float())
        bad = loss_bad if grad_norm is None else loss_bad | ~torch.isfinite(grad_norm.detach().float())
        mine = torch.where(bad, 2 * self.dist_info.rank + (~loss_bad).long(), 2 * world)
        code = int(min_across_ranks(mine, self.dist_info).item())  # the one host sync per step
        if code >= 2 * world:
            return None
        return Offender(rank=code // 2, what="loss" if code % 2 == 0 else "gradient norm")

    def handle(self, step: int, offender: Offender, lr: float) -> str:
        """Apply the policy to a step whose loss was not finite: raise ("stop", "rollback"), or
        count the step as skipped and return the line to print ("skip")."""
        where = f"step {step}: the {offender.what} is not finite (NaN or inf) on rank {offender.rank}"
        if self.policy == "stop":
            raise NonFiniteLossError(
                f"{where} (the lowest rank that saw it), at lr {lr:.3g}; train.nan_policy = \"stop\" ends the run here. "
                f"Fix: {_FIX}; or set train.nan_policy = \"skip\" (drop such steps) or \"rollback\" (return to the "
                f"newest checkpoint and skip the batch)"
            )
        if self.policy == "rollback":
            raise RollbackRequested(step, offender, self._batch_index)
        self.skipped_steps += 1
        return f"{where}: step skipped, weights unchanged ({self.skipped_steps} skipped so far; train.nan_policy = \"skip\")"

    def metrics(self) -> dict[str, int]:
        """Counters for the metrics line of the policies that go on after a non-finite loss."""
        if self.policy == "skip":
            return {"skipped_steps": self.skipped_steps}
        if self.policy == "rollback":
            return {"rollbacks": self.rollbacks}
        return {}

    def roll_back(self, request: RollbackRequested, checkpoint: Path | None, cfg: Config) -> tuple[Config, str]:
        """Record a rollback to `checkpoint` (the newest one) and return the config to resume with
        and the line to print; raise NonFiniteLossError when there is nothing to roll back to, or
        when rolling back keeps failing."""
        where = str(request)
        if checkpoint is None:
            raise NonFiniteLossError(
                f"{where}, and train.nan_policy = \"rollback\" has no checkpoint to return to in run.dir = "
                f"{str(cfg.run_dir)!r} yet. Fix: {_FIX}; save earlier with a smaller checkpoint.every, or set "
                f"train.nan_policy = \"skip\""
            )
        if checkpoint.name == self._target:
            self._rollbacks_to_target += 1
        else:
            self._target, self._rollbacks_to_target = checkpoint.name, 1
        if self._rollbacks_to_target > MAX_ROLLBACKS:
            raise NonFiniteLossError(
                f"{where} again after {MAX_ROLLBACKS} rollbacks to {checkpoint.name}, each skipping the batch that "
                f"gave the last non-finite loss: the cause is not one batch (train.nan_policy = \"rollback\"). "
                f"Fix: {_FIX}"
            )
        self.rollbacks += 1
        self._bad_batches.add(request.batch_index)
        # The checkpoints to return to may be this run's own: resume from them whatever checkpoint.resume says.
        resumed = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume=True))
        return resumed, (f"{where}: rolling back to {checkpoint.name} (rollback {self._rollbacks_to_target} of at "
                         f"most {MAX_ROLLBACKS} to it); the batch of step {request.step} will be skipped")
