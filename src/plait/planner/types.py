"""The planner's answers: a layout's estimated memory and step time, and a `Candidate` (a layout
with its estimates and the numbers users compare).

Pure Python (no torch): the planner answers for 16,384 GPUs on a laptop. What it plans is a
`plait.layout.Workload` on the cluster of `plait.hardware` (`Cluster`, `Device`, `Link`: a GPU
table, flags or a TOML profile, `plait plan --calibrate`), and what it emits are
`plait.layout.Layout`s, the type `plait train` runs. `memory.py` estimates a layout's bytes per GPU
(and per node of host memory); `timing.py` its step time; `check.py` refuses a layout `plait
train` would refuse (through `plait.layout.rules`) or that does not match the cluster;
`search.py` enumerates layouts, drops those that do not fit and ranks the rest; `explain.py`
prints and serialises the answer.

Units: bytes, seconds, FLOP/s; bandwidth is bytes/s per GPU in one direction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from plait.layout import Layout


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
