"""ZeRO-2 and ZeRO-3 with FSDP2 (`fully_shard`), on one shard axis or replicate x shard (HSDP).

Each transformer block is its own FSDP unit (one all-gather per block in forward, one
reduce-scatter per block in backward, overlapped with the neighbours' compute), and the root
unit holds the embedding, final norm and output head. ZeRO-3 frees a block's gathered
parameters after its forward and gathers them again in backward (1.5x the traffic of data
parallel, 1/N of the parameter memory); ZeRO-2 keeps them until backward (no second gather,
parameters resident during the step, gradients and optimizer state still sharded).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard


def apply_fully_shard(
    model: nn.Module, dp_mesh: DeviceMesh, zero_stage: int, mixed_precision: bool, cpu_offload: bool
) -> None:
    assert zero_stage in (2, 3)
    kwargs: dict = {"mesh": dp_mesh, "reshard_after_forward": zero_stage == 3}
    if mixed_precision:
        # bf16 compute copies of the parameters; gradients reduced in fp32 so the sum over ranks
        # does not lose the small contributions.
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        # pin_memory needs an accelerator; on a CPU-only host it must be off.
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for block in model.layers.values():
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
