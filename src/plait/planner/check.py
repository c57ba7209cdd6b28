"""What the planner refuses of a layout given from outside its search (`--layout` pins, API
users, `search.candidate()`): the rules `plait train` applies (`plait.layout.rules`, the same
sentence it prints), and two of the planner's own inputs: the layout's world must be the
cluster's GPUs, and FSDP's bf16 mixed precision needs a bf16 workload (the time model computes in
the workload's dtype). The estimators price any layout (bench/planner_published.py prices
Megatron's DDP under a pipeline, which plait refuses); `candidate()` checks first.

Pure Python, arithmetic only: it runs for every layout a search estimates.
"""

from __future__ import annotations

from typing import Any

from plait.hardware.devices import Cluster
from plait.layout import Layout, Workload, layout_problem


class PlanError(ValueError):
    """Bad planner input (pins, workload, cluster, layout), with the field, the value and the fix."""


def check_layout(workload: Workload, layout: Layout, cluster: Cluster | None = None) -> None:
    """Raise PlanError, naming the field, the value and the fix, when `plait train` would refuse
    `layout` for `workload`, or when its world is not `cluster`'s GPUs."""
    problem = planner_problem(workload, layout, cluster)
    if problem is not None:
        raise PlanError(f"layout {_describe(layout)}: {problem}")


def _describe(layout: Layout) -> str:
    try:
        return layout.short()
    except TypeError:  # a value of the wrong type (compared with a number): name it all
        return repr(layout)


def planner_problem(workload: Workload, layout: Layout, cluster: Cluster | None = None) -> str | None:
    """The first reason `check_layout` refuses `layout`, or None."""
    found = layout_problem(layout, workload)
    if found is not None:
        return found.message
    lay = layout
    if cluster is not None and lay.world != cluster.gpus:
        others = lay.world // lay.dp_shard
        fix = (f"e.g. dp_shard = {cluster.gpus // others}" if cluster.gpus % others == 0
               else f"make pp x dp_replicate x dp_shard x cp x tp = {cluster.gpus}")
        return (f"pp x dp_replicate x dp_shard x cp x tp = {lay.pp} x {lay.dp_replicate} x {lay.dp_shard} x "
                f"{lay.cp} x {lay.tp} = {lay.world} ranks, but the cluster has {cluster.gpus} GPU(s); {fix}")
    if lay.mixed_precision and workload.dtype != "bf16":
        return (f"parallel.mixed_precision = true computes in bf16, but the workload's dtype is {workload.dtype!r}; "
                f"set parallel.mixed_precision = false, or plan a bf16 workload")
    return None


def pinned_layout(workload: Workload, cluster: Cluster, pins: dict[str, Any]) -> Layout:
    """The layout `pins` describe (Layout field names, as `search.check_pins` returns them), the
    free degrees filled as `plait train` fills them: the data-parallel ranks take what the other
    degrees leave of the cluster, on the shard axis with ZeRO-3 unless the pins say otherwise.
    What `check_layout` can name a reason against when no layout of the search matches the pins."""
    fields = {k: v for k, v in pins.items() if k != "dp"}
    lay = Layout(**fields)
    ints = [lay.pp, lay.cp, lay.tp, lay.dp_replicate, lay.dp_shard, pins.get("dp", 1)]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in ints):
        return lay  # check_layout names the bad value
    inner = lay.pp * lay.cp * lay.tp
    dp = pins["dp"] if "dp" in pins else (cluster.gpus // inner if cluster.gpus % inner == 0 else 1)
    if "dp_replicate" in pins and "dp_shard" not in pins:
        lay = lay.replace(dp_shard=max(1, dp // lay.dp_replicate))
    elif "dp_shard" in pins and "dp_replicate" not in pins:
        lay = lay.replace(dp_replicate=max(1, dp // lay.dp_shard))
    elif "dp_shard" not in pins:
        lay = lay.replace(**({"dp_replicate": dp} if pins.get("zero_stage") == 0 else {"dp_shard": dp}))
    if "zero_stage" not in pins:
        lay = lay.replace(zero_stage=3 if lay.dp_shard > 1 else 0)
    if isinstance(lay.zero_stage, int):
        lay = lay.replace(mixed_precision=lay.zero_stage >= 2 and workload.dtype == "bf16")
    return lay
