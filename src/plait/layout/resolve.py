"""From a config's `[parallel]` and `[train]` keys to the `Layout` a job of N workers runs.

`resolve_layout` is the one place where the degrees' -1 fills the world, `parallel.zero_stage =
-1` (auto) becomes a stage, and the micro-batch is derived (`train.micro_batch_size`, or a rank's
whole share when that is smaller; under a pipeline, `parallel.pp_microbatches` or enough
micro-batches to fill it). It refuses, naming the key and the fix, what cannot be resolved (a
degree that is not a number, degrees that do not multiply to the workers); the rules of the
resolved layout are `plait.layout.rules`. The sections are duck-typed (anything with the
`[parallel]` and `[train]` attributes), so that this package does not import the config tree
that calls it.

Pure Python.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from plait.errors import ConfigError
from plait.layout.pipeline import pipeline_microbatches
from plait.layout.types import Layout, Workload

if TYPE_CHECKING:
    from plait.config import ParallelSection, TrainSection

# The [parallel] degrees that multiply to the world, in mesh order (outermost first), and the two
# that may be -1 (fill what the others leave of the world).
WORLD_DEGREES = ("pp_degree", "dp_replicate_degree", "dp_shard_degree", "cp_degree", "tp_degree")
FILLABLE = ("dp_replicate_degree", "dp_shard_degree")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def check_parallel_values(p: "ParallelSection") -> None:
    """The ranges of the [parallel] numbers, each on its own (how they relate is the rules')."""
    for key in WORLD_DEGREES:
        value = getattr(p, key)
        _require(value >= 1 or (value == -1 and key in FILLABLE),
                 f"parallel.{key} = {value} must be at least 1" + (", or -1 to fill the world" if key in FILLABLE else ""))
    _require(p.ep_degree >= 1, f"parallel.ep_degree = {p.ep_degree} must be at least 1")
    _require(p.zero_stage in (-1, 0, 1, 2, 3), f"parallel.zero_stage = {p.zero_stage} must be -1 (auto), 0, 1, 2 or 3")
    _require(p.pp_virtual_stages >= 1, f"parallel.pp_virtual_stages = {p.pp_virtual_stages} must be at least 1")
    _require(p.pp_microbatches >= 0,
             f"parallel.pp_microbatches = {p.pp_microbatches} must be >= 0 (0: derived from train.micro_batch_size)")


def fills_world(p: "ParallelSection") -> bool:
    """Whether a degree is -1: then the layout is known only with the job's number of workers."""
    return any(getattr(p, key) == -1 for key in FILLABLE)


def zero_stage_for(zero_stage: int, dp_shard: int) -> int:
    """-1 ("auto") is FSDP (3) over a shard axis of more than one rank, else 0 (no sharding)."""
    if zero_stage != -1:
        return zero_stage
    return 3 if dp_shard > 1 else 0


def world_degrees(p: "ParallelSection", world_size: int) -> dict[str, int]:
    """The [parallel] degrees with -1 filled for `world_size` workers; ConfigError if they do not fit."""
    fixed = {key: getattr(p, key) for key in WORLD_DEGREES}
    fills = [k for k, v in fixed.items() if v == -1]
    _require(len(fills) <= 1, f"only one degree may be -1, not {' and '.join('parallel.' + k for k in fills)}")
    known = math.prod(v for v in fixed.values() if v != -1)
    if fills:
        if world_size % known:
            raise ConfigError(
                f"parallel.{fills[0]} = -1 cannot fill {world_size} worker(s): the other degrees multiply to "
                f"{known}, which does not divide {world_size}"
            )
        fixed[fills[0]] = world_size // known
    world = math.prod(fixed.values())
    if world != world_size:
        product = " x ".join(f"{k.removesuffix('_degree')} {fixed[k]}" for k in WORLD_DEGREES if fixed[k] != 1) or "1"
        others = world // fixed["dp_replicate_degree"]
        raise ConfigError(
            f"the parallel degrees multiply to {product} = {world}, but the job has {world_size} "
            f"worker(s) (--nproc-per-node x --nnodes); they must be equal: for example "
            + (f"parallel.dp_shard_degree = -1 fills the world, or set parallel.dp_replicate_degree = {world_size // others}"
               if world_size % others == 0 else f"make pp x dp_replicate x dp_shard x cp x tp = {world_size}")
        )
    return fixed


def resolve_layout(p: "ParallelSection", t: "TrainSection", world_size: int, workload: Workload) -> Layout:
    """The layout `p` and `t` describe for a job of `world_size` workers (not yet checked against
    the rules: `plait.layout.rules.layout_problem`). Raises ConfigError when the degrees cannot
    be resolved, or when `parallel.pp_microbatches` does not divide a rank's sequences."""
    check_parallel_values(p)
    d = world_degrees(p, world_size)
    shard, dp = d["dp_shard_degree"], d["dp_replicate_degree"] * d["dp_shard_degree"]
    sequences = workload.global_batch_sequences
    # A rank's whole share when train.micro_batch_size is larger, so a config keeps working as
    # ranks are added; a share that does not split is the rules' to refuse.
    micro = min(t.micro_batch_size, max(1, sequences // dp))
    per_rank = sequences // dp if sequences % dp == 0 else None
    if d["pp_degree"] > 1 and per_rank is not None and (p.pp_microbatches > 0 or per_rank % micro == 0):
        m = pipeline_microbatches(p.pp_microbatches, per_rank, micro, d["pp_degree"])
        if per_rank % m:
            options = [k for k in range(d["pp_degree"], per_rank + 1) if per_rank % k == 0]
            raise ConfigError(
                f"parallel.pp_microbatches = {m} does not divide the {per_rank} sequences of a data-parallel rank's "
                f"step; pick one of {options}"
            )
        micro = per_rank // m
    return Layout(
        pp=d["pp_degree"], dp_replicate=d["dp_replicate_degree"], dp_shard=shard, cp=d["cp_degree"], tp=d["tp_degree"],
        ep=p.ep_degree, zero_stage=zero_stage_for(p.zero_stage, shard), sequence_parallel=p.sequence_parallel,
        micro_batch_size=micro, activation_checkpointing=t.activation_checkpointing, compile=t.compile,
        pp_schedule=p.pp_schedule, pp_virtual_stages=p.pp_virtual_stages, cp_method=p.cp_method,
        cpu_offload=p.cpu_offload, mixed_precision=p.mixed_precision,
    )
