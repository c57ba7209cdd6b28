"""One optimizer step: the learning rate, the batch, forward and backward under the run's layout,
clipping, the NaN check, the update. `train_step` is what the loop calls once per step, and what
an outer loop (low-communication training: every H inner steps, an exchange across replica
groups) calls H times between its own updates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plait.optim import lr_at
from plait.trainer.build import Run
from plait.trainer.nan_guard import NanGuard, Offender
from plait.trainer.router_metrics import RouterMetrics


@dataclass
class StepResult:
    """What a step leaves for logging: its learning rate, its loss on this rank (detached, on the
    device: read it only when logging), the gradient norm before clipping (None without
    clipping), and the offender when the loss or norm was not finite (then no update was made)."""

    lr: float
    loss: torch.Tensor
    grad_norm: torch.Tensor | None
    offender: Offender | None


def train_step(run: Run, step: int, nan_guard: NanGuard, router: RouterMetrics) -> StepResult:
    """Run step `step` (counted from 1): every micro-batch of this rank's share of the global batch,
    then one update unless the loss or the gradient norm is NaN or infinite on any rank. The
    gradients are cleared either way; what a non-finite step means is the caller's
    (`NanGuard.handle`)."""
    o, par = run.cfg.optim, run.par
    lr = lr_at(step, run.cfg.train.steps, o)
    for group in par.optimizer.param_groups:
        group["lr"] = lr
    batch = nan_guard.next_batch(run.loader).to(run.device, non_blocking=True)
    step_loss = par.forward_backward(batch, router)
    grad_norm = par.clip_grad_norm(o.grad_clip) if o.grad_clip > 0 else None
    offender = nan_guard.find_offender(step_loss, grad_norm)  # a NaN or inf anywhere; all ranks agree
    if offender is None:
        par.optimizer.step()
    par.optimizer.zero_grad(set_to_none=True)
    run.tokens_seen += run.derived.tokens_per_step
    router.end_step()
    return StepResult(lr, step_loss, grad_norm, offender)
