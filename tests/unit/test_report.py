"""Tests for plait.report: metrics parsing and dedup, the PNGs, the summary numbers, the errors."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from plait.report import Report, format_summary, format_tokens, read_metrics, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONFIG = """
[model]
name = "tiny"

[data]
corpus = "tinystories"
tokenizer = "gpt2"

[train]
steps = 30
"""


def _write_jsonl(run_dir: Path, records: list[dict], tail: str = "") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + tail
    (run_dir / "metrics.jsonl").write_text(text)


def _train(step: int, loss: float, tps: float = 1000.0, **extra) -> dict:
    return {
        "kind": "train", "step": step, "tokens": step * 4096, "loss": loss,
        "lr": 1e-3 * min(1.0, step / 5), "tokens_per_s": tps, **extra,
    }


def _val(step: int, loss: float) -> dict:
    return {
        "kind": "val", "step": step, "tokens": step * 4096, "val_loss": loss,
        "val_ppl": math.exp(loss),
    }


def _assert_pngs(report: Report) -> None:
    names = sorted(p.name for p in report.files)
    assert names == ["loss.png", "lr.png", "throughput.png"]
    for path in report.files:
        assert path.parent == report.out_dir
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC), path
        assert len(data) > 1024, path


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A 30-step run that crashed after step 25 and resumed from step 20 with other numbers."""
    run = tmp_path / "run"
    records: list[dict] = []
    for step in range(1, 26):
        records.append(_train(step, 10.0 - 0.2 * step, tps=1000.0 + step, mfu=0.3))
        if step % 10 == 0:
            records.append(_val(step, 9.0 - 0.1 * step))
    records.append({"kind": "sample", "step": 20, "text": "once upon a time"})
    # Resumed from the step-20 checkpoint: steps 21..30 are re-logged, the new ones must win.
    for step in range(21, 31):
        records.append(_train(step, 5.0 - 0.01 * step, tps=2000.0 + step, mfu=0.4))
        if step % 10 == 0:
            records.append(_val(step, 8.5))  # worse than val 20
    records.append({"kind": "summary", "final_loss": 4.7})
    records.append({"kind": "mystery", "step": 3})
    _write_jsonl(run, records)
    (run / "config.toml").write_text(CONFIG)
    return run


def test_read_metrics_groups_dedups_and_sorts(run_dir: Path) -> None:
    metrics = read_metrics(run_dir)
    train = metrics["train"]
    assert [r["step"] for r in train] == list(range(1, 31))
    # Last occurrence wins for the re-logged steps.
    assert train[21 - 1]["loss"] == pytest.approx(5.0 - 0.21)
    assert train[10 - 1]["loss"] == pytest.approx(8.0)
    assert [r["step"] for r in metrics["val"]] == [10, 20, 30]
    assert metrics["val"][1]["val_loss"] == pytest.approx(7.0)
    assert metrics["sample"][0]["text"] == "once upon a time"
    assert metrics["summary"] == [{"kind": "summary", "final_loss": 4.7}]


def test_write_report_files_and_summary(run_dir: Path) -> None:
    report = write_report(run_dir)
    assert report.out_dir == run_dir / "report"
    _assert_pngs(report)

    s = report.summary
    final_losses = [5.0 - 0.01 * step for step in range(21, 31)]
    assert s["steps"] == 30
    assert s["tokens"] == 30 * 4096
    assert s["final_loss"] == pytest.approx(statistics.fmean(final_losses))
    # Steps 1..20 from the first attempt, 21..30 from the resumed one.
    tps = [1000.0 + step for step in range(1, 21)] + [2000.0 + step for step in range(21, 31)]
    assert s["median_tokens_per_s"] == pytest.approx(statistics.median(tps))
    # val 20 (7.0) comes from the first attempt; the resumed run's val 30 (8.5) is worse.
    assert s["best_val_loss"] == pytest.approx(7.0)
    assert s["best_val_step"] == 20
    assert s["final_val_loss"] == pytest.approx(8.5)
    assert s["final_val_ppl"] == pytest.approx(math.exp(8.5))
    assert s["nan_steps"] == 0
    assert s["model_name"] == "tiny"
    assert s["corpus"] == "tinystories"
    assert s["tokenizer"] == "gpt2"

    text = format_summary(report)
    assert "tiny" in text and "tinystories" in text
    assert "123K" in text  # 30 * 4096 = 122,880 tokens
    assert "best 7.0000 at step 20" in text
    for path in report.files:
        assert str(path) in text


