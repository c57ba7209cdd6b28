"""Validation loss of a pipeline-parallel run: on a gathered copy of the model on rank 0.

Each stage holds part of the model, so no rank can run `evaluate` on its own module. The simple
correct choice: gather the whole weights onto rank 0 (the checkpoint path, a collective), evaluate
there in one process, and broadcast the number so every rank returns the same value. It costs a
whole model's memory on rank 0 during evaluation, as the end-of-run sample already does.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from plait.checkpoint.state import gather_model
from plait.config import Config
from plait.model import ModelArgs, build_model, materialize


def evaluate_gathered(model: nn.Module, args: ModelArgs, val_tokens, cfg: Config, device: torch.device, dtype: str, is_main: bool) -> float:
    from plait.trainer.loop import evaluate

    tensors = gather_model(model, True)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    if is_main:
        plain = materialize(build_model(args), device, cfg.run.seed)
        plain.load_state_dict(tensors)
        # The gathered copy is a plain model: no vocabulary-sharded loss.
        single = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, tp_degree=1))
        loss.fill_(evaluate(plain, val_tokens, single, device, dtype))
    dist.broadcast(loss, src=0)
    return loss.item()
