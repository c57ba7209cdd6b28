"""Loop overhead: plait's training loop against a bare PyTorch loop, same model, same batches.

Both loops run in this one process, alternating in rounds so that drift of the machine (thermal,
other load) hits both alike. Each round:
  * plait: `plait.train` for `--steps` steps in a fresh run directory, with evaluation, checkpoints
    and sampling off; its step time is read from the throughput plait itself logs (the logging
    window excludes set-up), after dropping the first window (warm-up);
  * bare: the same model (same init), AdamW with the same settings, the same batches from the same
    loader, the same micro-batching and clipping, timed with perf_counter around the same steps.
Prints a table and writes JSON (default bench/out/loop_overhead.json).

    python bench/loop_overhead.py [--rounds 5] [--steps 30] [--model debug|tiny] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import plait
from plait.validation import build_config, resolve_model_args
from plait.data import TrainLoader, build_data
from plait.model import build_model, materialize


def plait_round(overrides: list[str], run_dir: Path, log_every: int) -> list[float]:
    cfg = build_config(None, overrides + [f"--run.dir={run_dir}"])
    plait.train(cfg)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [x["tokens_per_s"] for x in lines if x["kind"] == "train"]
    tokens = cfg.train.global_batch_tokens
    return [tokens / r for r in rates[1:]]  # seconds per step, per window; first window dropped


def bare_round(overrides: list[str], steps: int, log_every: int) -> list[float]:
    cfg = build_config(None, overrides)
    t, o = cfg.train, cfg.optim
    data = build_data(cfg.data)
    args = resolve_model_args(cfg.model, data.tokenizer.vocab_size)
    model = materialize(build_model(args), "cpu", cfg.run.seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=True,
    )
    sequences = t.global_batch_tokens // t.seq_len
    accumulation = sequences // t.micro_batch_size
    loader = TrainLoader(data.train, t.seq_len, sequences, seed=cfg.run.seed)
    per_step: list[float] = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        batch = loader.next_batch()
        for micro in batch.split(t.micro_batch_size):
            logits = model(micro[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), micro[:, 1:].flatten()) / accumulation
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % log_every == 0:
            loss.item()
            now = time.perf_counter()
            per_step.append((now - start) / log_every)
            start = now
    return per_step[1:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--out", default="bench/out/loop_overhead.json")
    a = parser.parse_args()

    overrides = [
        f"--model.name={a.model}", f"--train.steps={a.steps}", f"--train.seq_len={a.seq_len}",
        f"--train.global_batch_tokens={a.batch_tokens}", f"--train.micro_batch_size={a.micro_batch}",
        "--train.dtype=fp32", "--train.eval_every=0", "--checkpoint.every=0", "--checkpoint.save_final=false",
        "--train.sample_tokens=0", f"--train.log_every={a.log_every}", "--run.progress=none",
        "--run.tensorboard=false",
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            plait_s = statistics.median(plait_round(overrides, Path(tmp) / f"r{r}", a.log_every))
            bare_s = statistics.median(bare_round(overrides, a.steps, a.log_every))
            rows.append({"round": r, "plait_step_s": plait_s, "bare_step_s": bare_s, "ratio": plait_s / bare_s})
            print(f"round {r}: plait {plait_s * 1e3:.1f} ms/step, bare {bare_s * 1e3:.1f} ms/step, ratio {plait_s / bare_s:.3f}", flush=True)

    plait_med = statistics.median(x["plait_step_s"] for x in rows)
    bare_med = statistics.median(x["bare_step_s"] for x in rows)
    ratio = plait_med / bare_med
    print()
    print(f"{'loop':<8}{'median ms/step':>16}{'tokens/s':>12}")
    print(f"{'bare':<8}{bare_med * 1e3:>16.1f}{a.batch_tokens / bare_med:>12.0f}")
    print(f"{'plait':<8}{plait_med * 1e3:>16.1f}{a.batch_tokens / plait_med:>12.0f}")
    print(f"ratio plait/bare = {ratio:.3f} (target <= 1.03)")
    result = {
        "benchmark": "loop_overhead", "model": a.model, "seq_len": a.seq_len, "batch_tokens": a.batch_tokens,
        "micro_batch": a.micro_batch, "steps_per_round": a.steps, "rounds": rows,
        "plait_median_step_s": plait_med, "bare_median_step_s": bare_med, "ratio": ratio,
        "torch": torch.__version__, "python": sys.version.split()[0], "machine": platform.machine(),
        "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
