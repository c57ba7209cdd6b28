"""The training loop, top to bottom: join the job, build the run (`build.py`), step (`step.py`),
log, evaluate, save, and at the end sample.

One optimizer step = `accumulation_steps` forward/backward passes over micro-batches whose tokens
add up to `train.global_batch_tokens`. The loss of a step is the mean over all its tokens, so it
does not depend on how the batch is split. Nothing here depends on the parallel layout: what
differs by parallelism is decided once by `plait.parallel.parallelize`.

The trainer takes a `ResolvedRun` (a validated config and its layout): the entry points
(`plait train`, `plait.train`) validate, the workers do not again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from plait.checkpoint import latest_checkpoint
from plait.config import ConfigError
from plait.data import iter_eval_batches
from plait.model import generate
from plait.parallel.job import DistInfo, init_distributed, launched_world_size, shutdown
from plait.trainer.build import Run, build_run, save_checkpoint
from plait.trainer.device import pick_device
from plait.trainer.nan_guard import NanGuard, RollbackRequested
from plait.trainer.output import RunOutput
from plait.trainer.router_metrics import RouterMetrics
from plait.trainer.step import StepResult, train_step
from plait.trainer.watchdog import Watchdog, start_watchdog
from plait.validation import ResolvedRun


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    loss: float | None
    val_loss: float | None
    sample: str | None
    model: nn.Module
    rank: int = 0


def train(resolved: ResolvedRun) -> TrainResult:
    """Train (or resume) the run; returns the final numbers and the model. Run by every worker of
    a multi-process job; only rank 0 prints and writes shared files."""
    if launched_world_size() != resolved.world_size:  # before joining: nothing to leave on refusal
        raise ConfigError(f"this job has {launched_world_size()} worker(s), but its config was resolved for "
                          f"{resolved.world_size}; start it with plait train --nproc-per-node (or plait.train)")
    dist_info = init_distributed(pick_device(resolved.config.train.device))
    watchdog = start_watchdog(resolved.config.train.watchdog_timeout, dist_info.rank, dist_info.world_size)
    nan_guard = NanGuard(resolved.config.train.nan_policy, dist_info)
    try:
        while True:
            try:
                return _train(resolved, dist_info, watchdog, nan_guard)
            except RollbackRequested as request:  # train.nan_policy = "rollback": start again from the newest checkpoint
                watchdog.pause()
                cfg, message = nan_guard.roll_back(request, latest_checkpoint(resolved.config.run_dir), resolved.config)
                resolved = resolved.replace_config(cfg)
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


def _train(resolved: ResolvedRun, dist_info: DistInfo, watchdog: Watchdog, nan_guard: NanGuard) -> TrainResult:
    run = build_run(resolved, dist_info)
    t, every = run.cfg.train, run.cfg.checkpoint.every
    out = RunOutput(run)
    out.start()
    router = RouterMetrics(run.par.module)  # mixture of experts: balance loss and router statistics
    last_loss, val_loss = None, None
    while run.step < t.steps:
        run.step += 1
        step = run.step
        watchdog.step_started(step)
        result = train_step(run, step, nan_guard, router)
        if result.offender is not None:
            _non_finite(run, out, nan_guard, result)
        out.add_step(result)
        watchdog.step_finished(step)
        if step % t.log_every == 0 or step == t.steps:
            last_loss = out.log(step, result, router, nan_guard)
        paused = False
        if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
            # Every replica evaluates the same batches with the same weights: same number.
            val_loss = validation_loss(run)
            out.log_val(step, val_loss)
            paused = True
        if (every and step % every == 0) or (step == t.steps and run.cfg.checkpoint.save_final):
            save_checkpoint(run, step)
            paused = True
        if paused:
            out.restart_window()
    return _finish(run, out, watchdog, last_loss, val_loss)


def _non_finite(run: Run, out: RunOutput, nan_guard: NanGuard, result: StepResult) -> None:
    """train.nan_policy on a step whose loss or gradient norm was not finite: "stop" and
    "rollback" leave by raising (after closing the files and, for a rollback, letting a
    background save finish before the restart looks for the newest checkpoint); "skip" says so."""
    assert result.offender is not None
    if nan_guard.policy != "skip":
        out.close()
        if nan_guard.policy == "rollback":
            run.checkpointer.wait()
    out.print(nan_guard.handle(run.step, result.offender, result.lr))


def validation_loss(run: Run) -> float:
    """Mean loss over `train.eval_batches` validation batches (the same number on every rank)."""
    t = run.cfg.train
    batches = iter_eval_batches(run.data.val, t.seq_len, t.micro_batch_size, t.eval_batches)
    return run.par.evaluate(batches, run.device)


def _finish(run: Run, out: RunOutput, watchdog: Watchdog, last_loss: float | None, val_loss: float | None) -> TrainResult:
    """After the last step: wait for a background save, sample, write the summary."""
    run.checkpointer.wait()  # a background save finishes before the run reports success
    stalls = run.checkpointer.stalls
    if stalls:
        out.print(f"checkpoints: {len(stalls)} saved, training stalled {sum(stalls):.2f} s in all "
                  f"({'async' if run.cfg.checkpoint.async_save else 'sync'})")
    watchdog.close()  # the final sample is not a step
    out.progress.close()
    sample, model = None, run.par.module
    if run.cfg.train.sample_tokens:
        whole = run.par.whole_model(run.device)  # a collective where the layout splits the model
        model = whole if whole is not None else model
        if run.dist.is_main:
            sample = _sample(run, model)
            out.log_metrics("sample", run.step, prompt=run.cfg.train.sample_prompt, text=sample)
            out.print(f"--- sample after {run.step} steps ---\n{sample}\n---")
    out.log_metrics("summary", run.step, tokens=run.tokens_seen, loss=last_loss, val_loss=val_loss, params=run.derived.params)
    out.close()
    return TrainResult(run_dir=run.cfg.run_dir, step=run.step, loss=last_loss, val_loss=val_loss, sample=sample,
                       model=model, rank=run.dist.rank)


def _sample(run: Run, model: nn.Module) -> str:
    t, tok = run.cfg.train, run.data.tokenizer
    # Compiled blocks would recompile for every cache length: sample eagerly.
    with torch.compiler.set_stance("force_eager"):
        ids = generate(model, tok.encode(t.sample_prompt), t.sample_tokens, temperature=0.8, top_k=50,
                       seed=run.cfg.run.seed, stop_id=tok.eos_id, vocab_limit=tok.vocab_size)
    return t.sample_prompt + tok.decode(ids)

