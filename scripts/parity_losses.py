"""Per-step training losses of a fixed set of parity rows, written exactly (float.hex), so that
two commits can be compared bit for bit: a refactoring that changes no numerics leaves the file
unchanged.

    python scripts/parity_losses.py OUT.json           # run the rows with this checkout's plait
    python scripts/parity_losses.py --compare A.json B.json

Each row is `plait train` on the debug config for 20 steps (tests/dist/layouts.py), fp32 on CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.dist.layouts import run_layout  # noqa: E402

ROWS = {
    "single": (1, []),
    "ddp2-accumulate4": (2, ["--parallel.dp_replicate_degree=2", "--train.micro_batch_size=4"]),
    "zero1-x2-accumulate4": (2, ["--parallel.dp_shard_degree=2", "--parallel.zero_stage=1", "--train.micro_batch_size=4"]),
    "zero3-x2": (2, ["--parallel.dp_shard_degree=2", "--parallel.zero_stage=3"]),
    "tp2-sp": (2, ["--parallel.tp_degree=2", "--parallel.sequence_parallel=true"]),
    "cp2-ring": (2, ["--parallel.cp_degree=2"]),
    "pp2-1f1b": (2, ["--parallel.pp_degree=2", "--parallel.pp_schedule=1f1b"]),
    "ep2": (2, ["--model.name=debug-moe", "--train.micro_batch_size=32", "--parallel.dp_shard_degree=2",
                "--parallel.zero_stage=3", "--parallel.ep_degree=2"]),
}


def run(out: Path) -> None:
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (nproc, overrides) in ROWS.items():
            start = time.perf_counter()
            losses = run_layout(Path(tmp) / name, nproc, overrides)
            result[name] = [x.hex() for x in losses]
            print(f"{name:24s} {time.perf_counter() - start:6.1f} s  first {losses[0]:.6f}  last {losses[-1]:.6f}", flush=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


def compare(a: Path, b: Path) -> int:
    left, right = json.loads(a.read_text()), json.loads(b.read_text())
    bad = 0
    for name in sorted(set(left) | set(right)):
        same = left.get(name) == right.get(name)
        bad += not same
        print(f"{name:24s} {'bit-identical' if same else 'DIFFERENT'}")
    return 1 if bad else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--compare", action="store_true")
    args = parser.parse_args()
    if args.compare:
        raise SystemExit(compare(*args.paths))
    run(args.paths[0])
