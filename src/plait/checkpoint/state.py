"""Whole (unsharded) model weights gathered onto rank 0 from any layout.

Checkpoints do not use this (every rank writes its own part, see `plait.checkpoint.sharded`).
The end-of-run sample and a pipeline run's evaluation do: they run a plain copy of the model in
one process. Gathering uses PyTorch's distributed state-dict helpers, which strip wrapper names
and assemble FSDP/DTensor shards, and lands on rank 0 in CPU memory.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from plait.checkpoint.pipeline_state import gather_pipeline_model, is_pipelined

Tensors = dict[str, torch.Tensor]


def gather_model(model: nn.Module, distributed: bool) -> Tensors:
    """Every parameter whole, by the unmodified model's names, on rank 0 (a collective when
    `distributed`; other ranks get an empty dict or their copy)."""
    if is_pipelined(model):  # each stage's ranks hold part of the model: merged on rank 0
        return gather_pipeline_model(model)
    # full_state_dict assembles DTensor shards; only rank 0 keeps the result, on the CPU.
    options = StateDictOptions(full_state_dict=distributed, cpu_offload=distributed)
    state = get_model_state_dict(model, options=options)
    return {name: t.detach().contiguous().clone() for name, t in state.items()}
