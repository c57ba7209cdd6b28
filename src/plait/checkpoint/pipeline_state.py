"""Whole weights of a pipeline-parallel run, gathered from the stages onto rank 0 (for the
end-of-run sample and evaluation; checkpoints are sharded and need none of this).

Each rank holds only its stages' parameters (with the full model's names, see
`plait.parallel.pipeline_parallel`). Every rank assembles its stages' whole tensors over its own
data/tensor-parallel group (PyTorch's state-dict helpers, as for any layout), then the first rank
of each such group (the stage's representative) sends them to rank 0, which merges the stages
into one state in the full model's parameter order.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from plait.model import build_model
from plait.parallel.pipeline_parallel import pipeline_of

Tensors = dict[str, torch.Tensor]

# Whole tensors on every rank of a stage's group (cpu_offload would keep them on global rank 0
# only, which is not a member of the later stages' groups).
_WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=False)


def is_pipelined(model: nn.Module) -> bool:
    return pipeline_of(model) is not None


def _full_order(model: nn.Module) -> dict[str, int]:
    """Position of every parameter name in the unsplit model (built on the meta device: free)."""
    return {name: i for i, name in enumerate(dict(build_model(model.args).named_parameters()))}


def _to_rank0(payload: Any, representative: bool) -> list[Any] | None:
    """Every representative's payload on rank 0 (None elsewhere); a collective over all ranks."""
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(payload if representative else None, gathered, dst=0)
    return [x for x in gathered if x is not None] if gathered is not None else None


def gather_pipeline_model(model: nn.Module) -> Tensors:
    info = pipeline_of(model)
    assert info is not None
    state = get_model_state_dict(model, options=_WHOLE)
    local = {name: t.detach().cpu().contiguous().clone() for name, t in state.items()}
    parts = _to_rank0(local, info.representative)
    if parts is None:
        return {}
    order = _full_order(model)
    merged = {name: t for part in parts for name, t in part.items()}
    return dict(sorted(merged.items(), key=lambda item: order.get(item[0], len(order))))
