"""Learning-rate schedules as pure functions of the step, so resuming needs no scheduler state.

`step` counts optimizer steps from 1. All schedules warm up linearly over `warmup_steps`.
- cosine: then cosine decay from lr to lr * min_lr_ratio at the last step.
- wsd (warmup-stable-decay): hold lr, then decay linearly to lr * min_lr_ratio over the last
  `decay_fraction` of the steps.
- constant: hold lr after warmup.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # at runtime plait.config may import this package (to check `optim.name`)
    from plait.config import OptimSection


def lr_at(step: int, total_steps: int, cfg: OptimSection) -> float:
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if warmup and step <= warmup:
        return peak * step / warmup
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        span = max(total_steps - warmup, 1)
        progress = min(max(step - warmup, 0) / span, 1.0)
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # wsd
    decay_steps = max(1, round(cfg.decay_fraction * total_steps))
    decay_start = max(total_steps - decay_steps, warmup)
    if step <= decay_start:
        return peak
    progress = min((step - decay_start) / max(total_steps - decay_start, 1), 1.0)
    return peak + (floor - peak) * progress
