"""The training loop, top to bottom: set up, (resume), step, evaluate, save, sample.

One optimizer step = `accumulation_steps` forward/backward passes over micro-batches whose tokens
add up to `train.global_batch_tokens`. The loss of a step is the mean over all its tokens, so it
does not depend on how the batch is split.
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from plait._version import __version__
from plait.checkpoint import latest_checkpoint
from plait.checkpoint.hf import init_model_from
from plait.checkpoint.sharded import (
    CheckpointError,
    Checkpointer,
    find_intact,
    model_chunks,
    optimizer_chunks,
    optimizer_groups,
    remove_unfinished,
    restore,
    rng_chunks,
)
from plait.checkpoint.state import gather_model
from plait.config import Config, ConfigError, resolve_degrees, resolve_model_args, validate, with_resolved_zero_stage
from plait.data import TrainLoader, build_data, iter_eval_batches, save_tokenizer
from plait.hardware import peak_flops
from plait.model import Transformer, build_model, generate, materialize
from plait.optim import lr_at
from plait.parallel.apply import apply_layout, build_grad_clipper, build_layout_optimizer
from plait.parallel.context_parallel import ContextSharding, context_sharding
from plait.parallel.mesh import build_layout
from plait.parallel.tensor_parallel import loss_parallel_context, tp_cross_entropy
from plait.parallel.data_parallel import gradient_sync
from plait.parallel.distributed import DistInfo, barrier, init_distributed, launched_world_size, mean_across_ranks, shutdown
from plait.trainer.metrics import MetricsLogger
from plait.trainer.nan_guard import NanGuard, RollbackRequested
from plait.trainer.progress import ProgressDisplay, human
from plait.trainer.router_metrics import RouterMetrics
from plait.trainer.setup import config_lines, derive, memory_bytes, pick_device, resolved_config, write_run_config
from plait.trainer.watchdog import Watchdog, start_watchdog


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    loss: float | None
    val_loss: float | None
    sample: str | None
    model: Transformer
    rank: int = 0


def autocast_for(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def lm_loss(model: nn.Module, batch_BT1: torch.Tensor, autocast, cp: ContextSharding | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch, in fp32. Under tensor parallelism the logits
    stay sharded on the vocabulary (call inside `loss_parallel_context`, backward included).
    Under context parallelism it is the mean over this rank's tokens of each sequence."""
    inputs_BT, targets_BT = batch_BT1[:, :-1], batch_BT1[:, 1:]
    extra = {}
    if cp is not None:
        inputs_BT, targets_BT, extra["positions_T"] = cp.split(inputs_BT, targets_BT)
    with autocast:
        logits_BTV = model(inputs_BT, **extra)
    return tp_cross_entropy(logits_BTV, targets_BT)


@torch.no_grad()
def evaluate(model: nn.Module, val_tokens, cfg: Config, device: torch.device, dtype: str, cp: ContextSharding | None = None) -> float:
    """Mean validation loss; every rank evaluates the same batches (sharded layouts need all),
    context-parallel ranks each their tokens of them."""
    model.eval()
    total, count = 0.0, 0
    for batch in iter_eval_batches(val_tokens, cfg.train.seq_len, cfg.train.micro_batch_size, cfg.train.eval_batches):
        batch = batch.to(device, non_blocking=True)
        with loss_parallel_context(cfg.parallel.tp_degree != 1):
            loss = lm_loss(model, batch, autocast_for(device, dtype), cp)
            total += (cp.average(loss) if cp is not None else loss).item() * batch.shape[0]
        count += batch.shape[0]
    model.train()
    return total / count


def train(cfg: Config) -> TrainResult:
    """Train (or resume) the run described by `cfg`; returns the final numbers and the model.
    Run by every worker of a multi-process job; only rank 0 prints and writes shared files."""
    if cfg.parallel.auto:  # the planner sits above the trainer (plait.api.train, plait train)
        raise ConfigError("parallel.auto = true is planned by plait.train (or plait train), not by "
                          "plait.trainer.train; call plait.train(cfg)")
    validate(cfg, launched_world_size())
    cfg = with_resolved_zero_stage(cfg, launched_world_size())  # "auto" (-1) becomes 0 or 3
    dist_info = init_distributed(pick_device(cfg.train.device))
    watchdog = start_watchdog(cfg.train.watchdog_timeout, dist_info.rank, dist_info.world_size)
    nan_guard = NanGuard(cfg.train.nan_policy, dist_info)
    try:
        while True:
            try:
                return _train(cfg, dist_info, watchdog, nan_guard)
            except RollbackRequested as request:  # train.nan_policy = "rollback": start again from the newest checkpoint
                watchdog.pause()
                cfg, message = nan_guard.roll_back(request, latest_checkpoint(cfg.run_dir), cfg)
                if dist_info.is_main and cfg.run.progress != "none":
                    print(message, flush=True)
    except BaseException as err:
        watchdog.note_error(err)
        raise
    finally:
        try:
            # Still watched: a rank that raised alone waits here for ranks blocked in a collective
            # (or its collective timed out first); the watchdog then reports and ends the job.
            shutdown(dist_info)
        finally:
            watchdog.close()


