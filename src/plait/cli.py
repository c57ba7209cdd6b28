"""The `plait` command: a thin layer over the Python API.

    plait train [--config FILE] [--section.key=value ...]
    plait prepare [--config FILE] --out DIR [--data.key=value ...]
    plait report RUN_DIR
    plait generate RUN_DIR --prompt TEXT
    plait config [--config FILE] [--section.key=value ...]
    plait convert --to-hf RUN_DIR/checkpoints/step_N OUT_DIR | --from-hf HF_DIR OUT_RUN_DIR
    plait plan --model.name=70b --gpus 512 --gpu h100 --global-batch-tokens N [--write plan.toml]
    plait plan --calibrate [--out FILE] [--workers N]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from plait.config import ConfigError, parse_config, to_toml
from plait.launch import DEFAULT_MAX_RESTARTS
from plait.validation import build_config

if TYPE_CHECKING:
    from plait.trainer import TrainResult
    from plait.validation import ResolvedRun


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plait",
        description="Train transformer language models. Any config field is set with --section.key=value.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) a model; no arguments: the default run")
    p.add_argument("--config", help="TOML config file (see configs/)")
    launch = p.add_argument_group("launch (several workers through torchrun)")
    launch.add_argument("--nproc-per-node", type=int, default=None, help="workers on this node")
    launch.add_argument("--nnodes", type=int, default=1, help="nodes in the job")
    launch.add_argument("--node-rank", type=int, default=None, help="this node's rank (multi-node)")
    launch.add_argument("--rdzv-endpoint", default=None,
                        help="HOST:PORT of the rendezvous (multi-node); without it everything listens on 127.0.0.1 only")
    launch.add_argument("--max-restarts", type=int, default=DEFAULT_MAX_RESTARTS,
                        help="restarts of the worker group after a worker fails; each resumes from the newest "
                        f"checkpoint (default {DEFAULT_MAX_RESTARTS}: a one-off crash costs the steps since the last "
                        "checkpoint, a repeating error at most one wasted replay)")

    p = sub.add_parser("prepare", help="pre-tokenize a corpus into memory-mapped binary shards")
    p.add_argument("--config", help="TOML config file; only [data] is used")
    p.add_argument("--out", required=True, help="output directory (use it as data.corpus)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")

    p = sub.add_parser("report", help="plot a run's loss and throughput into RUN_DIR/report/")
    p.add_argument("run_dir")

    p = sub.add_parser("generate", help="sample text from a trained run")
    p.add_argument("run_dir")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 samples greedily")
    p.add_argument("--top-k", type=int, default=50, help="0 keeps every token")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("config", help="print the resolved config as TOML")
    p.add_argument("--config", help="TOML config file")

    p = sub.add_parser("convert", help="export a checkpoint to, or import one from, Hugging Face Llama format")
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--to-hf", action="store_true", help="SRC is a checkpoint (or run directory): write a transformers directory")
    way.add_argument("--from-hf", action="store_true", help="SRC is a transformers Llama directory: write a plait run directory")
    p.add_argument("src", help="checkpoint step directory, run directory (its latest checkpoint) or Hugging Face directory")
    p.add_argument("out", help="output directory; must be new or empty unless --force")
    p.add_argument("--force", action="store_true", help="write into a non-empty output directory")
    p.add_argument("--shard-size", default="5GB", help="--to-hf: largest weight file, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="--to-hf: cast the weights (default: as stored)")

    p = sub.add_parser("plan", help="choose the parallel layout: predicted memory and speed of every layout")
    p.add_argument("--config", help="TOML config file: its [model], [data] and [train] give the workload")
    where = p.add_argument_group("cluster (flags, or --cluster FILE)")
    where.add_argument("--gpus", type=int, default=None, help="number of GPUs (workers)")
    where.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (default: the GPU type's usual)")
    where.add_argument("--gpu", default="h100", help="GPU type: a100-40, a100-80, h100, h200, b200, mi250x, cpu")
    where.add_argument("--cluster", default=None, help="cluster profile (TOML), e.g. from --calibrate")
    what = p.add_argument_group("workload (default: the config's train.* keys)")
    what.add_argument("--global-batch-tokens", type=int, default=None, help="tokens per optimizer step")
    what.add_argument("--global-batch-sequences", type=int, default=None, help="sequences per optimizer step")
    what.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default train.seq_len)")
    what.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default bf16 on GPUs, fp32 on cpu")
    out = p.add_argument_group("answer")
    out.add_argument("--layout", default="", help="pin degrees and knobs, e.g. tp=8,pp=16,dp=4,zero=3,mb=1,ac=true")
    out.add_argument("--top", type=int, default=5, help="layouts to list (default 5)")
    out.add_argument("--json", action="store_true", help="print the layouts as JSON")
    out.add_argument("--write", default=None, help="write the chosen layout as a config for plait train --config")
    cal = p.add_argument_group("calibration (measure this machine and write a profile)")
    cal.add_argument("--calibrate", action="store_true", help="measure matmul rate and collectives here")
    cal.add_argument("--out", default="cluster.toml", help="--calibrate: profile to write (default cluster.toml)")
    cal.add_argument("--workers", type=int, default=2, help="--calibrate: most worker processes to measure")
    return parser


def parse_layout_pins(text: str) -> dict[str, object]:
    """"tp=8,pp=16,ac=true,schedule=1f1b" -> pins (ints, booleans, words)."""
    pins: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"--layout {text!r}: {item!r} is not key=value; e.g. --layout tp=8,pp=4,dp=16")
        value = value.strip()
        lowered = value.lower()
        if lowered in ("true", "yes", "on", "false", "no", "off"):
            pins[key.strip()] = lowered in ("true", "yes", "on")
        elif value.lstrip("-").isdigit():
            pins[key.strip()] = int(value)
        else:
            pins[key.strip()] = value
    return pins


def _cmd_plan(args: argparse.Namespace, overrides: list[str]) -> int:
    import json

    from plait.planner import model_keys, workload_from_config
    from plait.planner import explain
    from plait.planner.search import PlanError, plan

    if args.calibrate:
        from plait.measure.calibrate import main_calibrate

        if args.workers < 1:
            raise ConfigError(f"--workers = {args.workers} must be at least 1")
        main_calibrate(args.workers, Path(args.out))
        return 0
    cfg = parse_config(args.config, overrides)
    if args.cluster:
        from plait.hardware.profile import load_profile

        cluster = load_profile(Path(args.cluster))
    else:
        from plait.hardware.profile import cluster_from_flags

        if args.gpus is None:
            raise ConfigError("plait plan needs the cluster: --gpus N [--gpus-per-node G] [--gpu TYPE], or --cluster FILE")
        if args.gpus < 1 or (args.gpus_per_node is not None and args.gpus_per_node < 1):
            raise ConfigError(f"--gpus = {args.gpus} and --gpus-per-node = {args.gpus_per_node} must be at least 1")
        cluster = cluster_from_flags(args.gpus, args.gpus_per_node, args.gpu)
    if args.top < 1:
        raise ConfigError(f"--top = {args.top} must be at least 1")
    seq_len = args.seq_len if args.seq_len is not None else cfg.train.seq_len
    sequences = args.global_batch_sequences
    if args.global_batch_tokens is not None:
        if sequences is not None:
            raise ConfigError("give --global-batch-tokens or --global-batch-sequences, not both")
        if seq_len < 1 or args.global_batch_tokens % seq_len or args.global_batch_tokens < seq_len:
            raise ConfigError(f"--global-batch-tokens = {args.global_batch_tokens} is not a positive multiple of "
                              f"the sequence length {seq_len}; use {max(seq_len, args.global_batch_tokens // max(seq_len, 1) * seq_len)}")
        sequences = args.global_batch_tokens // seq_len
    dtype = args.dtype or ("fp32" if cluster.device.name == "cpu" else "bf16")
    workload = workload_from_config(cfg, seq_len, sequences, dtype)
    pins = parse_layout_pins(args.layout)
    try:
        cands = plan(workload, cluster, pins, top=args.top)
    except PlanError as err:
        raise ConfigError(str(err)) from None
    if not cands:
        raise ConfigError(f"no layout plait train accepts matches --layout {args.layout!r} for this model on "
                          f"{cluster.gpus} GPU(s) ({cluster.gpus_per_node} per node); drop a pin or check its "
                          f"divisibility (degrees multiply to the GPUs, tp within a node and dividing the heads)")
    fits = cands[0].fits
    if args.json:
        print(json.dumps({"fits": fits, "layouts": [explain.layout_json(c) for c in cands]}, indent=2))
    elif fits:
        print(explain.explain(cands, workload, cluster))
    if not fits:
        print(f"plait plan: {explain.nothing_fits(cands, workload, cluster)}", file=sys.stderr)
        return 1
    if args.write:
        Path(args.write).write_text(explain.plan_toml(cands[0], workload, cluster, model_keys(cfg),
                                                       cfg.to_dict() if args.config else None))
        if not args.json:
            print(f"\nwrote {args.write}: plait train --config {args.write}")
    return 0


def _cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from plait.launch import RESOLVED_RUN_ENV
    from plait.parallel.job import launched_world_size

    resolved = os.environ.get(RESOLVED_RUN_ENV)
    if resolved:  # a worker of `plait train --nproc-per-node`: its launcher validated and resolved the run
        from plait.trainer import train as run_training
        from plait.validation import ResolvedRun

        return _done(run_training(ResolvedRun.from_json(resolved)))
    if args.nproc_per_node is not None and launched_world_size() == 1:
        return _launch(args, overrides)
    # One process, or each worker of an external torchrun: this process is the entry point.
    # parallel.auto = true: plait.api.train plans (in every worker under an external torchrun).
    from plait.api import train

    return _done(train(parse_config(args.config, overrides)))


def _done(result: "TrainResult") -> int:
    if result.rank == 0:
        val = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
        print(f"done: step {result.step}, val_loss {val}, run dir {result.run_dir}")
    return 0


def _launch(args: argparse.Namespace, overrides: list[str]) -> int:
    """Validate and resolve the run once, here, for every worker of the job, then start them with
    it (they check nothing again). With parallel.auto the layout is planned here once; each
    node's launcher plans for itself, so several nodes need one profile (plan_for_job says so)."""
    from plait.api import resolve_for_job
    from plait.launch import launch
    from plait.parallel.job import check_gpus_per_node

    cfg = parse_config(args.config, overrides)
    check_gpus_per_node(cfg.train.device, args.nproc_per_node)
    resolved = resolve_for_job(cfg, args.nproc_per_node * args.nnodes, args.nproc_per_node, shared=args.nnodes > 1,
                               announce=True, guard_checkpoints=True)
    return launch(args, restartable(resolved))


