"""The pipeline bubble, measured on CPU (gloo) next to the textbook fraction, per schedule.

For each pipeline (p ranks, m micro-batches, v chunks per rank) and schedule, every rank of a
torchrun job of this script (`--worker`) builds a Transformer, keeps its stages with plait's own
`split_for_rank`, and runs the schedule through plait's `Pipeline` (forward, backward, no
optimizer). It measures:
- step: the wall time of one schedule step (median of `--steps` after warm-up, all ranks started
  together by a barrier; the slowest rank's time);
- busy: the time a rank spends inside its stages' compute calls during that step (PyTorch's
  PipelineStage forward, backward and weight-gradient calls, timed by wrapping them; waiting
  and transfers fall outside, and so does the last stage's small cross-entropy), the busiest
  rank's (median over the steps);
- measured bubble = step / busy - 1, the idle (and transfer) time relative to the compute,
  the quantity PAPERS.md's formulas give: (p-1)/m for GPipe and 1F1B, (p-1)/(v m) interleaved.
  Zero-bubble schedules aim below the 1F1B figure by filling it with weight-gradient work.

Each rank needs its own core for the timings to mean anything: with more ranks than free cores
the ranks take turns and "bubble" includes that (the JSON records the core count). p2p transfers
over gloo (loopback TCP) count as bubble here; on GPUs they overlap with compute.

    python bench/pipeline_bubble.py [--pp 2] [--steps 5] [--json bench/out/pipeline_bubble.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (schedule, v, m) per pipeline size.
CASES = [
    ("gpipe", 1, 2), ("gpipe", 1, 4), ("gpipe", 1, 8),
    ("1f1b", 1, 2), ("1f1b", 1, 4), ("1f1b", 1, 8),
    ("interleaved-1f1b", 2, 2), ("interleaved-1f1b", 2, 4), ("interleaved-1f1b", 2, 8),
    ("zero-bubble", 1, 4), ("zero-bubble", 1, 8),
]
LAYERS, HIDDEN, SEQ_LEN, MICRO = 8, 128, 64, 4  # MICRO: sequences per micro-batch


def theory(schedule: str, p: int, m: int, v: int) -> float:
    return (p - 1) / ((v if schedule == "interleaved-1f1b" else 1) * m)


def _time_stage_work(stages, clock: list[float]) -> None:
    """Add the time each stage spends computing (forward, backward, weight-gradient calls of
    PyTorch's PipelineStage; transfers and waits happen outside them) to clock[0]."""

    def timed(fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock[0] += time.perf_counter() - t0

        return wrapper

    for stage in stages:
        for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
            if hasattr(stage, name):
                setattr(stage, name, timed(getattr(stage, name)))


def worker(steps: int, out_path: str) -> None:
    import torch
    import torch.distributed as dist

    from plait.config import Degrees
    from plait.model import ModelArgs, build_model, materialize
    from plait.parallel.mesh import build_layout
    from plait.parallel.pipeline_parallel import Pipeline, split_for_rank

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, p = dist.get_rank(), dist.get_world_size()
    layout = build_layout(Degrees(dp_replicate=1, dp_shard=1, tp=1, pp=p), torch.device("cpu"))
    vocab = 512
    args = ModelArgs(layers=LAYERS, hidden=HIDDEN, heads=4, kv_heads=4, vocab=vocab, ffn_hidden=4 * HIDDEN)
    rows = []
    for schedule, v, m in CASES:
        if LAYERS < p * v:
            continue
        model = materialize(build_model(args), "cpu", seed=0)
        split_for_rank(model, layout, v, SEQ_LEN)
        pipeline = Pipeline(model, schedule, m, torch.device("cpu"), tp=False)
        batch = torch.randint(0, vocab, (m * MICRO, SEQ_LEN + 1), generator=torch.Generator().manual_seed(1))
        clock = [0.0]
        _time_stage_work(pipeline.stages, clock)
        step_times, busy_times = [], []
        for i in range(steps + 2):  # two warm-up steps (shape inference, allocator)
            dist.barrier()
            clock[0] = 0.0
            t0 = time.perf_counter()
            pipeline.train_step(batch)
            dist.barrier()  # the step ends when the slowest rank is done
            elapsed = time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
            if i >= 2:
                step_times.append(elapsed)
                busy_times.append(clock[0])
        # The busiest rank (the critical path): its idle time is the bubble the schedule leaves.
        step = torch.tensor([statistics.median(step_times), statistics.median(busy_times)], dtype=torch.float64)
        dist.all_reduce(step, op=dist.ReduceOp.MAX)
        step_s, busy_s = step.tolist()
        rows.append({
            "pp": p, "schedule": schedule, "virtual_stages": v, "microbatches": m,
            "step_ms": 1e3 * step_s, "busy_ms": 1e3 * busy_s,
            "measured_bubble": step_s / busy_s - 1, "theory_bubble": theory(schedule, p, m, v),
            "stages": pipeline.info.plan.describe(),
        })
    if rank == 0:
        Path(out_path).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pp", type=int, nargs="+", default=[2], help="pipeline sizes (one torchrun job each)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case, after 2 warm-up steps")
    parser.add_argument("--json", default=str(ROOT / "bench" / "out" / "pipeline_bubble.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--part", default="", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        worker(a.steps, a.part)
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    rows = []
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    for p in a.pp:
        part = out.with_suffix(f".pp{p}.part")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={p}",
               __file__, "--worker", f"--steps={a.steps}", f"--part={part}"]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if res.returncode != 0:
            sys.exit(f"pp={p} failed:\n{res.stderr[-4000:]}")
        rows += json.loads(part.read_text())
        part.unlink()
    cores = len(os.sched_getaffinity(0))
    print(f"{LAYERS} layers x {HIDDEN} hidden, seq {SEQ_LEN}, {MICRO} sequences per micro-batch, fp32, gloo, {cores} cores")
    print(f"{'p':>2} {'schedule':<17} {'v':>2} {'m':>3} {'step ms':>9} {'busy ms':>9} {'bubble':>8} {'(p-1)/(vm)':>11}")
    for r in rows:
        print(f"{r['pp']:>2} {r['schedule']:<17} {r['virtual_stages']:>2} {r['microbatches']:>3} {r['step_ms']:>9.1f} "
              f"{r['busy_ms']:>9.1f} {r['measured_bubble']:>8.3f} {r['theory_bubble']:>11.3f}")
    out.write_text(json.dumps({"cores": cores, "layers": LAYERS, "hidden": HIDDEN, "seq_len": SEQ_LEN,
                               "micro_batch_sequences": MICRO, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
