"""Where numbers go: `metrics.jsonl` (one JSON object per line) and TensorBoard event files.

Every line carries `kind` ("train", "val", "sample", "summary") and `step`. Train lines hold at
least `loss`, `lr`, `tokens`, `tokens_per_s`; val lines `val_loss` and `val_ppl`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLogger:
    def __init__(self, run_dir: Path, tensorboard: bool) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = open(self.path, "a", buffering=1)  # line-buffered: a crash keeps every line
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency, but a trimmed install may lack it
                self._tb = None
            else:
                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, kind: str, step: int, **values: Any) -> None:
        record = {"kind": kind, "step": step, **values}
        # JSON has no NaN: write null so every line stays parseable by any reader.
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)
                elif isinstance(value, str) and kind == "sample":
                    self._tb.add_text(f"{kind}/{key}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
