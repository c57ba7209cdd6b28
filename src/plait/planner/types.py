"""The planner's vocabulary: the workload, a layout, and the estimates.

Pure Python (no torch): the planner answers for 16,384 GPUs on a laptop. The cluster it plans for
(`Cluster`, `Device`, `Link`: a GPU table, flags or a TOML profile, `plait plan --calibrate`) is
`plait.hardware`'s; `memory.py` estimates a layout's bytes per GPU (and per node of host memory);
`timing.py` its step time; `rules.py` refuses a layout `plait train` would refuse; `search.py`
enumerates layouts, drops those that do not fit and ranks the rest; `explain.py` prints and
serialises the answer.

Units: bytes, seconds, FLOP/s; bandwidth is bytes/s per GPU in one direction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from plait.model.sizes import ModelArgs


@dataclass(frozen=True)
class Workload:
    """What is trained: the model, the sequence length and the global batch, the precision."""

    model: ModelArgs  # vocab must be set (an int)
    seq_len: int
    global_batch_sequences: int
    dtype: Literal["bf16", "fp32"] = "bf16"
    optimizer: Literal["adamw"] = "adamw"

    @property
    def global_batch_tokens(self) -> int:
        return self.global_batch_sequences * self.seq_len


@dataclass(frozen=True)
class Layout:
    """One way to run the workload: the degrees and the knobs of `[parallel]` and `[train]`.

    The world is pp x dp_replicate x dp_shard x cp x tp; ep takes ranks of dp_shard x cp.
    `micro_batch_size` is sequences per forward per data-parallel rank (pipeline micro-batches
    are the same), so accumulation (or pipeline micro-batches) = global / (dp x micro_batch_size)."""

    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    ep: int = 1
    zero_stage: int = 0  # 0..3; ZeRO applies over dp_shard
    sequence_parallel: bool = False
    micro_batch_size: int = 1
    activation_checkpointing: bool = False
    pp_schedule: Literal["gpipe", "1f1b", "interleaved-1f1b", "zero-bubble"] = "1f1b"
    pp_virtual_stages: int = 1
    cp_method: Literal["ring", "ulysses"] = "ring"
    cpu_offload: bool = False
    # FSDP2 mixed precision (bf16 compute copies of fp32 sharded parameters): ZeRO-2/3 only, as
    # in `[parallel]`. Off by default, like `parallel.mixed_precision`; unsharded bf16 layouts
    # compute under autocast, which the estimates follow from `Workload.dtype`.
    mixed_precision: bool = False

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp

    def microbatches(self, workload: Workload) -> int:
        """Micro-batches per step per data-parallel rank (accumulation or pipeline)."""
        return workload.global_batch_sequences // (self.dp * self.micro_batch_size)

    def parallel_section(self) -> dict[str, Any]:
        """The `[parallel]` table `plait train --config` reads."""
        return {
            "dp_replicate_degree": self.dp_replicate, "dp_shard_degree": self.dp_shard,
            "zero_stage": self.zero_stage, "tp_degree": self.tp, "sequence_parallel": self.sequence_parallel,
            "mixed_precision": self.mixed_precision, "cpu_offload": self.cpu_offload, "pp_degree": self.pp,
            "pp_schedule": self.pp_schedule, "pp_microbatches": 0, "pp_virtual_stages": self.pp_virtual_stages,
            "cp_degree": self.cp, "cp_method": self.cp_method, "ep_degree": self.ep,
        }

    def train_section(self) -> dict[str, Any]:
        """The `[train]` keys a layout fixes (the rest of `[train]` is the user's)."""
        return {"micro_batch_size": self.micro_batch_size, "activation_checkpointing": self.activation_checkpointing}

    def short(self) -> str:
        """e.g. "tp8 pp4 dp16(z1) mb1 ac" (degrees of 1 left out)."""
        parts = [f"{name}{value}" for name, value in (("tp", self.tp), ("pp", self.pp), ("cp", self.cp), ("ep", self.ep)) if value > 1]
        if self.dp > 1:
            dp = f"dp{self.dp_shard}(z{self.zero_stage})" if self.dp_replicate == 1 else f"dp{self.dp_replicate}x{self.dp_shard}(z{self.zero_stage})"
            parts.append(dp)
        parts.append(f"mb{self.micro_batch_size}")
        if self.activation_checkpointing:
            parts.append("ac")
        if self.sequence_parallel:
            parts.append("sp")
        if self.pp > 1:
            parts.append(self.pp_schedule + (f"/v{self.pp_virtual_stages}" if self.pp_virtual_stages > 1 else ""))
        if self.cp > 1:
            parts.append(self.cp_method)
        if self.cpu_offload:
            parts.append("offload")
        return " ".join(parts)

    def replace(self, **changes: Any) -> "Layout":
        return dataclasses.replace(self, **changes)


@dataclass
class MemoryEstimate:
    """Bytes per GPU of the most loaded rank, by part. Parts (keys): "parameters", "gradients",
    "optimizer", "activations", "pipeline_inflight", "moe_buffers", "comm_buffers",
    "fragmentation" (others may be added); `total` is their sum.

    `host` holds what a rank keeps in the node's host memory instead (CPU offload: its
    "parameters", "gradients" and "optimizer" shards), not counted in `total`; `host_total` is
    their sum (`estimate_memory` reports here the pipeline stage with the most host bytes, which
    may be another stage than that of `parts`). Whether both fit, the host per node, is
    `plait.planner.memory.memory_fits`."""

    parts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # assumptions worth printing
    host: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())


@dataclass
class TimeEstimate:
    """Seconds per optimizer step, by part. `parts` holds "compute" (forward + backward at the
    sustained rate), "recompute", one entry per collective ("tp_allreduce", "dp_reduce_scatter",
    ...) counting only its exposed (not overlapped) time, and "pipeline_bubble"; `step_s` is
    their sum. `collectives` holds each collective's full time before overlap, for the explanation."""

    parts: dict[str, float] = field(default_factory=dict)
    collectives: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def step_s(self) -> float:
        return sum(self.parts.values())


@dataclass
class Candidate:
    """A layout with its estimates and the numbers users compare."""

    layout: Layout
    memory: MemoryEstimate
    time: TimeEstimate
    tokens_per_s_per_gpu: float
    tflops_per_gpu: float
    mfu: float
    fits: bool
