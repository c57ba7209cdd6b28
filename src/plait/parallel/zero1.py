"""ZeRO-1: optimizer state sharded over the shard axis, gradients all-reduced in full.

PyTorch's `ZeroRedundancyOptimizer` does exactly this next to DDP: every rank keeps full
parameters and gets full averaged gradients from DDP, steps only its partition of the parameters
(so it holds only that partition's Adam moments), then broadcasts the updated partition. We use
it rather than FSDP2, which has no stage that shards optimizer state but not gradients. With
replicas (dp_replicate > 1), each replica group shards over its own shard axis.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.optim import ZeroRedundancyOptimizer

from plait.config import OptimSection
from plait.optim.adamw import param_groups


def build_zero1_optimizer(model: nn.Module, cfg: OptimSection, shard_mesh: DeviceMesh) -> ZeroRedundancyOptimizer:
    groups = param_groups(model, cfg)
    zero = ZeroRedundancyOptimizer(
        groups[0]["params"], optimizer_class=torch.optim.AdamW, process_group=shard_mesh.get_group(),
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=groups[0]["weight_decay"],
    )
    zero.add_param_group(groups[1])
    return zero