def restartable(resolved: "ResolvedRun") -> "ResolvedRun":
    """The run the workers get. `checkpoint.resume = false` guards a new run against a directory
    that holds checkpoints: checked by the launcher, once, so that a restart of this job
    (torchrun's --max-restarts) resumes from the checkpoints the job itself wrote instead of
    refusing them."""
    cfg = resolved.config
    if cfg.checkpoint.resume:
        return resolved
    return resolved.replace_config(dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume=True)))


def _cmd_prepare(args: argparse.Namespace, overrides: list[str]) -> int:
    from plait.data import build_tokenizer, prepare_corpus

    cfg = build_config(args.config, overrides)
    tokenizer = build_tokenizer(cfg.data)
    meta = prepare_corpus(cfg.data, tokenizer, Path(args.out), shard_tokens=args.shard_tokens)
    splits = meta.get("splits", {})
    counts = ", ".join(f"{name}: {info.get('tokens', '?')} tokens" for name, info in splits.items())
    print(f"prepared {cfg.data.corpus} with tokenizer {tokenizer.name} into {args.out} ({counts})")
    print(f"train on it with --data.corpus={args.out}")
    return 0


def _cmd_report(args: argparse.Namespace, overrides: list[str]) -> int:
    from plait.report import format_summary, write_report

    print(format_summary(write_report(args.run_dir)))
    return 0


