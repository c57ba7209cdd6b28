"""AdamW with decoupled weight decay on matrices only.

Norm weights (1-D) are not decayed: pulling a gain towards zero fights the normalisation it
scales. Embedding and projection matrices are decayed, as in GPT-2 and Llama training.
"""

from __future__ import annotations

import torch
from torch import nn

from plait.config import OptimSection


def param_groups(model: nn.Module, cfg: OptimSection) -> list[dict]:
    """Two groups: matrices (decayed) and vectors (not)."""
    decay, no_decay = [], []
    for param in model.parameters():  # de-duplicated: a tied weight appears once
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimSection, foreach: bool = True) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    # foreach=True: one kernel per group of tensors instead of one per tensor, which on a small
    # model is most of the optimizer's cost. The learning rate is set every step by the loop.
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=foreach
    )
