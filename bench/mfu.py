"""Single-device throughput and model FLOPs utilisation (MFU) of `plait train`.

Runs `plait.train` on one device for `--steps` steps per setting (evaluation, checkpoints and
sampling off) and reads the throughput plait itself logs (tokens/s per logging window, set-up
excluded). The first windows are warm-up (allocator, cuDNN/cuBLAS heuristics, compilation): the
reported figure is the median of the windows after `--warmup-steps`. MFU counts 6 x (matmul
parameters) + attention FLOPs per token, without recomputation (PAPERS.md), against the device's
dense bf16 peak from `plait.hardware`.

    python bench/mfu.py                                  # 1b, bf16, seq 2048, eager and compiled
    python bench/mfu.py --model 125m --micro-batch 16 --seq-len 1024 --compile false
    python bench/mfu.py --json bench/out/mfu.json

Needs a CUDA device for MFU (on a CPU it prints tokens/s and no MFU).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import plait
from plait.validation import build_config, resolve_model_args
from plait.hardware import peak_flops
from plait.model import count_params, flops_per_token


def run_setting(args: argparse.Namespace, compile_blocks: bool, checkpointing: bool, run_dir: Path) -> dict:
    tokens_per_step = args.seq_len * args.micro_batch * args.accumulation
    overrides = [
        f"--model.name={args.model}", f"--train.seq_len={args.seq_len}", f"--train.micro_batch_size={args.micro_batch}",
        f"--train.global_batch_tokens={tokens_per_step}", f"--train.steps={args.steps}", "--train.log_every=1",
        "--train.eval_every=0", "--train.sample_tokens=0", "--checkpoint.every=0", "--checkpoint.save_final=false",
        f"--train.dtype={args.dtype}", f"--train.compile={str(compile_blocks).lower()}",
        f"--train.activation_checkpointing={str(checkpointing).lower()}", "--run.progress=none",
        "--run.tensorboard=false", f"--run.dir={run_dir}",
    ]
    cfg = build_config(None, overrides)
    plait.train(cfg)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["kind"] == "train" and x["step"] > args.warmup_steps]
    rate = statistics.median(x["tokens_per_s"] for x in train)
    model_args = resolve_model_args(cfg.model, 256)
    fpt = flops_per_token(model_args, args.seq_len)  # MFU: model FLOPs, no recomputation
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    peak = peak_flops(device, args.dtype) if torch.cuda.is_available() else None
    return {
        "model": args.model, "params": count_params(model_args).total, "seq_len": args.seq_len,
        "micro_batch": args.micro_batch, "tokens_per_step": tokens_per_step, "dtype": args.dtype,
        "compile": compile_blocks, "activation_checkpointing": checkpointing, "device": device,
        "tokens_per_s": rate, "tflops": rate * fpt / 1e12, "mfu": rate * fpt / peak if peak else None,
        "peak_mem_gib": max(x["mem_bytes"] for x in train) / 2**30, "windows": len(train),
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="1b")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--compile", default="both", choices=["both", "true", "false"])
    parser.add_argument("--activation-checkpointing", default="false", choices=["both", "true", "false"])
    parser.add_argument("--json", default="bench/out/mfu.json")
    args = parser.parse_args()
    choices = {"both": [False, True], "true": [True], "false": [False]}

    rows = []
    for compile_blocks in choices[args.compile]:
        for checkpointing in choices[args.activation_checkpointing]:
            with tempfile.TemporaryDirectory() as tmp:
                rows.append(run_setting(args, compile_blocks, checkpointing, Path(tmp) / "run"))
            row = rows[-1]
            print(f"done: compile={compile_blocks} checkpointing={checkpointing}: {row['tokens_per_s']:,.0f} tokens/s", file=sys.stderr)

    print(f"\n{rows[0]['model']} ({rows[0]['params'] / 1e9:.2f}B params), {args.dtype}, seq {args.seq_len}, "
          f"micro-batch {args.micro_batch}, on {rows[0]['device']}, torch {torch.__version__}\n")
    print("| compile | act. ckpt | tokens/s | TFLOP/s | MFU | peak mem GiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"| {r['compile']} | {r['activation_checkpointing']} | {r['tokens_per_s']:,.0f} | {r['tflops']:.1f} | {mfu} | {r['peak_mem_gib']:.1f} |")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
