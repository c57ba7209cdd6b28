"""Parameter groups, shared by every optimizer: weight decay on matrices only.

Norm weights (1-D) are not decayed: pulling a gain towards zero fights the normalisation it
scales. Embedding and projection matrices are decayed, as in GPT-2 and Llama training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from plait.config import OptimSection


def param_groups(model: nn.Module, cfg: OptimSection) -> list[dict[str, Any]]:
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
