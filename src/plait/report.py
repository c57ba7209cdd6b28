"""Post-run report: read a run's `metrics.jsonl`, draw loss/throughput/lr plots, summarise them.

`read_metrics` groups the log by kind with resumed-run duplicates resolved (the last line for a
step wins), `write_report` writes `loss.png`, `throughput.png` and `lr.png` and returns a `Report`
whose `summary` holds the headline numbers, and `format_summary` turns that into a few lines for a
terminal. matplotlib is imported inside `write_report` so `import plait` stays fast.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.toml"
# `final_loss` averages the train lines of the last this-many steps: one step's loss is noisy.
# A line already averages the steps since the previous one, so with train.log_every >= 10 this
# is just the last line.
FINAL_LOSS_WINDOW = 10

# (config section, key, summary key): shown in the summary when the run's config has them.
_CONFIG_FIELDS = (
    ("model", "name", "model_name"),
    ("data", "corpus", "corpus"),
    ("data", "tokenizer", "tokenizer"),
)


@dataclass
class Report:
    """What `write_report` produced: the folder, the PNGs in it and the headline numbers."""

    out_dir: Path
    files: list[Path] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def format_tokens(n: float) -> str:
    """A count with a K/M/B/T suffix and three significant digits: 3_410_000 -> '3.41M'."""
    if n is None or not math.isfinite(n):
        return str(n)
    units = ((1e3, "K"), (1e6, "M"), (1e9, "B"), (1e12, "T"))
    text = f"{n:.3g}"
    if abs(n) < 1e3 and abs(float(text)) < 1e3:
        # Plain small numbers: avoid '1e+02'-style output from :g on exact hundreds.
        return f"{n:.0f}" if float(n).is_integer() else text
    for i, (div, suffix) in enumerate(units):
        scaled = f"{n / div:.3g}"
        # Rounding can carry into the next unit (999_999 -> '1e+03K'); move up when it does.
        if abs(float(scaled)) < 1e3 or i == len(units) - 1:
            return f"{float(scaled):g}{suffix}"
    return text  # pragma: no cover - the loop always returns


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _metrics_path(run_dir: Path) -> Path:
    if not run_dir.exists():
        raise FileNotFoundError(
            f"run directory {run_dir} does not exist: pass the folder a plait training run wrote "
            f"(it holds {METRICS_FILE})"
        )
    if not run_dir.is_dir():
        raise NotADirectoryError(
            f"{run_dir} is a file, not a run directory: pass the folder that holds {METRICS_FILE}"
        )
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}: is this a plait run directory?")
    return path


def read_metrics(run_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Every record of `RUN_DIR/metrics.jsonl`, grouped by its `kind` and sorted by step.

    A resumed run re-logs steps it had logged before the crash; for a (kind, step) pair seen more
    than once, the last line in the file wins because it comes from the run that carried on.
    Records without a step (rare, e.g. a summary) are kept in file order after the stepped ones.
    A truncated final line (the process died mid-write) is skipped; a bad line elsewhere is an
    error that names the file and line.
    """
    path = _metrics_path(Path(run_dir))
    lines = path.read_text(encoding="utf-8").splitlines()
    stepped: dict[str, dict[int, dict[str, Any]]] = {}
    unstepped: dict[str, list[dict[str, Any]]] = {}
    last_nonblank = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)  # json accepts the NaN/Infinity that json.dumps writes
        except json.JSONDecodeError as exc:
            if i == last_nonblank:
                continue
            raise ValueError(
                f"{path} line {i + 1} is not valid JSON ({exc.msg}): each line must be one "
                f"JSON object"
            ) from exc
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {i + 1} is not a JSON object: got {line[:60]!r}")
        kind = record.get("kind")
        if not isinstance(kind, str):
            continue
        step = record.get("step")
        if isinstance(step, int) and not isinstance(step, bool):
            stepped.setdefault(kind, {})[step] = record  # later lines overwrite earlier ones
        else:
            unstepped.setdefault(kind, []).append(record)
    grouped: dict[str, list[dict[str, Any]]] = {}
    for kind in {*stepped, *unstepped}:
        by_step = stepped.get(kind, {})
        grouped[kind] = [by_step[s] for s in sorted(by_step)] + unstepped.get(kind, [])
    return grouped


def _read_config_fields(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CONFIG_FILE
    try:
        with path.open("rb") as fh:
            config = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError):
        # The config only decorates the report; a missing or damaged one must not block the plots.
        return {}
    out: dict[str, Any] = {}
    for section, key, name in _CONFIG_FIELDS:
        table = config.get(section)
        if isinstance(table, dict) and table.get(key) is not None:
            out[name] = table[key]
    return out


def _summarise(metrics: dict[str, list[dict[str, Any]]], run_dir: Path) -> dict[str, Any]:
    train = metrics.get("train", [])
    val = metrics.get("val", [])
    summary: dict[str, Any] = {
        "steps": train[-1]["step"],
        "tokens": train[-1].get("tokens"),
    }
    # NaN steps are counted, not averaged: one NaN would otherwise turn every mean into NaN.
    summary["nan_steps"] = sum(1 for r in train if not _is_finite(r.get("loss")))
    last_step = train[-1]["step"]
    window = [
        r["loss"] for r in train
        if r["step"] > last_step - FINAL_LOSS_WINDOW and _is_finite(r.get("loss"))
    ]
    if not window:  # the last steps were NaN: fall back to the last finite losses
        window = [r["loss"] for r in train if _is_finite(r.get("loss"))][-FINAL_LOSS_WINDOW:]
    summary["final_loss"] = statistics.fmean(window) if window else None
    speeds = [r["tokens_per_s"] for r in train if _is_finite(r.get("tokens_per_s"))]
    summary["median_tokens_per_s"] = statistics.median(speeds) if speeds else None

    finite_val = [r for r in val if _is_finite(r.get("val_loss"))]
    if finite_val:
        best = min(finite_val, key=lambda r: r["val_loss"])
        summary["best_val_loss"] = best["val_loss"]
        summary["best_val_step"] = best["step"]
    else:
        summary["best_val_loss"] = None
        summary["best_val_step"] = None
    summary["final_val_loss"] = val[-1].get("val_loss") if val else None
    summary["final_val_ppl"] = val[-1].get("val_ppl") if val else None
    summary.update(_read_config_fields(run_dir))
    return summary


