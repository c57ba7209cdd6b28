"""`plait train --nproc-per-node 2 --parallel.auto=true` on a profile: the launcher plans once,
prints the top layouts and the choice, writes plan.txt, and the two gloo workers train the chosen
layout, which is what the run records."""

from __future__ import annotations

import json

from plait.config import load_toml
from plait.hardware.devices import Cluster, Device, Link
from plait.hardware.profile import write_profile
from plait.validation import resolve_run

from .layouts import BASE, plait_cli


def test_auto_plans_at_start_up_and_trains_the_choice(tmp_path):
    profile = tmp_path / "local.toml"
    device = Device(name="cpu", peak_flops={"fp32": 1e11, "bf16": 2e10}, memory_bytes=4 * 2**30, matmul_efficiency=1.0)
    link = Link(bandwidth=2e9, latency=3e-5)
    write_profile(Cluster(device=device, gpus=2, gpus_per_node=2, intra=link, inter=link, host_memory_bytes=8 * 2**30,
                          source="test"), profile)
    run_dir = tmp_path / "run"
    out = plait_cli("train", "--nproc-per-node", "2", *BASE, f"--run.dir={run_dir}", "--train.steps=3",
                    "--run.progress=plain", "--parallel.auto=true", f"--parallel.cluster_profile={profile}")
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    plan = (run_dir / "plan.txt").read_text()
    chosen = next(line for line in plan.splitlines() if line.startswith("chosen: "))
    assert "tok/s/GPU" in out.stdout and chosen in out.stdout  # the table and the choice, printed once
    assert out.stdout.count("parallel.auto: planned for 2 worker(s)") == 1  # by the launcher, not the workers
    saved = load_toml(run_dir / "config.toml")  # what the workers ran
    assert not saved.parallel.auto and saved.parallel.cluster_profile == str(profile)
    ran = resolve_run(saved, 2).layout
    assert ran.world == 2 and chosen == f"chosen: {ran.short()}"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]

