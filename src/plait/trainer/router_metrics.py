"""The loop's view of mixture-of-experts layers: the balance loss to add before backward, and
router statistics averaged over the logging window. A dense model has no MoE layers: the loss
is None and the record empty, so the loop runs the same code either way."""

from __future__ import annotations

import torch
from torch import nn

from plait.model.moe import moe_layers
from plait.parallel.job import DistInfo, mean_across_ranks


class RouterMetrics:
    def __init__(self, model: nn.Module) -> None:
        self.layers = moe_layers(model)
        self._aux_sum: torch.Tensor | None = None
        self._stats: torch.Tensor | None = None  # (layers, experts + 1), summed over the window
        self._steps = 0

    def aux_loss(self) -> torch.Tensor | None:
        """The balance losses of the last forward, summed over layers (with gradient)."""
        if not self.layers:
            return None
        return torch.stack([layer.aux_loss for layer in self.layers]).sum()

    def observe(self, aux_loss: torch.Tensor | None) -> None:
        """Add one micro-batch's balance loss and router counts to the window. Called after
        backward, so a recomputed forward (activation checkpointing) has not been counted twice:
        each layer only keeps its last forward's counts, which the recomputation reproduces."""
        if not self.layers:
            return
        stats = torch.stack([layer.stats for layer in self.layers])
        self._stats = stats if self._stats is None else self._stats + stats
        aux = aux_loss.detach()
        self._aux_sum = aux if self._aux_sum is None else self._aux_sum + aux

    def end_step(self) -> None:
        self._steps += 1

    def window_record(self, dist_info: DistInfo) -> dict[str, float]:
        """`aux_loss` (the added balance loss, per step, mean over ranks), `moe_load_max` (the
        busiest expert's share of the routed tokens times the number of experts, over the window,
        the largest over layers: 1 is even, X all on one) and `moe_drop_rate` (share of
        assignments dropped by capacity); then the window starts again. The counts are already
        summed over the data-parallel ranks by the layers, so every rank holds the same values."""
        if not self.layers or self._stats is None:
            return {}
        counts_LX, dropped_L = self._stats[:, :-1], self._stats[:, -1]
        load = counts_LX / counts_LX.sum(dim=1, keepdim=True) * counts_LX.shape[1]
        record = {
            "aux_loss": mean_across_ranks(self._aux_sum, dist_info).item() / max(self._steps, 1),
            "moe_load_max": load.max().item(),
            "moe_drop_rate": (dropped_L.sum() / counts_LX.sum()).item(),
        }
        self._aux_sum, self._stats, self._steps = None, None, 0
        return record
