"""Does the planner rank layouts the way this machine runs them? Predicted vs measured step time.

1. The local profile: `--cluster FILE`, or `plait plan --calibrate` with 2 workers now (written to
   bench/out/planner_ranking_cluster.toml).
2. The layouts: every layout `plait plan` enumerates for the workload on the 2 workers, grouped by
   structure (ddp, zero-1/2/3, tp, pp, cp, ...); a seeded sample of `--sample` of them, taken
   round-robin over the groups so every structure is in, plus the planner's own first choice.
3. Each one trained `--steps` steps through `plait train --nproc-per-node 2`; the median step time
   after 2 warm-up steps is the measurement (plait.measure.step_time).
4. The Spearman correlation of predicted and measured step times, the planner's pick's measured
   rank, and a table; JSON with every row.

    python bench/planner_ranking.py                       # calibrate, 16 layouts of `tiny`
    python bench/planner_ranking.py --cluster local.toml --sample 24 --json bench/out/planner_ranking.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from plait.config import Config, set_value  # noqa: E402
from plait.planner import workload_from_config  # noqa: E402
from plait.measure.step_time import measure_step_time, spearman  # noqa: E402
from plait.planner.search import candidate, enumerate_layouts, plan  # noqa: E402


def structure(short: str) -> str:
    """A layout's degrees and schedule without micro-batch and checkpointing: its group."""
    return " ".join(w for w in short.split() if not w.startswith("mb") and w != "ac")


def sample_layouts(layouts: list, count: int, seed: int) -> list:
    groups: dict[str, list] = {}
    for lay in layouts:
        groups.setdefault(structure(lay.short()).split()[0], []).append(lay)
    rng = random.Random(seed)
    for members in groups.values():
        rng.shuffle(members)
    out: list = []
    while len(out) < count and any(groups.values()):
        for name in sorted(groups):
            if groups[name] and len(out) < count:
                out.append(groups[name].pop())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cluster", help="a profile from `plait plan --calibrate` (default: calibrate now)")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--sequences", type=int, default=32, help="global batch in sequences")
    ap.add_argument("--sample", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--json", default=str(ROOT / "bench" / "out" / "planner_ranking.json"))
    args = ap.parse_args()

    from plait.hardware.profile import load_profile

    if args.cluster:
        cluster = load_profile(args.cluster)
    else:
        from plait.measure.calibrate import calibrate

        path = ROOT / "bench" / "out" / "planner_ranking_cluster.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"calibrating 2 workers -> {path}", flush=True)
        cluster = calibrate(2, path)
    cfg = Config()
    set_value(cfg, "model.name", args.model)
    workload = workload_from_config(cfg, args.seq_len, args.sequences, "fp32")
    layouts = list(enumerate_layouts(workload, cluster))
    chosen = sample_layouts(list(layouts), args.sample, args.seed)
    best = plan(workload, cluster, top=1)[0].layout
    if best not in chosen:
        chosen.append(best)
    print(f"{len(layouts)} layouts of {args.model} (seq {args.seq_len}, {args.sequences} sequences) on "
          f"{cluster.gpus} workers; measuring {len(chosen)}", flush=True)
    base = [f"--model.name={args.model}", "--train.dtype=fp32", "--train.device=cpu"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, lay in enumerate(chosen):
            cand = candidate(workload, lay, cluster)
            start = time.perf_counter()
            got = measure_step_time(lay, workload, Path(tmp) / f"run{i}", base, steps=args.steps)
            rows.append({"layout": lay.short(), "predicted_s": cand.time.step_s, "measured_s": got["step_s"],
                         "steps_s": got["steps_s"], "planner_pick": lay == best,
                         "predicted_parts": cand.time.parts})
            print(f"  {lay.short():<40} predicted {cand.time.step_s:7.3f} s  measured {got['step_s']:7.3f} s  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    rho = spearman([r["predicted_s"] for r in rows], [r["measured_s"] for r in rows])
    by_measured = sorted(rows, key=lambda r: r["measured_s"])
    pick_rank = next(i for i, r in enumerate(by_measured, 1) if r["planner_pick"])
    print()
    print(f"| layout | predicted s/step | measured s/step | predicted rank | measured rank |")
    print("|---|---|---|---|---|")
    pred_order = sorted(rows, key=lambda r: r["predicted_s"])
    for r in by_measured:
        mark = " (planner's pick)" if r["planner_pick"] else ""
        print(f"| {r['layout']}{mark} | {r['predicted_s']:.3f} | {r['measured_s']:.3f} | "
              f"{pred_order.index(r) + 1} | {by_measured.index(r) + 1} |")
    print(f"\nSpearman rank correlation over {len(rows)} layouts: {rho:.3f}; the planner's pick measured "
          f"rank {pick_rank} of {len(rows)}")
    out = {"model": args.model, "seq_len": args.seq_len, "sequences": args.sequences, "workers": cluster.gpus,
           "cluster": {"matmul_flops": cluster.device.peak_flops, "bandwidth": cluster.intra.bandwidth,
                       "latency": cluster.intra.latency},
           "enumerated": len(layouts), "spearman": rho, "planner_pick_measured_rank": pick_rank, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
