"""Activation checkpointing per transformer block: keep each block's input, recompute its
inside during backward. PyTorch's checkpoint wrapper is used because its state-dict hooks hide the
wrapper from parameter names, so checkpoints and conversion see the same names either way."""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper


def apply_activation_checkpointing(model: nn.Module) -> None:
    for key, block in model.layers.items():
        # use_reentrant=False: works with inputs that do not require grad and with compile.
        model.layers[key] = checkpoint_wrapper(block, preserve_rng_state=False)
