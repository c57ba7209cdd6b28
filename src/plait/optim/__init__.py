"""Optimizers by name, and learning-rate schedules.

`OPTIMIZERS` maps each `optim.name` to its `OptimizerSpec` (plait.optim.spec); `build_optimizer`
builds the one the config names over the parameter groups every optimizer shares
(plait.optim.groups: decayed matrices, undecayed vectors). ZeRO-1 (plait.optim.zero1) wraps any
optimizer of the table whose spec says it is element-wise. `lr_at` (plait.optim.schedule) sets
the learning rate every step.

Adding an optimizer:
1. one file here, `plait/optim/<name>.py`, holding its `build(groups, cfg, foreach)` (which
   imports torch itself) and its `OptimizerSpec`: element-wise or not, bytes of state per
   parameter element, one line of description;
2. one line in `OPTIMIZERS` below (with its import);
3. its tests: it builds and steps, and if element-wise, ZeRO-1 over it steps as it does
   unsharded and its sharded state checkpoints (tests/dist/test_zero1_optimizers.py does this
   for SGD and Adagrad).

Importing this package does not import torch (config validation and the pure-Python planner
read the table); the builders import it when called. Nothing here imports plait.config at
runtime either, so the config can check `optim.name` against the table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from plait.optim.adamw import ADAMW
from plait.optim.schedule import lr_at
from plait.optim.spec import OptimizerSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

    from plait.config import OptimSection

__all__ = ["OPTIMIZERS", "OptimizerSpec", "build_optimizer", "lr_at"]

OPTIMIZERS: dict[str, OptimizerSpec] = {spec.name: spec for spec in (ADAMW,)}


def build_optimizer(model: nn.Module, cfg: OptimSection, foreach: bool = True) -> torch.optim.Optimizer:
    """The optimizer `cfg.name` names, over `model`'s parameters. `foreach` (one kernel per group)
    needs every tensor of a group on one placement: false under tensor or expert parallelism."""
    from plait.optim.groups import param_groups

    return OPTIMIZERS[cfg.name].build(param_groups(model, cfg), cfg, foreach)