def _train(cfg: Config, dist_info: DistInfo, watchdog: Watchdog, nan_guard: NanGuard) -> TrainResult:
    t, o = cfg.train, cfg.optim
    device, main = dist_info.device, dist_info.is_main
    layout = build_layout(resolve_degrees(cfg.parallel, dist_info.world_size), device)
    dp, distributed = layout.degrees.dp, dist_info.world_size > 1
    tp = layout.degrees.tp > 1
    # Parameters split over ranks: forwards need every rank, so the final sample uses a gathered copy
    # (so does context parallelism, whose attention expects a sequence spread over the cp ranks).
    sharded = tp or cfg.parallel.zero_stage >= 2 or layout.degrees.cp > 1 or layout.degrees.pp > 1
    run_dir = cfg.run_dir
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)

    # Data first: the tokenizer fixes the vocabulary and so the model's shape. Rank 0 fills the
    # token cache; the others then find it there instead of tokenizing the corpus again.
    if not main:
        barrier(dist_info)
    data = build_data(cfg.data)
    if main:
        barrier(dist_info)
    args = resolve_model_args(cfg.model, data.tokenizer.vocab_size)
    derived = derive(cfg, args, device, dp)
    cfg = resolved_config(cfg, args)

    torch.manual_seed(cfg.run.seed)
    module = materialize(build_model(args), device, cfg.run.seed)
    if cfg.model.init_from and latest_checkpoint(run_dir) is None:  # a checkpoint, when there is one, wins
        init_model_from(module, cfg.model.init_from)  # whole weights, before any parallel layout
    # `module` is the model without a DDP wrapper (FSDP and TP transform it in place): eval and sampling use it.
    model = apply_layout(module, t, cfg.parallel, layout)
    optimizer = build_layout_optimizer(model, o, cfg.parallel, layout)
    cp = context_sharding(layout.submesh("cp"), cfg.parallel.cp_method) if layout.degrees.cp > 1 else None
    pipeline = None
    if layout.degrees.pp > 1:  # `model` is this rank's stages; the schedule runs every micro-batch of a step
        from plait.parallel.pipeline_parallel import Pipeline

        pipeline = Pipeline(model, cfg.parallel.pp_schedule, derived.accumulation_steps, device, tp, autocast_for(device, derived.dtype))
    loader = TrainLoader(
        data.train, t.seq_len, derived.sequences_per_step, dp_rank=layout.dp_rank(), dp_degree=dp, seed=cfg.run.seed
    )
    autocast = autocast_for(device, derived.dtype)

    step, tokens_seen = 0, 0
    checkpointer = Checkpointer(run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.async_save, distributed, print)
    early_log: list[str] = []  # said once the progress display exists
    if main:
        early_log += remove_unfinished(run_dir)
    try:
        checkpoint = find_intact(run_dir, early_log.append, dist_info.rank, dist_info.world_size, checkpointer.group)
    except CheckpointError as err:
        raise ConfigError(f"cannot resume run.dir = {str(run_dir)!r}: {err}") from None
    if checkpoint is not None and not cfg.checkpoint.resume:
        raise ConfigError(
            f"run.dir = {str(run_dir)!r} already holds checkpoints ({checkpoint.name}) and "
            f"checkpoint.resume = false; pick a new --run.dir, or drop --checkpoint.resume=false to resume"
        )
    if checkpoint is not None:
        shapes = {name: p.shape for name, p in build_model(args).state_dict().items()}  # meta: free
        try:
            restored = restore(checkpoint, model, optimizer, shapes, dist_info.rank, checkpointer.group, distributed)
            if restored["loader"] is not None:  # None: a weights-only (imported) checkpoint
                loader.load_state_dict(restored["loader"])
        except ValueError as err:  # a different model or data shape than the one saved
            raise ConfigError(
                f"cannot resume run.dir = {str(run_dir)!r} from {checkpoint.name}: {err}. "
                f"Use a new --run.dir for a different config"
            ) from None
        step, tokens_seen = int(restored["step"]), int(restored["tokens_seen"])
    # Written only now, so that a refused resume leaves the run directory as it was.
    if main:
        write_run_config(run_dir, cfg, derived)
        save_tokenizer(data.tokenizer, run_dir)
    progress = ProgressDisplay(cfg.run.progress if main else "none", t.steps, step)
    for line in early_log if main else []:
        progress.print(line)
    if checkpoint is not None:
        progress.print(f"resumed from {checkpoint} (step {step}, {human(tokens_seen)} tokens)")
    progress.print(
        f"plait: {args.layers} layers x {args.hidden} hidden, {human(derived.params)} params, "
        f"{human(derived.flops_per_token)} FLOPs/token | {derived.device} {derived.dtype} | "
        f"{derived.tokens_per_step} tokens/step = {derived.sequences_per_step} x {t.seq_len} "
        f"({dp} ranks x {derived.accumulation_steps} x {derived.micro_batch_size} sequences) | run dir {run_dir}"
    )
    for line in config_lines(cfg):
        progress.print(line)
    if pipeline is not None:
        progress.print(f"pipeline: {cfg.parallel.pp_schedule}, {derived.accumulation_steps} micro-batches per step; {pipeline.info.plan.describe()}")
    peak = peak_flops(torch.cuda.get_device_name(device), derived.dtype) if device.type == "cuda" else None
    metrics = MetricsLogger(run_dir, cfg.run.tensorboard) if main else None

    def save(at_step: int) -> None:
        # Every rank writes its own part of the state (a collective); see plait.checkpoint.sharded.
        chunks = {**model_chunks(model), **optimizer_chunks(model, optimizer), **rng_chunks(dist_info.rank)}
        manifest = {
            "plait_version": __version__, "tokens_seen": tokens_seen, "world_size": dist_info.world_size,
            "layout": {**dataclasses.asdict(layout.degrees), "zero_stage": cfg.parallel.zero_stage},
            # One global position: every data-parallel rank of any layout takes its share of it.
            "loader": loader.state_dict(),
            "loader_ranks": [loader.sequences_consumed + r * loader.local_batch_sequences for r in range(dp)],
            "optimizer_groups": optimizer_groups(optimizer), "config": cfg.to_dict(),
        }
        checkpointer.save(at_step, chunks, manifest)

    # The layout's clipping (apply.py): torch's cannot mix plain and DTensor gradients, as tensor
    # parallelism and expert parallelism (experts on the ep mesh) do, and ZeRO-1 holds the averaged gradients in its optimizer.
    clip_grad_norm = build_grad_clipper(model, optimizer, tp or layout.degrees.ep > 1, pipeline)
    router = RouterMetrics(module)  # mixture of experts: balance loss and router statistics
    loss_sum = torch.zeros((), device=device)  # summed on device; read only when logging
    logged_steps, last_loss, val_loss = 0, None, None
    window_start, window_tokens = time.perf_counter(), 0
    while step < t.steps:
        step += 1
        watchdog.step_started(step)
        lr = lr_at(step, t.steps, o)
        for group in optimizer.param_groups:
            group["lr"] = lr

        batch = nan_guard.next_batch(loader).to(device, non_blocking=True)
        micro_batches = batch.split(derived.micro_batch_size) if pipeline is None else ()
        step_loss = torch.zeros((), device=device)
        if pipeline is not None:
            step_loss += pipeline.train_step(batch)
        for i, micro in enumerate(micro_batches):
            with gradient_sync(model, last_micro_batch=i == len(micro_batches) - 1), loss_parallel_context(tp):
                loss = lm_loss(model, micro, autocast, cp) / derived.accumulation_steps
                aux = router.aux_loss()
                aux = aux / derived.accumulation_steps if aux is not None else None
                (loss + aux if aux is not None else loss).backward()
            step_loss += loss.detach()
            router.observe(aux)
        grad_norm = clip_grad_norm(o.grad_clip) if o.grad_clip > 0 else None
        if isinstance(grad_norm, DTensor):  # sharded gradients: the norm is a DTensor too
            grad_norm = grad_norm.full_tensor()
        offender = nan_guard.find_offender(step_loss, grad_norm)  # a NaN or inf anywhere; all ranks agree
        if offender is None:
            optimizer.step()
            loss_sum += step_loss
            logged_steps += 1
        else:
            if nan_guard.policy != "skip":  # "stop" and "rollback" leave by raising
                if metrics is not None:
                    metrics.close()
                progress.close()
                if nan_guard.policy == "rollback":
                    # Every rank agrees on the rollback: let a background save finish before the
                    # restart looks for the newest checkpoint (and clears unfinished ones).
                    checkpointer.wait()
            progress.print(nan_guard.handle(step, offender, lr))
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += derived.tokens_per_step
        window_tokens += derived.tokens_per_step
        router.end_step()
        watchdog.step_finished(step)

        if step % t.log_every == 0 or step == t.steps:
            # Skipped steps (train.nan_policy = "skip") are left out of the mean; NaN if all were.
            last_loss = mean_across_ranks(loss_sum, dist_info).item() / logged_steps if logged_steps else math.nan
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_tokens / elapsed
            mfu = tokens_per_s * derived.flops_per_token / peak if peak else None
            mem = memory_bytes(device)
            record = {"loss": last_loss, "lr": lr, "tokens": tokens_seen, "tokens_per_s": tokens_per_s, "mem_bytes": mem}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm.item()
            if mfu is not None:
                record["mfu"] = mfu / dist_info.world_size  # per-GPU utilisation
            record.update(router.window_record(dist_info))  # MoE only: aux_loss, moe_load_max, moe_drop_rate
            record.update(nan_guard.metrics())  # skipped_steps or rollbacks, under those policies
            if metrics is not None:
                metrics.log("train", step, **record)
            progress.update(step, last_loss, tokens_per_s, mfu, mem)
            loss_sum.zero_()
            logged_steps = 0
            window_start, window_tokens = time.perf_counter(), 0

        paused = False
        if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
            # Every replica evaluates the same batches with the same weights: same number.
            if pipeline is not None:  # stages hold parts of the model: evaluate a gathered copy
                from plait.trainer.pipeline_eval import evaluate_gathered

                val_loss = evaluate_gathered(model, args, data.val, cfg, device, derived.dtype, main)
            else:
                val_loss = evaluate(module, data.val, cfg, device, derived.dtype, cp)
            if metrics is not None:
                metrics.log("val", step, tokens=tokens_seen, val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50)))
            progress.print(f"step {step}: val_loss {val_loss:.4f} (ppl {math.exp(min(val_loss, 50)):.2f})")
            paused = True
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or (step == t.steps and cfg.checkpoint.save_final):
            save(step)
            paused = True
        if paused:  # evaluation and saving are not training: restart the throughput window
            window_start, window_tokens = time.perf_counter(), 0
    checkpointer.wait()  # a background save finishes before the run reports success
    if checkpointer.stalls:
        progress.print(f"checkpoints: {len(checkpointer.stalls)} saved, training stalled {sum(checkpointer.stalls):.2f} s "
                       f"in all ({'async' if cfg.checkpoint.async_save else 'sync'})")
    watchdog.close()  # the final sample is not a step
    progress.close()

    sample, plain = None, module
    if t.sample_tokens and sharded:
        tensors = gather_model(model, distributed)  # a collective: every rank takes part
        if main:
            plain = materialize(build_model(args), device, cfg.run.seed)
            plain.load_state_dict(tensors)
    if t.sample_tokens and main:
        tok = data.tokenizer
        # Compiled blocks would recompile for every cache length: sample eagerly.
        with torch.compiler.set_stance("force_eager"):
            ids = generate(
                plain, tok.encode(t.sample_prompt), t.sample_tokens, temperature=0.8, top_k=50,
                seed=cfg.run.seed, stop_id=tok.eos_id, vocab_limit=tok.vocab_size,
            )
        sample = t.sample_prompt + tok.decode(ids)
        if metrics is not None:
            metrics.log("sample", step, prompt=t.sample_prompt, text=sample)
        progress.print(f"--- sample after {step} steps ---\n{sample}\n---")
    if metrics is not None:
        metrics.log("summary", step, tokens=tokens_seen, loss=last_loss, val_loss=val_loss, params=derived.params)
        metrics.close()
    return TrainResult(run_dir=run_dir, step=step, loss=last_loss, val_loss=val_loss, sample=sample, model=plain, rank=dist_info.rank)
