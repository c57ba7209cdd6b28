"""Whole (unsharded) model weights on rank 0, from any layout but the pipeline (whose stages are
merged by `plait.parallel.pipeline_parallel.gather_pipeline_model`).

Checkpoints do not use this (every rank writes its own part, see `plait.checkpoint.sharded`).
The end-of-run sample does, and exports in tests and benches: they run a plain copy of the model
in one process. PyTorch's distributed state-dict helpers strip wrapper names and assemble FSDP
and DTensor shards, and the result lands on rank 0 in CPU memory.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from plait.model import ModelArgs, build_model, materialize

Tensors = dict[str, torch.Tensor]


def gather_model(model: nn.Module, distributed: bool) -> Tensors:
    """Every parameter whole, by the unmodified model's names, on rank 0 (a collective when
    `distributed`; other ranks get an empty dict)."""
    # full_state_dict assembles DTensor shards; only rank 0 keeps the result, on the CPU.
    options = StateDictOptions(full_state_dict=distributed, cpu_offload=distributed)
    state = get_model_state_dict(model, options=options)
    return {name: t.detach().contiguous().clone() for name, t in state.items()}


def plain_model(args: ModelArgs, tensors: Tensors, device: torch.device) -> nn.Module:
    """A one-process model of `args` holding `tensors` (whole weights gathered from a layout)."""
    plain = materialize(build_model(args), device, seed=0)  # the seed is overwritten by the weights
    plain.load_state_dict(tensors)
    return plain