def _series(records: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    """(x, y) pairs where both are finite numbers: NaN/inf and missing values are left out."""
    pairs = [(r[x], r[y]) for r in records if _is_finite(r.get(x)) and _is_finite(r.get(y))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _line_style(n: int) -> dict[str, Any]:
    # A single point draws nothing as a bare line, so short series get markers too.
    return {"marker": "o", "markersize": 3} if n <= 20 else {}


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Report:
    """Plot a run's metrics into `out_dir` (default `RUN_DIR/report/`) and summarise them.

    Writes `loss.png` (train and val loss against tokens seen), `throughput.png` (tokens/s and,
    when logged, MFU against step) and `lr.png` (learning rate against step).
    """
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    train = metrics.get("train", [])
    if not train:
        raise ValueError(
            f"{run_dir / METRICS_FILE} has no 'train' records: the run has not logged a step yet, "
            f"or this is not a plait run directory"
        )
    val = metrics.get("val", [])
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)

    import matplotlib

    # Agg renders to files without a display, so reports work on headless training machines.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    token_ticks = FuncFormatter(lambda v, _pos: format_tokens(v))
    files: list[Path] = []

    def save(fig: Any, name: str) -> None:
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)  # pyplot keeps every figure alive until closed
        files.append(path)

    # loss.png
    fig, ax = plt.subplots(figsize=(8, 5))
    xs, ys = _series(train, "tokens", "loss")
    ax.plot(xs, ys, label="train", linewidth=1, **_line_style(len(xs)))
    vx, vy = _series(val, "tokens", "val_loss")
    if vx:
        ax.plot(vx, vy, marker="o", linestyle="-", label="val")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.xaxis.set_major_formatter(token_ticks)
    ax.set_title("loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    save(fig, "loss.png")

    # throughput.png
    fig, ax = plt.subplots(figsize=(8, 5))
    xs, ys = _series(train, "step", "tokens_per_s")
    ax.plot(xs, ys, color="tab:blue", label="tokens/s", linewidth=1, **_line_style(len(xs)))
    ax.set_xlabel("step")
    ax.set_ylabel("tokens/s")
    ax.yaxis.set_major_formatter(token_ticks)
    ax.grid(True, alpha=0.3)
    mx, my = _series(train, "step", "mfu")
    if mx:
        twin = ax.twinx()
        # MFU is logged as a fraction; show it in percent, which is how people quote it.
        scale = 100.0 if max(my) <= 1.0 else 1.0
        twin.plot(
            mx, [v * scale for v in my], color="tab:orange", label="MFU", linewidth=1,
            **_line_style(len(mx)),
        )
        twin.set_ylabel("MFU (%)")
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], loc="lower right")
    ax.set_title("throughput")
    save(fig, "throughput.png")

    # lr.png
    fig, ax = plt.subplots(figsize=(8, 5))
    xs, ys = _series(train, "step", "lr")
    ax.plot(xs, ys, linewidth=1, **_line_style(len(xs)))
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(True, alpha=0.3)
    ax.set_title("learning rate")
    save(fig, "lr.png")

    return Report(out_dir=out, files=files, summary=_summarise(metrics, run_dir))


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def format_summary(report: Report) -> str:
    """A few human-readable lines: config, progress, losses, speed, and the files written."""
    s = report.summary
    lines: list[str] = []
    labels = (("model_name", "model"), ("corpus", "corpus"), ("tokenizer", "tokenizer"))
    config = [f"{label} {s[key]}" for key, label in labels if key in s]
    if config:
        lines.append("  ".join(config))
    tokens = s.get("tokens")
    tokens_text = format_tokens(tokens) if tokens is not None else "-"
    lines.append(f"steps {s.get('steps')}  tokens {tokens_text}")
    loss_line = f"final loss {_fmt(s.get('final_loss'), '.4f')}"
    if s.get("nan_steps"):
        loss_line += f"  ({s['nan_steps']} NaN-loss steps)"
    lines.append(loss_line)
    if s.get("best_val_loss") is not None or s.get("final_val_loss") is not None:
        lines.append(
            f"val loss {_fmt(s.get('final_val_loss'), '.4f')}"
            f" (ppl {_fmt(s.get('final_val_ppl'), '.2f')})"
            f"  best {_fmt(s.get('best_val_loss'), '.4f')}"
            f" at step {_fmt(s.get('best_val_step'), 'd')}"
        )
    else:
        lines.append("val loss -  (no validation logged)")
    speed = s.get("median_tokens_per_s")
    lines.append(f"median throughput {format_tokens(speed) if speed is not None else '-'} tokens/s")
    lines.append(f"plots in {report.out_dir}:")
    lines.extend(f"  {p}" for p in report.files)
    return "\n".join(lines)
