"""The time model ranks layouts the way this machine runs them.

This machine is calibrated with 2 workers (quick settings), then four layouts of the `tiny` model
that the planner offers for those 2 workers are each trained for 3 steps through
`plait train --nproc-per-node 2`, and the Spearman correlation of predicted and measured step
times must be at least 0.8 (with four layouts: the right order, or one neighbouring pair swapped).
The four differ in what the model must get right: data parallel with and without activation
checkpointing (the recomputed forward), ZeRO-3 at one sequence per micro-batch (gathers and
reduce-scatters on every micro-batch, not overlapped on a CPU, and FSDP's host time), and tensor
parallelism at one sequence per micro-batch (per-layer all-reduces and the DTensor wrappers'
host time). Each startup costs ~10 s, so the test keeps to four; `bench/planner_ranking.py`
measures a seeded sample of 16 (Spearman 0.92 in bench/RESULTS.md).
"""

from __future__ import annotations

from plait.config import Config, set_value
from plait.measure.calibrate import calibrate
from plait.measure.step_time import measure_step_time, spearman
from plait.planner import workload_from_config
from plait.planner.search import enumerate_layouts
from plait.planner.timing import estimate_time
from plait.layout import Layout

LAYOUTS = [
    Layout(dp_replicate=2, micro_batch_size=4, mixed_precision=False),
    Layout(dp_replicate=2, micro_batch_size=4, activation_checkpointing=True, mixed_precision=False),
    Layout(dp_shard=2, zero_stage=3, micro_batch_size=1, mixed_precision=False),
    Layout(tp=2, micro_batch_size=1, mixed_precision=False),
]


def test_predicted_step_time_ranking_agrees_with_measured(tmp_path):
    cluster = calibrate(2, tmp_path / "local.toml", message_bytes=(2**16, 2**20, 2**22), matmul_sizes=(256,),
                        seconds_per_point=0.02)
    cfg = Config()
    set_value(cfg, "model.name", "tiny")
    workload = workload_from_config(cfg, 128, 8, "fp32")
    offered = set(enumerate_layouts(workload, cluster))
    predicted, measured = [], []
    for i, layout in enumerate(LAYOUTS):
        assert layout in offered, f"{layout.short()} is not a layout the planner offers"
        predicted.append(estimate_time(workload, layout, cluster).step_s)
        got = measure_step_time(layout, workload, tmp_path / f"run{i}",
                                ["--model.name=tiny", "--train.dtype=fp32", "--train.device=cpu"], steps=3, warmup=1)
        measured.append(got["step_s"])
    rho = spearman(predicted, measured)
    table = "\n".join(f"{lay.short():<28} predicted {p:.3f} s  measured {m:.3f} s"
                      for lay, p, m in zip(LAYOUTS, predicted, measured))
    assert rho >= 0.8, f"Spearman {rho:.2f}\n{table}"
