"""Training throughput of 1, 2 and 4 CPU workers under DDP and ZeRO-3 (informational on small machines).

Each layout is one `plait train` job: the single process as `python -m plait train`, the others
through `python -m plait train --nproc-per-node N` (torchrun, gloo on CPU workers):
  single         1 worker
  ddp x2, x4     --parallel.dp_replicate_degree=N
  zero3 x2, x4   --parallel.dp_shard_degree=N --parallel.zero_stage=3
Every job trains the same model (default `tiny`, fp32, `--train.device=cpu`) for the same steps
on the same global batch (`train.global_batch_tokens` is the batch of the whole job, split over
the data-parallel ranks), with evaluation, checkpoints and sampling off, so every layout does the
same work. Throughput is the job's: plait logs tokens/s (global tokens / wall time) once per
`--log-every` steps window to metrics.jsonl; the first `--warmup-windows` windows are dropped
(lazy initialisation of DDP buckets and FSDP, allocator warm-up) and the median of the rest is
reported. Speed-up = tokens/s / single-process tokens/s; efficiency = speed-up / workers.

Threads: the workers share the cores this process may use. Each worker gets
OMP_NUM_THREADS = max(1, cores // N) (torch's intra-op pool follows it), so N workers together
ask for as many threads as the single process has. With more workers than cores (4 workers on a
2-core machine) each worker still has one thread and the cores are oversubscribed: those rows
measure the cost of sharing a small machine, not scaling.

The machine's 1-minute load average before each job goes into the JSON: other work on the
machine shows there, and throughput measured next to it is not the layout's.

Prints a table and writes a JSON list with one object per layout (default bench/out/scaling.json).

    python bench/scaling.py [--model tiny] [--steps 12] [--log-every 2] [--warmup-windows 2]
                            [--global-batch-tokens 8192] [--seq-len 256] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import plait

# name -> (workers, overrides)
LAYOUTS: dict[str, tuple[int, list[str]]] = {
    "single": (1, []),
    "ddp x2": (2, ["--parallel.dp_replicate_degree=2"]),
    "ddp x4": (4, ["--parallel.dp_replicate_degree=4"]),
    "zero3 x2": (2, ["--parallel.dp_shard_degree=2", "--parallel.zero_stage=3"]),
    "zero3 x4": (4, ["--parallel.dp_shard_degree=4", "--parallel.zero_stage=3"]),
}


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def run_layout(workers: int, overrides: list[str], base: list[str], run_dir: Path, threads: int) -> tuple[list[float], float]:
    """Train one layout; return its logged tokens/s per window and the job's wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(Path(plait.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)  # a job of its own, even when this script runs inside one
    launch = ["--nproc-per-node", str(workers)] if workers > 1 else []
    cmd = [sys.executable, "-m", "plait", "train", *launch, *base, f"--run.dir={run_dir}", *overrides]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["tokens_per_s"] for x in lines if x["kind"] == "train"], wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--log-every", type=int, default=2, help="steps per throughput window")
    parser.add_argument("--warmup-windows", type=int, default=2, help="windows dropped at the start of each job")
    parser.add_argument("--global-batch-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--json", default="bench/out/scaling.json")
    a = parser.parse_args()
    if a.steps // a.log_every <= a.warmup_windows:
        parser.error(f"--steps {a.steps} gives {a.steps // a.log_every} windows of {a.log_every} steps; "
                     f"more than --warmup-windows {a.warmup_windows} are needed")

    cores = usable_cores()
    base = [f"--model.name={a.model}", f"--train.steps={a.steps}", f"--train.log_every={a.log_every}",
            f"--train.seq_len={a.seq_len}", f"--train.global_batch_tokens={a.global_batch_tokens}",
            "--train.eval_every=0", "--train.sample_tokens=0", "--checkpoint.every=0",
            "--checkpoint.save_final=false", "--run.progress=none", "--run.tensorboard=false",
            "--train.device=cpu", "--train.dtype=fp32"]
    print(f"{a.model}, fp32, {a.global_batch_tokens} tokens/step (seq_len {a.seq_len}), {a.steps} steps, "
          f"median of {a.log_every}-step windows after the first {a.warmup_windows}; {cores} cores, torch {torch.__version__}")
    print(f"{'layout':<10}{'workers':>8}{'threads':>8}{'tokens/s':>10}{'speed-up':>10}{'efficiency':>11}{'wall s':>8}")
    rows: list[dict] = []
    single_rate = None
    with tempfile.TemporaryDirectory(prefix="plait-scaling-") as tmp:
        for name, (workers, overrides) in LAYOUTS.items():
            threads = max(1, cores // workers)
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            try:
                windows, wall = run_layout(workers, overrides, base, Path(tmp) / name.replace(" ", "-"), threads)
            except RuntimeError as err:
                print(f"{name}: {err}")
                return 1
            rate = statistics.median(windows[a.warmup_windows:])
            if single_rate is None:
                single_rate = rate  # the first layout is the single process
            speedup = rate / single_rate
            print(f"{name:<10}{workers:>8}{threads:>8}{rate:>10,.0f}{speedup:>10.2f}{speedup / workers:>11.2f}{wall:>8.0f}")
            rows.append({
                "benchmark": "scaling", "layout": name, "workers": workers, "threads_per_worker": threads,
                "tokens_per_s": rate, "speedup": speedup, "efficiency": speedup / workers,
                "window_tokens_per_s": windows, "warmup_windows": a.warmup_windows, "wall_s": wall,
                "load_average_before": load,
                "overrides": overrides, "model": a.model, "steps": a.steps, "log_every": a.log_every,
                "global_batch_tokens": a.global_batch_tokens, "seq_len": a.seq_len, "cores": cores,
                "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
            })
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(rows, indent=1))
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
