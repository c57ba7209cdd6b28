"""What a run shows and writes while it trains: the progress display, `metrics.jsonl` and
TensorBoard (rank 0 only), and the logging window whose mean loss, tokens/s and MFU each
train line reports."""

from __future__ import annotations

import math
import time

import torch

from plait.hardware import peak_flops
from plait.parallel.job import mean_across_ranks
from plait.trainer.build import Run
from plait.trainer.device import memory_bytes
from plait.trainer.metrics import MetricsLogger
from plait.trainer.nan_guard import NanGuard
from plait.trainer.progress import ProgressDisplay, human
from plait.trainer.record import config_lines
from plait.trainer.router_metrics import RouterMetrics
from plait.trainer.step import StepResult


class RunOutput:
    """The display and the metrics files of one run, and the window since the last train line."""

    def __init__(self, run: Run) -> None:
        main, cfg = run.dist.is_main, run.cfg
        self.run = run
        self.progress = ProgressDisplay(cfg.run.progress if main else "none", cfg.train.steps, run.step)
        self.metrics = MetricsLogger(cfg.run_dir, cfg.run.tensorboard) if main else None
        device, dtype = run.device, run.derived.dtype
        self.peak = peak_flops(torch.cuda.get_device_name(device), dtype) if device.type == "cuda" else None
        self.loss_sum = torch.zeros((), device=device)  # summed on device; read only when logging
        self.logged_steps = 0
        self.restart_window()

    def print(self, line: str) -> None:
        self.progress.print(line)

    def start(self) -> None:
        """The lines said once before step 1: what happened to the run directory, the model, the
        step's shape, the resolved config, the pipeline's stages."""
        run, d, t = self.run, self.run.derived, self.run.cfg.train
        for line in run.early_log if run.dist.is_main else []:
            self.print(line)
        if run.resumed_from is not None:
            self.print(f"resumed from {run.resumed_from} (step {run.step}, {human(run.tokens_seen)} tokens)")
        args = run.args
        self.print(
            f"plait: {args.layers} layers x {args.hidden} hidden, {human(d.params)} params, "
            f"{human(d.flops_per_token)} FLOPs/token | {d.device} {d.dtype} | "
            f"{d.tokens_per_step} tokens/step = {d.sequences_per_step} x {t.seq_len} "
            f"({d.dp_degree} ranks x {d.accumulation_steps} x {d.micro_batch_size} sequences) | run dir {run.cfg.run_dir}"
        )
        for line in config_lines(run.cfg):
            self.print(line)
        line = run.par.describe()
        if line:
            self.print(line)

    def restart_window(self) -> None:
        """Evaluation and saving are not training: the throughput window starts again after them."""
        self.window_start, self.window_tokens = time.perf_counter(), 0

    def add_step(self, result: StepResult) -> None:
        """A finished step: its tokens count for throughput, its loss (when finite) for the mean."""
        self.window_tokens += self.run.derived.tokens_per_step
        if result.offender is None:
            self.loss_sum += result.loss
            self.logged_steps += 1

    def log(self, step: int, result: StepResult, router: RouterMetrics, nan_guard: NanGuard) -> float:
        """Write the train line of the window that ends at `step`; return its mean loss (NaN when
        every step of it was skipped under train.nan_policy = "skip")."""
        run = self.run
        loss = mean_across_ranks(self.loss_sum, run.dist).item() / self.logged_steps if self.logged_steps else math.nan
        tokens_per_s = self.window_tokens / (time.perf_counter() - self.window_start)
        mfu = tokens_per_s * run.derived.flops_per_token / self.peak if self.peak else None
        mem = memory_bytes(run.device)
        record = {"loss": loss, "lr": result.lr, "tokens": run.tokens_seen, "tokens_per_s": tokens_per_s, "mem_bytes": mem}
        if result.grad_norm is not None:
            record["grad_norm"] = result.grad_norm.item()
        if mfu is not None:
            record["mfu"] = mfu / run.dist.world_size  # per-GPU utilisation
        record.update(router.window_record(run.dist))  # MoE only: aux_loss, moe_load_max, moe_drop_rate
        record.update(nan_guard.metrics())  # skipped_steps or rollbacks, under those policies
        if self.metrics is not None:
            self.metrics.log("train", step, **record)
        self.progress.update(step, loss, tokens_per_s, mfu, mem)
        self.loss_sum.zero_()
        self.logged_steps = 0
        self.restart_window()
        return loss

    def log_val(self, step: int, val_loss: float) -> None:
        ppl = math.exp(min(val_loss, 50))
        if self.metrics is not None:
            self.metrics.log("val", step, tokens=self.run.tokens_seen, val_loss=val_loss, val_ppl=ppl)
        self.print(f"step {step}: val_loss {val_loss:.4f} (ppl {ppl:.2f})")

    def log_metrics(self, kind: str, step: int, **values: object) -> None:
        if self.metrics is not None:
            self.metrics.log(kind, step, **values)

    def close(self) -> None:
        """Stop the live display (lines printed after it still appear) and close the files."""
        self.progress.close()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
