"""The one place that transforms the model for training, in a fixed order.

Order and why:
1. activation checkpointing wraps each block first, so compilation (2) sees the recomputation
   boundary and compiles the block's inside once;
2. torch.compile per block (not the whole model): blocks share code, so one compiled graph
   serves every layer, and a graph break stays local to a block;
3. data-parallel replication (DDP) last: it must see the final modules and parameters, and its
   gradient hooks then fire after any recomputation.
Later: tensor parallel before checkpointing, data-parallel sharding (FSDP) in place of DDP.
"""

from __future__ import annotations

from torch import nn

from plait.config import TrainSection
from plait.parallel.activation_checkpoint import apply_activation_checkpointing
from plait.parallel.data_parallel import apply_data_parallel


def apply_layout(model: nn.Module, train: TrainSection, dp_degree: int = 1) -> nn.Module:
    """The model to train: the same module, transformed in place, wrapped by DDP when dp > 1."""
    if train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if train.compile:
        for block in model.layers.values():
            # In place (Module.compile), so parameter names do not gain an "_orig_mod." part.
            block.compile()
    if dp_degree > 1:
        model = apply_data_parallel(model)
    return model
