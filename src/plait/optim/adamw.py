"""AdamW (Loshchilov and Hutter, "Decoupled Weight Decay Regularization"): PyTorch's, as a spec."""

from __future__ import annotations

from typing import TYPE_CHECKING

from plait.optim.spec import OptimizerSpec, ParamGroups

if TYPE_CHECKING:
    import torch

    from plait.config import OptimSection


def build_adamw(groups: ParamGroups, cfg: OptimSection, foreach: bool) -> torch.optim.Optimizer:
    import torch

    # foreach=True: one kernel per group of tensors instead of one per tensor, which on a small
    # model is most of the optimizer's cost. The learning rate is set every step by the loop.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=foreach)


ADAMW = OptimizerSpec(
    name="adamw",
    build=build_adamw,
    elementwise=True,
    state_bytes_per_param=8,  # exp_avg and exp_avg_sq, fp32 like the parameters
    description="Adam with decoupled weight decay; two moments per element",
)
