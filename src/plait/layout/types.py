"""The two things a layout is about: `Workload` (what is trained) and `Layout` (how it is spread
over the ranks). The planner emits `Layout`s, `plait train` runs one; `resolve_layout`
(`plait.layout.resolve`) is the one function that turns a config's `[parallel]` and `[train]`
keys into a `Layout`, and `Layout.parallel_section()` / `train_section()` turn it back.

Pure Python (no torch): the planner builds millions of these on a laptop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

from plait.layout.pipeline import Schedule
from plait.model.sizes import ModelArgs

# Mesh axes whose degrees multiply to the world, outermost first (plait.parallel.mesh).
MESH_AXES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
# Context parallelism's attention, named once (the config's `parallel.cp_method` takes this type).
CpMethod = Literal["ring", "ulysses"]
CP_METHODS: tuple[str, ...] = get_args(CpMethod)


@dataclass(frozen=True)
class Workload:
    """What is trained: the model, the sequence length and the global batch, the precision and
    the optimizer. `model.vocab` may be None before the tokenizer is loaded (config validation):
    the vocabulary will then be padded up to `vocab_multiple`."""

    model: ModelArgs
    seq_len: int
    global_batch_sequences: int
    dtype: Literal["bf16", "fp32"] = "bf16"
    optimizer: str = "adamw"
    vocab_multiple: int | None = None

    @property
    def global_batch_tokens(self) -> int:
        return self.global_batch_sequences * self.seq_len


@dataclass(frozen=True)
class Layout:
    """One way to run the workload, resolved: every degree a number, the ZeRO stage decided.

    The world is pp x dp_replicate x dp_shard x cp x tp; ep takes ranks of dp_shard x cp.
    `micro_batch_size` is the sequences of one forward on a data-parallel rank (the pipeline's
    micro-batches are the same), so accumulation (or pipeline micro-batches) = global / (dp x
    micro_batch_size). `compile` is the user's `train.compile`: the planner does not choose it,
    but rules refuse what it does not compose with."""

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
    compile: bool = False
    pp_schedule: Schedule = "1f1b"
    pp_virtual_stages: int = 1
    cp_method: CpMethod = "ring"
    cpu_offload: bool = False
    # FSDP2 mixed precision (bf16 compute copies of fp32 sharded parameters): ZeRO-2/3 only, as
    # in `[parallel]`. Off by default, like `parallel.mixed_precision`; unsharded bf16 layouts
    # compute under autocast.
    mixed_precision: bool = False

    @property
    def dp(self) -> int:
        """Data-parallel ranks: how many ways the global batch is split."""
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
        """The `[train]` keys a layout fixes (the rest of `[train]`, `compile` included, is the user's)."""
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
        if self.compile:
            parts.append("compile")
        return " ".join(parts)

    def replace(self, **changes: Any) -> "Layout":
        return dataclasses.replace(self, **changes)
