"""What a person sees while training: a live `rich` bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


class ProgressDisplay:
    """`mode`: "rich" (live bar), "plain" (a line per update), "none", or "auto" (rich on a TTY)."""

    def __init__(self, mode: str, total_steps: int, start_step: int) -> None:
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self.mode = mode
        self.console = Console()
        self.total = total_steps
        self._start = time.perf_counter()
        self._start_step = start_step
        self._progress: Progress | None = None
        if mode == "rich":
            self._progress = Progress(
                TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
                TextColumn("{task.fields[stats]}"), TextColumn("eta"), TimeRemainingColumn(),
                console=self.console, transient=False,
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, stats="")
            self._progress.start()

    def print(self, message: str) -> None:
        if self.mode != "none":
            self.console.print(message, highlight=False, markup=False, soft_wrap=True)

    def update(self, step: int, loss: float, tokens_per_s: float, mfu: float | None, mem_bytes: int | None) -> None:
        parts = [f"loss {loss:.4f}", f"{human(tokens_per_s)} tok/s"]
        if mfu is not None:
            parts.append(f"MFU {mfu * 100:.1f}%")
        if mem_bytes:
            parts.append(f"mem {mem_bytes / 2**30:.2f} GiB")
        stats = "  ".join(parts)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, stats=stats)
        elif self.mode == "plain":
            done = step - self._start_step
            elapsed = time.perf_counter() - self._start
            eta = elapsed / done * (self.total - step) if done else 0.0
            print(f"step {step}/{self.total}  {stats}  eta {eta:.0f}s", flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
