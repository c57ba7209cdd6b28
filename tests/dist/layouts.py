"""The parity harness: run one layout of the `debug` model from the CLI and return its losses.

`run_layout(tmp_path, nproc, overrides)` trains 20 steps with a fixed seed through
`plait train --nproc-per-node N` (or in one process when N is 1) and returns the per-step
training losses from metrics.jsonl; a new row of the parity matrix is one call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import plait

STEPS = 20
BASE = [
    "--config", str(Path(__file__).resolve().parents[2] / "configs" / "debug.toml"),
    f"--train.steps={STEPS}", "--train.log_every=1", "--train.eval_every=0", "--train.sample_tokens=0",
    "--checkpoint.every=0", "--run.progress=none", "--run.tensorboard=false", "--train.dtype=fp32",
    # The matrix is the gloo-on-CPU one, also on a machine with a GPU.
    "--train.device=cpu",
]


def plait_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m plait ARGS` with this checkout's plait, outside any torchrun job."""
    env = {**os.environ, "PYTHONPATH": str(Path(plait.__file__).parents[1])}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "plait", *args], capture_output=True, text=True, env=env, timeout=timeout)


def train_losses(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if x["kind"] == "train"]


def run_layout(run_dir: Path, nproc: int, overrides: list[str]) -> list[float]:
    launch = ["--nproc-per-node", str(nproc)] if nproc > 1 else []
    args = ["train", *launch, *BASE, f"--run.dir={run_dir}", *overrides]
    out = plait_cli(*args)
    assert out.returncode == 0, f"plait {' '.join(args)}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    losses = train_losses(run_dir)
    assert len(losses) == STEPS
    return losses


def assert_parity(reference: list[float], losses: list[float], first_rel: float = 1e-6, later_rel: float = 1e-4) -> None:
    assert abs(losses[0] - reference[0]) <= first_rel * abs(reference[0]), (losses[0], reference[0])
    for step, (ref, got) in enumerate(zip(reference[1:], losses[1:]), start=2):
        assert abs(got - ref) <= later_rel * abs(ref), f"step {step}: {got} vs {ref}"
