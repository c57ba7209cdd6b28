"""Check the planner's time model on this machine: train layouts for a few steps, compare rankings.

`measure_step_time` runs `plait train --nproc-per-node N` on one layout (the same `[parallel]`
and `[train]` keys `plait plan --write` emits) for a few steps and returns the median seconds per
optimizer step after the warm-up steps, read from the run's metrics.jsonl. `spearman` is the
rank correlation of the predicted and measured step times (ties take their average rank).
`bench/planner_ranking.py` and `tests/dist/test_planner_ranking.py` use both.

Imports no torch: the training runs in child processes.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from plait.config import override_args
from plait.layout import Layout, Workload

# Keys that keep a short measuring run quiet and free of anything but training steps.
QUIET = ["--train.log_every=1", "--train.eval_every=0", "--train.sample_tokens=0", "--checkpoint.every=0",
         "--checkpoint.save_final=false", "--run.progress=none", "--run.tensorboard=false"]


def layout_overrides(layout: Layout, workload: Workload) -> list[str]:
    """`plait train` overrides that run `layout` on `workload` (sequence length and batch too)."""
    values: dict[str, Any] = {f"parallel.{key}": value for key, value in layout.parallel_section().items()}
    values.update({f"train.{key}": value for key, value in layout.train_section().items()})
    values.update({"train.seq_len": workload.seq_len, "train.global_batch_tokens": workload.global_batch_tokens})
    return override_args(values)


def measure_step_time(layout: Layout, workload: Workload, run_dir: Path, base: list[str], *,
                      steps: int = 6, warmup: int = 2, timeout: float = 600) -> dict[str, Any]:
    """Train `layout` for `steps` steps on `layout.world` CPU workers; return the median step time
    of the steps after `warmup` (and every step's), or raise RuntimeError with the run's output.
    `base` holds the model and data keys (e.g. ["--model.name=tiny", "--train.dtype=fp32"])."""
    if steps <= warmup:
        raise ValueError(f"steps = {steps} must exceed warmup = {warmup}")
    launch = ["--nproc-per-node", str(layout.world)] if layout.world > 1 else []
    args = ["train", *launch, *base, *QUIET, f"--train.steps={steps}", f"--run.dir={run_dir}",
            *layout_overrides(layout, workload)]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")]))
    if layout.world == 1:
        env["OMP_NUM_THREADS"] = "1"  # as torchrun gives each of several workers: one core per rank
    out = subprocess.run([sys.executable, "-m", "plait", *args], capture_output=True, text=True, env=env, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"plait {' '.join(args)} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    times = [workload.global_batch_tokens / r["tokens_per_s"] for r in train]
    if len(times) != steps:
        raise RuntimeError(f"expected {steps} logged steps in {run_dir}/metrics.jsonl, found {len(times)}")
    return {"step_s": statistics.median(times[warmup:]), "steps_s": times}


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation: the Pearson correlation of the ranks (ties averaged)."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"need two lists of equal length >= 2, got {len(xs)} and {len(ys)}")
    rx, ry = ranks(list(xs)), ranks(list(ys))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        raise ValueError("a list with all values equal has no ranking")
    return cov / (vx * vy) ** 0.5
