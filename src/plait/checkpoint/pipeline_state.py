"""Whole model and optimizer state of a pipeline-parallel run, gathered from and given back to
the stages.

Each rank holds only its stages' parameters (with the full model's names, see
`plait.parallel.pipeline_parallel`). Gathering: every rank assembles its stages' whole tensors
over its own data/tensor-parallel group (PyTorch's state-dict helpers, as for any layout), then
the first rank of each such group (the stage's representative) sends them to rank 0, which merges
the stages into one state in the full model's parameter order. Restoring: every rank reads the
whole checkpoint and keeps its own stages' entries. So a pipeline checkpoint is the same file a
single process writes, and resumes under any layout.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

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


def gather_pipeline_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Tensors, list[dict[str, Any]]]:
    """As `gather_optimizer`: "<param>::<key>" tensors and the groups (parameter names in the full
    model's order), on rank 0; empty elsewhere."""
    info = pipeline_of(model)
    assert info is not None
    state = get_optimizer_state_dict(model, optimizer, options=_WHOLE)
    tensors = {
        f"{name}::{key}": value.detach().cpu().contiguous().clone()
        for name, param_state in state.get("state", {}).items() for key, value in param_state.items()
    }
    groups = [dict(g) for g in state.get("param_groups", [])]
    parts = _to_rank0((tensors, groups), info.representative)
    if parts is None:
        return {}, []
    order = _full_order(model)
    merged_tensors: Tensors = {}
    merged_groups: list[dict[str, Any]] = []
    for part_tensors, part_groups in parts:
        merged_tensors.update(part_tensors)
        # Every stage builds the same groups (matrices, vectors) with the same hyperparameters.
        for i, group in enumerate(part_groups):
            if i == len(merged_groups):
                merged_groups.append({**group, "params": []})
            merged_groups[i]["params"].extend(group["params"])
    for group in merged_groups:
        group["params"].sort(key=lambda name: order.get(name, len(order)))
    return merged_tensors, merged_groups


def own_names(model: nn.Module) -> set[str]:
    from plait.checkpoint import named_parameters

    return set(named_parameters(model))


def stage_model_tensors(model: nn.Module, tensors: Tensors) -> Tensors:
    """The entries of a whole-model state that this rank's stages hold."""
    mine = own_names(model)
    return {name: t for name, t in tensors.items() if name in mine}


def stage_optimizer_state(
    model: nn.Module, per_param: dict[str, dict[str, torch.Tensor]], groups: list[dict[str, Any]]
) -> tuple[dict[str, dict[str, torch.Tensor]], list[dict[str, Any]]]:
    """A whole optimizer state cut down to this rank's parameters."""
    mine = own_names(model)
    return (
        {name: s for name, s in per_param.items() if name in mine},
        [{**g, "params": [n for n in g["params"] if n in mine]} for g in groups],
    )
