"""Checkpoint save and load time, and the training stall per save, synchronous vs asynchronous.

One process trains the `125m` model (fp32 AdamW, so a checkpoint holds the weights and two Adam
moments: ~1.5 GB) on short random batches, and saves every `--every` steps with plait's
`Checkpointer`, once with `checkpoint.async_save = false` and once with `true`. Per mode:
- stall: how long the training loop waited per save (sync: the whole write, fsync, checksums
  and rename; async: the copy of the state into host memory);
- write: from the save call until the checkpoint is complete on disk (async: in the background);
- step time: the median training step without a save in flight, and during a background write
  (the writer competes with training for CPU cores and memory bandwidth; on a GPU it does not
  compete for the GPU);
- load: restoring the newest checkpoint into a fresh model and optimizer (verifying checksums
  first, as a resuming run does).
Prints a table and writes JSON (default bench/out/checkpoint.json).

    python bench/checkpoint.py [--model 125m] [--saves 3] [--every 4] [--seq-len 128] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from plait.checkpoint.sharded import Checkpointer, find_intact, model_chunks, optimizer_chunks, restore, rng_chunks
from plait.config import Config
from plait.model import NAMED_SIZES, build_model, materialize
from plait.optim import build_optimizer


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def run_mode(args, mode: str, root: Path) -> dict:
    torch.manual_seed(0)
    model_args = NAMED_SIZES[args.model]
    model = materialize(build_model(model_args), "cpu", 0)
    optimizer = build_optimizer(model, Config().optim)
    batch = torch.randint(0, model_args.vocab, (1, args.seq_len + 1))

    def train_step() -> float:
        start = time.perf_counter()
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    run_dir = root / mode
    ckpt = Checkpointer(run_dir, keep_last=2, async_save=mode == "async", distributed=False, log=print)
    quiet, busy, writes = [], [], []
    step = 0
    train_step()  # warm-up, and the optimizer state exists
    for _ in range(args.saves):
        for _ in range(args.every):
            step += 1
            quiet.append(train_step())
        snapshot = {k: v.clone() for k, v in model.state_dict().items()}  # what the save must hold
        start, saved = time.perf_counter(), step
        ckpt.save(step, {**model_chunks(model), **optimizer_chunks(model, optimizer), **rng_chunks(0)},
                  {"tokens_seen": 0, "world_size": 1, "loader": None, "layout": {}, "config": {}})
        # Keep training while a background write runs; a sync save has finished already.
        while ckpt._thread is not None and ckpt._thread.is_alive():
            step += 1
            busy.append(train_step())
        ckpt.wait()
        writes.append(time.perf_counter() - start)
    size = _dir_bytes(run_dir / "checkpoints" / f"step_{saved}")

    fresh = materialize(build_model(model_args), "cpu", 1)
    fresh_opt = build_optimizer(fresh, Config().optim)
    shapes = {name: p.shape for name, p in build_model(model_args).state_dict().items()}
    start = time.perf_counter()
    path = find_intact(run_dir, print)
    verified = time.perf_counter() - start
    restore(path, fresh, fresh_opt, shapes, 0, None, False)
    load = time.perf_counter() - start
    # The newest checkpoint holds the weights as they were at the save (async runs trained on since).
    same = path.name == f"step_{saved}" and all(torch.equal(snapshot[k], v) for k, v in fresh.state_dict().items())
    shutil.rmtree(run_dir)
    return {
        "mode": mode, "checkpoint_bytes": size, "saves": args.saves,
        "stall_s": statistics.median(ckpt.stalls), "write_s": statistics.median(writes),
        "step_s": statistics.median(quiet), "step_during_write_s": statistics.median(busy) if busy else None,
        "steps_during_write": len(busy) / args.saves, "load_s": load, "verify_s": verified, "restored_equal": same,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="125m")
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--every", type=int, default=4, help="training steps between saves")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--json", default="bench/out/checkpoint.json")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="plait-ckpt-bench-"))
    rows = [run_mode(args, mode, root) for mode in ("sync", "async")]
    print(f"\n{args.model}, fp32 AdamW, one process, {os.cpu_count()} CPU cores, seq {args.seq_len}")
    print(f"{'mode':6} {'size GB':>8} {'stall/save s':>13} {'write s':>8} {'step s':>7} {'step during write s':>20} {'load s':>7} {'restored':>9}")
    for r in rows:
        during = f"{r['step_during_write_s']:.2f}" if r["step_during_write_s"] is not None else "-"
        print(f"{r['mode']:6} {r['checkpoint_bytes'] / 1e9:8.2f} {r['stall_s']:13.2f} {r['write_s']:8.2f} {r['step_s']:7.2f} "
              f"{during:>20} {r['load_s']:7.2f} {'equal' if r['restored_equal'] else 'DIFFERENT':>9}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "cpu_count": os.cpu_count(), "torch": torch.__version__,
                               "machine": platform.machine(), "rows": rows}, indent=1))
    print(f"wrote {out}")
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