def _cmd_generate(args: argparse.Namespace, overrides: list[str]) -> int:
    from plait.api import load

    run = load(args.run_dir, step=args.step, device=args.device)
    print(run.generate(args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed))
    return 0


def _cmd_config(args: argparse.Namespace, overrides: list[str]) -> int:
    cfg = build_config(args.config, overrides)
    if cfg.parallel.auto:  # the layout depends on the job's workers: chosen when plait train starts
        print("# parallel.auto = true: plait train chooses [parallel] and train.micro_batch_size /\n"
              "# train.activation_checkpointing at start-up for its workers; `plait plan --config FILE --cluster PROFILE` shows the plan.")
    print(to_toml(cfg.to_dict()), end="")
    return 0


_SIZE_UNITS = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "b": 1, "": 1}


def parse_size(text: str) -> int:
    """"5GB", "500MB", "2GiB" or a number of bytes."""
    lowered = text.strip().lower()
    number = lowered.rstrip("kmgib")
    unit = lowered[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _SIZE_UNITS or value <= 0:
        raise ConfigError(f"--shard-size = {text!r} is not a size; use e.g. 5GB, 500MB or a number of bytes")
    return int(value * _SIZE_UNITS[unit])


def _cmd_convert(args: argparse.Namespace, overrides: list[str]) -> int:
    from plait.checkpoint import is_checkpoint, latest_checkpoint
    from plait.checkpoint.hf import export_to_hf, import_from_hf

    src, out = Path(args.src), Path(args.out)
    if not src.is_dir():
        raise FileNotFoundError(f"convert: {src} does not exist or is not a directory")
    try:
        if args.from_hf:
            import_from_hf(src, out, force=args.force, progress=print)
            print(f"sample with `plait generate {out}`; train on with "
                  f"`plait train --config {out / 'config.toml'} --data.corpus=...`")
            return 0
        checkpoint = src
        if not is_checkpoint(src):
            found = latest_checkpoint(src)
            if found is None:
                raise FileNotFoundError(f"convert --to-hf: {src} is not a plait checkpoint (no manifest.json) "
                                        "nor a run directory with one")
            checkpoint = found
        export_to_hf(checkpoint, out, shard_size=parse_size(args.shard_size), dtype=args.dtype,
                     force=args.force, progress=print)
        print(f"load with transformers: LlamaForCausalLM.from_pretrained({str(out)!r})")
        return 0
    except (ValueError, FileExistsError) as err:  # HFConfigError, ConfigError, weights that do not match
        print(f"plait convert: {err}", file=sys.stderr)
        return 2


COMMANDS = {"train": _cmd_train, "prepare": _cmd_prepare, "report": _cmd_report,
            "generate": _cmd_generate, "config": _cmd_config, "convert": _cmd_convert,
            "plan": _cmd_plan}


def main(argv: list[str] | None = None) -> int:
    args, rest = _parser().parse_known_args(argv)
    if rest and args.command in ("report", "generate", "convert"):
        print(f"plait {args.command}: unexpected arguments {' '.join(rest)}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](args, rest)
    except ConfigError as err:
        print(f"plait: config error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"plait: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # a NaN or infinite loss that train.nan_policy could not go past
        print(f"plait: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("plait: interrupted; the last complete checkpoint is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
