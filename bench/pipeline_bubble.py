"""The pipeline bubble, measured on CPU (gloo) next to the textbook fraction, per schedule.

For each pipeline (p ranks, m micro-batches, v chunks per rank) and schedule, every rank of a
torchrun job of this script (`--worker`) builds a Transformer, keeps its stages with plait's own
`split_for_rank`, and runs the schedule through plait's `Pipeline` (forward, backward, no
optimizer): PyTorch's schedule (`torch.distributed.pipelining`) with its real point-to-point
transfers in its real order. It measures:
- step: the wall time of one schedule step (median of `--steps` after warm-up, all ranks started
  together by a barrier; the slowest rank's time);
- busy: the time a rank spends inside its stages' compute calls during that step (PyTorch's
  PipelineStage forward, backward and weight-gradient calls, timed by wrapping them; waiting
  and transfers fall outside, and so does the last stage's small cross-entropy), the busiest
  rank's (median over the steps);
- measured bubble = step / busy - 1, the idle (and transfer) time relative to the compute,
  the quantity PAPERS.md's formulas give: (p-1)/m for GPipe and 1F1B, (p-1)/(v m) interleaved.
  Zero-bubble schedules aim below the 1F1B figure by filling it with weight-gradient work;
- scheduled bubble: the same ratio for the order of compute calls each rank really made in the
  step (recorded by the same wrappers), replayed with fixed costs F = t, B = 2t, I = W = t per
  micro-batch and rank (t / v per chunk) and transfers that take no time: the bubble the
  schedule's structure leaves, without any runtime cost. It equals the formula for GPipe, 1F1B
  and interleaved 1F1B; for zero-bubble it is the figure to hold the measurement against. The
  costs are those of the sleep mode below; under real compute they are an assumption;
- excess: step - (1 + scheduled bubble) x busy, the time per step beyond what the schedule's
  structure explains: transfers, the runtime's own work between compute calls, the loss, the
  closing barrier, and the real work of one rank delaying another.

Two stage costs (`--stage-cost`):
- compute (the default): the stages run the real model (8 layers x 128 hidden, seq 64, 4
  sequences per micro-batch, fp32). Each rank needs its own core for the timings to mean
  anything: with more ranks than free cores the ranks take turns and "bubble" includes that (the
  JSON records the core count).
- sleep: every compute call does its real work on a tiny model (one layer of hidden 16 per stage,
  seq 16, one sequence per micro-batch: 1-2 ms per call, most of it PyTorch's own overhead) and
  then sleeps a fixed time: forward t, backward 2t where input and weight gradients are one call
  (GPipe, 1F1B, interleaved 1F1B), and t each for the input-gradient and the weight-gradient
  calls of the zero-bubble schedule; each chunk of an interleaved rank sleeps t / v, so every
  schedule does 3 t of sleep per micro-batch on every rank (`--sleep-ms` = t). busy includes the
  real work ("real ms", reported apart). Sleeping ranks do not compete for the cores, so p = 4
  runs on a 2-core machine and the bubble reflects the schedule's structure, plus what the
  runtime costs (the excess): PyTorch's bookkeeping between calls, the real work's short bursts
  when ranks do meet on a core, and the p2p transfers over gloo (loopback TCP), whose latency
  counts as bubble here (on GPUs with NCCL they overlap with compute). The excess is a cost per
  step, not per t: a larger t shrinks its share.

    python bench/pipeline_bubble.py [--pp 2] [--steps 5] [--json bench/out/pipeline_bubble.json]
    python bench/pipeline_bubble.py --stage-cost sleep --pp 2 4 [--microbatches 4 8 16] [--sleep-ms 20]
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
SCHEDULES = (("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("zero-bubble", 1))  # (schedule, v)
# compute mode: (schedule, v, m) per pipeline size.
CASES = [
    ("gpipe", 1, 2), ("gpipe", 1, 4), ("gpipe", 1, 8),
    ("1f1b", 1, 2), ("1f1b", 1, 4), ("1f1b", 1, 8),
    ("interleaved-1f1b", 2, 2), ("interleaved-1f1b", 2, 4), ("interleaved-1f1b", 2, 8),
    ("zero-bubble", 1, 4), ("zero-bubble", 1, 8),
]
# (layers, hidden, seq_len, sequences per micro-batch) of the model each mode runs
# (layers None: one per stage)
MODEL = {"compute": (8, 128, 64, 4), "sleep": (None, 16, 16, 1)}
# Sleep of each kind of compute call, in units of t: forward, full backward (input and weight
# gradients in one call), input gradient only, weight gradient.
SLEEP_UNITS = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}


def theory(schedule: str, p: int, m: int, v: int) -> float:
    return (p - 1) / ((v if schedule == "interleaved-1f1b" else 1) * m)


def _instrument(stages, clock: list[float], calls: list, sleep_s: float) -> None:
    """Wrap each stage's forward, backward and weight-gradient calls of PyTorch's PipelineStage
    (transfers and waits happen outside them): add the time spent inside to clock[0], the real
    work alone to clock[1], record (kind, stage, micro-batch) in `calls`, and with `sleep_s` > 0
    sleep SLEEP_UNITS[kind] x sleep_s after the real work."""

    def wrap(stage, name: str):
        fn = getattr(stage, name)

        def wrapper(*args, **kwargs):
            if name == "forward_one_chunk":
                kind = "F"
            elif name == "backward_weight_one_chunk":
                kind = "W"
            else:  # backward_one_chunk(bwd_chunk_id, loss=None, full_backward=True, last_backward=False)
                kind = "B" if kwargs.get("full_backward", args[2] if len(args) > 2 else True) else "I"
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                t1 = time.perf_counter()
                if sleep_s > 0:
                    time.sleep(SLEEP_UNITS[kind] * sleep_s)
                clock[0] += time.perf_counter() - t0
                clock[1] += t1 - t0
                calls.append((kind, stage.stage_index, args[0]))

        return wrapper

    for stage in stages:
        for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
            if hasattr(stage, name):
                setattr(stage, name, wrap(stage, name))


def scheduled_bubble(calls_per_rank: list[list], num_stages: int, v: int) -> float:
    """Replay each rank's recorded calls in their order with costs SLEEP_UNITS / v and transfers
    that take no time; return (step / busiest rank's work) - 1.

    A call waits for its rank's previous call and for its inputs: a forward for the previous
    stage's forward of the micro-batch, a backward (B or I) for the next stage's backward of
    it and its own forward, a weight gradient for its input gradient."""
    done: dict[tuple, float] = {}
    free = [0.0] * len(calls_per_rank)
    pos = [0] * len(calls_per_rank)
    remaining = sum(len(c) for c in calls_per_rank)
    while remaining:
        progressed = False
        for r, calls in enumerate(calls_per_rank):
            while pos[r] < len(calls):
                kind, s, mb = calls[pos[r]]
                if kind == "F":
                    deps = [("F", s - 1, mb)] if s > 0 else []
                elif kind == "W":
                    deps = [("I", s, mb)]
                else:  # the gradient from the next stage comes from its B or its I
                    deps = [("F", s, mb)]
                    if s < num_stages - 1:
                        deps.append(("I", s + 1, mb) if ("I", s + 1, mb) in done else ("B", s + 1, mb))
                if any(d not in done for d in deps):
                    break
                start = max([free[r]] + [done[d] for d in deps])
                free[r] = done[(kind, s, mb)] = start + SLEEP_UNITS[kind] / v
                pos[r] += 1
                remaining -= 1
                progressed = True
        assert progressed, "the recorded calls wait on each other (not a valid schedule order)"
    busy = max(sum(SLEEP_UNITS[k] / v for k, _, _ in calls) for calls in calls_per_rank)
    return max(free) / busy - 1


def worker(steps: int, out_path: str, stage_cost: str, sleep_ms: float, microbatches: list[int]) -> None:
    import torch
    import torch.distributed as dist

    from plait.layout import Layout
    from plait.model import ModelArgs, build_model, materialize
    from plait.parallel.mesh import build_mesh
    from plait.parallel.pipeline_parallel import Pipeline, split_for_rank

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, p = dist.get_rank(), dist.get_world_size()
    meshes: dict = {}  # one mesh per number of virtual stages (the layout carries it)
    layers, hidden, seq_len, micro = MODEL[stage_cost]
    vocab = 512 if stage_cost == "compute" else 64
    heads = 4 if stage_cost == "compute" else 2
    cases = CASES if stage_cost == "compute" else [(s, v, m) for s, v in SCHEDULES for m in microbatches]
    rows = []
    for schedule, v, m in cases:
        if (layers or p * v) < p * v or (schedule != "gpipe" and m < p):
            continue
        args = ModelArgs(layers=layers or p * v, hidden=hidden, heads=heads, kv_heads=heads, vocab=vocab, ffn_hidden=4 * hidden)
        model = materialize(build_model(args), "cpu", seed=0)
        if v not in meshes:
            meshes[v] = build_mesh(Layout(pp=p, pp_virtual_stages=v), torch.device("cpu"))
        split_for_rank(model, meshes[v], seq_len)
        pipeline = Pipeline(model, schedule, m, torch.device("cpu"), tp=False)
        batch = torch.randint(0, vocab, (m * micro, seq_len + 1), generator=torch.Generator().manual_seed(1))
        clock, calls = [0.0, 0.0], []
        sleep_s = sleep_ms / 1e3 / v if stage_cost == "sleep" else 0.0  # t / v per chunk
        _instrument(pipeline.stages, clock, calls, sleep_s)
        step_times, busy_times, work_times = [], [], []
        for i in range(steps + 2):  # two warm-up steps (shape inference, allocator)
            dist.barrier()
            clock[0] = clock[1] = 0.0
            calls.clear()
            t0 = time.perf_counter()
            pipeline.train_step(batch)
            dist.barrier()  # the step ends when the slowest rank is done
            elapsed = time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
            if i >= 2:
                step_times.append(elapsed)
                busy_times.append(clock[0])
                work_times.append(clock[1])
        # The busiest rank (the critical path): its idle time is the bubble the schedule leaves.
        step = torch.tensor([statistics.median(step_times), statistics.median(busy_times), statistics.median(work_times)],
                            dtype=torch.float64)
        dist.all_reduce(step, op=dist.ReduceOp.MAX)
        step_s, busy_s, work_s = step.tolist()
        every: list = [None] * p
        dist.all_gather_object(every, list(calls))  # the last step's calls of every rank
        rows.append({
            "pp": p, "schedule": schedule, "virtual_stages": v, "microbatches": m,
            "step_ms": 1e3 * step_s, "busy_ms": 1e3 * busy_s, "real_work_ms": 1e3 * work_s,
            "measured_bubble": step_s / busy_s - 1, "theory_bubble": theory(schedule, p, m, v),
            "scheduled_bubble": scheduled_bubble(every, p * v, v),
            # The step time beyond what the schedule's structure explains at the measured busy time.
            "excess_ms": 1e3 * (step_s - (1 + scheduled_bubble(every, p * v, v)) * busy_s),
            "calls_per_rank": ["".join(k for k, _, _ in c) for c in every],
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
    parser.add_argument("--stage-cost", choices=["compute", "sleep"], default="compute",
                        help="compute: the stages run a real model; sleep: a tiny model, then a fixed sleep per call")
    parser.add_argument("--sleep-ms", type=float, default=20.0,
                        help="sleep mode: t, a rank's forward time per micro-batch (backward 2t)")
    parser.add_argument("--microbatches", type=int, nargs="+", default=[4, 8, 16], help="sleep mode: values of m")
    parser.add_argument("--json", default=str(ROOT / "bench" / "out" / "pipeline_bubble.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--part", default="", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        worker(a.steps, a.part, a.stage_cost, a.sleep_ms, a.microbatches)
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    rows = []
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for p in a.pp:
        part = out.with_suffix(f".pp{p}.part")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={p}",
               __file__, "--worker", f"--steps={a.steps}", f"--part={part}", f"--stage-cost={a.stage_cost}",
               f"--sleep-ms={a.sleep_ms}", "--microbatches", *map(str, a.microbatches)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if res.returncode != 0:
            sys.exit(f"pp={p} failed:\n{res.stderr[-4000:]}")
        rows += json.loads(part.read_text())
        part.unlink()
    cores = len(os.sched_getaffinity(0))
    layers, hidden, seq_len, micro = MODEL[a.stage_cost]
    cost = f"sleep t = {a.sleep_ms:g} ms (F t, B 2t, I t, W t per micro-batch and rank)" if a.stage_cost == "sleep" else "real compute"
    print(f"{layers or 'p x v'} layers x {hidden} hidden, seq {seq_len}, {micro} sequences per micro-batch, fp32, gloo, {cores} cores, "
          f"{cost}; {time.perf_counter() - started:.0f} s")
    print(f"{'p':>2} {'schedule':<17} {'v':>2} {'m':>3} {'step ms':>9} {'busy ms':>9} {'real ms':>8} {'bubble':>8} "
          f"{'scheduled':>10} {'(p-1)/(vm)':>11} {'excess ms':>10}")
    for r in rows:
        print(f"{r['pp']:>2} {r['schedule']:<17} {r['virtual_stages']:>2} {r['microbatches']:>3} {r['step_ms']:>9.1f} "
              f"{r['busy_ms']:>9.1f} {r['real_work_ms']:>8.1f} {r['measured_bubble']:>8.3f} {r['scheduled_bubble']:>10.3f} "
              f"{r['theory_bubble']:>11.3f} {r['excess_ms']:>10.1f}")
    out.write_text(json.dumps({"cores": cores, "stage_cost": a.stage_cost, "sleep_ms": a.sleep_ms, "layers": layers,
                               "hidden": hidden, "seq_len": seq_len, "micro_batch_sequences": micro, "rows": rows},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
