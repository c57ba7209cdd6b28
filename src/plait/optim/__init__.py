"""Optimizers and learning-rate schedules."""

from plait.optim.adamw import build_optimizer
from plait.optim.schedule import lr_at

__all__ = ["build_optimizer", "lr_at"]