def test_relogged_val_step_last_wins(tmp_path: Path) -> None:
    run = tmp_path / "run"
    records = [_train(1, 3.0), _val(1, 2.0), _train(2, 2.5), _val(2, 1.5), _val(2, 1.8)]
    _write_jsonl(run, records)
    report = write_report(run, out_dir=tmp_path / "out")
    assert report.out_dir == tmp_path / "out"
    _assert_pngs(report)
    assert report.summary["best_val_loss"] == pytest.approx(1.8)
    assert report.summary["best_val_step"] == 2
    assert report.summary["final_val_loss"] == pytest.approx(1.8)


def test_no_val_and_no_config(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write_jsonl(run, [_train(step, 4.0 - 0.1 * step) for step in range(1, 6)])
    report = write_report(run)
    _assert_pngs(report)
    s = report.summary
    assert s["best_val_loss"] is None and s["best_val_step"] is None
    assert s["final_val_loss"] is None and s["final_val_ppl"] is None
    assert "model_name" not in s and "corpus" not in s
    assert s["final_loss"] == pytest.approx(statistics.fmean(4.0 - 0.1 * i for i in range(1, 6)))
    assert "no validation" in format_summary(report)


def test_single_step(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write_jsonl(run, [_train(1, 11.0)])
    report = write_report(run)
    _assert_pngs(report)
    assert report.summary["steps"] == 1
    assert report.summary["final_loss"] == pytest.approx(11.0)
    assert report.summary["median_tokens_per_s"] == pytest.approx(1000.0)


def test_nan_losses_are_counted_and_skipped(tmp_path: Path) -> None:
    run = tmp_path / "run"
    records = [_train(step, 3.0) for step in range(1, 9)]
    records[3]["loss"] = float("nan")  # json.dumps writes NaN, as a Python trainer would
    records[6]["loss"] = float("nan")
    # A crash mid-write leaves a truncated last line: it is skipped, not an error.
    _write_jsonl(run, records, tail='{"kind": "train", "step": 9, "lo')
    report = write_report(run)
    _assert_pngs(report)
    assert report.summary["nan_steps"] == 2
    assert report.summary["steps"] == 8
    assert report.summary["final_loss"] == pytest.approx(3.0)
    assert "2 NaN-loss steps" in format_summary(report)


def test_missing_run_dir_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "runs" / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        write_report(missing)


def test_dir_without_metrics_names_path(tmp_path: Path) -> None:
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as info:
        read_metrics(empty)
    assert str(empty) in str(info.value)
    assert "metrics.jsonl" in str(info.value)


def test_no_train_records_is_value_error(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write_jsonl(run, [])
    with pytest.raises(ValueError, match="no 'train' records"):
        write_report(run)


def test_bad_line_in_middle_names_file_and_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        json.dumps(_train(1, 2.0)) + "\nnot json\n" + json.dumps(_train(2, 2.0)) + "\n"
    )
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(run)


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0"), (512, "512"), (1_000_000, "1M"), (3_410_000, "3.41M"), (999_999, "1M"),
     (122_880, "123K"), (2.5e9, "2.5B")],
)
def test_format_tokens(n: float, text: str) -> None:
    assert format_tokens(n) == text


def test_final_loss_spans_steps_not_lines(tmp_path: Path) -> None:
    # Logged every 10 steps: each line already averages 10 steps, so only the last one counts.
    _write_jsonl(tmp_path, [_train(step, 5.0 - step / 100) for step in range(10, 101, 10)])
    assert write_report(tmp_path).summary["final_loss"] == pytest.approx(4.0)
