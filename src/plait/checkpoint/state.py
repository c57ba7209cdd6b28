"""Whole (unsharded) model and optimizer state, gathered from and scattered to any layout.

Checkpoints hold full tensors keyed by parameter name, so they do not depend on the layout that
wrote them. Gathering uses PyTorch's distributed state-dict helpers (which strip wrapper names
and assemble FSDP/DTensor shards) and lands on rank 0 in CPU memory; loading gives every rank the
full tensors and lets the same helpers keep each rank's shard. ZeRO-1's optimizer
(`plait.parallel.zero1`) keeps its state in flat per-rank slices and converts it to and from the
same per-parameter tensors itself. (Sharded checkpoints written by every
rank in parallel are a later step; this gathers, so it suits models that fit in host memory.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from plait.parallel.zero1 import Zero1AdamW

from plait.checkpoint.pipeline_state import (
    gather_pipeline_model,
    gather_pipeline_optimizer,
    is_pipelined,
    stage_model_tensors,
    stage_optimizer_state,
)

Tensors = dict[str, torch.Tensor]


def _options(distributed: bool) -> StateDictOptions:
    # full_state_dict assembles DTensor shards; only rank 0 keeps the result, on the CPU.
    return StateDictOptions(full_state_dict=distributed, cpu_offload=distributed)


def gather_model(model: nn.Module, distributed: bool) -> Tensors:
    if is_pipelined(model):  # each stage's ranks hold part of the model: merged on rank 0
        return gather_pipeline_model(model)
    state = get_model_state_dict(model, options=_options(distributed))
    return {name: t.detach().contiguous().clone() for name, t in state.items()}


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in its own (group, position) order."""
    from plait.checkpoint import named_parameters

    by_id = {id(p): name for name, p in named_parameters(model).items()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def gather_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, distributed: bool, is_main: bool) -> tuple[Tensors, list[dict[str, Any]]]:
    """Optimizer state as "<param>::<key>" tensors plus the groups' hyperparameters (with the
    names of their parameters), on rank 0; empty elsewhere."""
    if is_pipelined(model):
        return gather_pipeline_optimizer(model, optimizer)
    if isinstance(optimizer, Zero1AdamW):
        return optimizer.gather_full_state(_param_names(model, optimizer), keep=is_main)
    state = get_optimizer_state_dict(model, optimizer, options=_options(distributed))
    # With full_state_dict + cpu_offload only rank 0 receives anything; the others get {}.
    tensors = {
        f"{name}::{key}": value.detach().cpu().contiguous().clone()
        for name, param_state in state.get("state", {}).items() for key, value in param_state.items()
    }
    return tensors, [dict(g) for g in state.get("param_groups", [])]


def scatter_model(model: nn.Module, tensors: Tensors, distributed: bool) -> None:
    if is_pipelined(model):  # this rank's stages take their own entries of the whole state
        tensors = stage_model_tensors(model, tensors)
    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=distributed))


def scatter_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, tensors: Tensors, groups: list[dict[str, Any]], distributed: bool) -> None:
    per_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, field = key.split("::", 1)
        per_param.setdefault(name, {})[field] = value
    if is_pipelined(model):
        per_param, groups = stage_optimizer_state(model, per_param, groups)
    if isinstance(optimizer, Zero1AdamW):
        optimizer.load_full_state(per_param, groups, _param_names(model, optimizer))
        return
    set_optimizer_state_dict(
        model, optimizer, {"state": per_param, "param_groups": groups},
        options=StateDictOptions(full_state_dict=distributed),
    )


def restore_checkpoint(
    path, model: nn.Module, optimizer: torch.optim.Optimizer, distributed: bool, expected_shapes: dict[str, torch.Size]
) -> dict[str, Any]:
    """Load a checkpoint into a model and optimizer of any layout; return its JSON state.
    `expected_shapes` are the unsharded model's (from a meta-device copy). Raises ValueError,
    naming the parameters, when the checkpoint is of a different model."""
    from plait.checkpoint import check_model_tensors, read_state, read_tensors, restore_rng

    state = read_state(path)
    tensors = read_tensors(path, "model")
    check_model_tensors(path, tensors, expected_shapes)
    scatter_model(model, tensors, distributed)
    if state.get("weights_only"):
        # An imported model (`plait convert --from-hf`): the optimizer, the RNG and the data
        # position start fresh; state["loader"] is None.
        return state
    scatter_optimizer(model, optimizer, read_tensors(path, "optimizer"), state["optimizer_groups"], distributed)
    restore_rng(path)
    return state
