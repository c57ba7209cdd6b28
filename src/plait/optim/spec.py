"""What plait knows of an optimizer: how to build it, and the two facts ZeRO-1 and the planner read.

A spec is plain data with a builder function, so that the table of optimizers
(`plait.optim.OPTIMIZERS`) loads without torch: config validation and the planner read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from plait.config import OptimSection

ParamGroups = list[dict[str, Any]]


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer, a row of `plait.optim.OPTIMIZERS`.

    name: the `optim.name` that selects it (the table's key).
    build: `build(groups, cfg, foreach)`, the torch optimizer over `groups` (plait.optim.groups:
        each group carries its weight decay) with `cfg`'s hyperparameters; `foreach` is false
        where a group mixes tensor placements. It imports torch itself.
    elementwise: whether its update of each element depends only on that element's gradient and
        state (AdamW, SGD, Adagrad; not Muon or Shampoo, which see whole matrices). ZeRO-1 steps
        flat slices that cut through parameters, so it wraps only these.
    state_bytes_per_param: bytes of optimizer state per parameter element at fp32 parameters
        (AdamW: 8, two fp32 moments), for the planner's memory model.
    description: one line, for listings and messages.
    """

    name: str
    build: Callable[[ParamGroups, OptimSection, bool], torch.optim.Optimizer]
    elementwise: bool
    state_bytes_per_param: int
    description: str
