"""The layout: how one training job is spread over its ranks, as plain data and rules.

- `types.py`: `Workload` (what is trained) and `Layout` (the resolved degrees, ZeRO stage,
  micro-batch and knobs), the one type the planner emits and `plait train` runs;
- `resolve.py`: `resolve_layout`, a config's `[parallel]`/`[train]` keys for N workers -> `Layout`
  (the -1 fill, the automatic ZeRO stage, the micro-batch derivation);
- `rules.py`: every composition rule, each once, as a `Problem` naming the field, the value and
  the fix (config validation, the planner and `plait.parallel` all call it);
- `pipeline.py`: the schedule names, the stage plan (which layers each stage holds) and the
  pipeline's micro-batch count.

Pure Python: no torch, no `plait.parallel`, no `plait.config` (which calls it). The modules
import each other directly; this file only re-exports the names used elsewhere.
"""

from plait.layout.pipeline import SCHEDULES, SINGLE_CHUNK_SCHEDULES, PipelinePlan, build_pipeline_plan
from plait.layout.resolve import resolve_layout
from plait.layout.rules import Problem, check_layout_rules, layout_problem
from plait.layout.types import CP_METHODS, Layout, Workload

__all__ = [
    "CP_METHODS", "SCHEDULES", "SINGLE_CHUNK_SCHEDULES", "Layout", "PipelinePlan", "Problem", "Workload",
    "build_pipeline_plan", "check_layout_rules", "layout_problem", "resolve_layout",
]
