"""The table of optimizers: `build_optimizer` goes through it, and reading it needs no torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

import plait
from plait.config import OptimSection
from plait.optim import OPTIMIZERS, OptimizerSpec, build_optimizer


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))


def test_build_optimizer_dispatches_through_the_table(monkeypatch) -> None:
    calls = []

    def build(groups, cfg, foreach):
        calls.append((groups, cfg, foreach))
        return torch.optim.SGD(groups, lr=cfg.lr)

    monkeypatch.setitem(OPTIMIZERS, "fake", OptimizerSpec("fake", build, True, 0, "a test's SGD"))
    model, cfg = _model(), OptimSection(name="fake", weight_decay=0.2)
    optimizer = build_optimizer(model, cfg, foreach=False)
    assert isinstance(optimizer, torch.optim.SGD)
    [(groups, seen_cfg, foreach)] = calls
    assert seen_cfg is cfg and foreach is False
    # The shared groups: the matrix decayed, the bias and the norm's vectors not.
    assert [len(g["params"]) for g in groups] == [1, 3]
    assert [g["weight_decay"] for g in groups] == [0.2, 0.0]


def test_adamw_is_the_table_entry_the_config_names() -> None:
    assert all(name == spec.name for name, spec in OPTIMIZERS.items())
    spec = OPTIMIZERS[OptimSection().name]
    assert spec.elementwise and spec.state_bytes_per_param == 8
    cfg = OptimSection(lr=1e-3, beta1=0.8, beta2=0.9, eps=1e-6)
    optimizer = build_optimizer(_model(), cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.8, 0.9) and optimizer.defaults["eps"] == 1e-6
    assert optimizer.defaults["foreach"] is True


def test_reading_the_table_does_not_import_torch() -> None:
    code = ("import sys\n"
            "from plait.optim import OPTIMIZERS, lr_at\n"
            "from plait.optim.groups import param_groups\n"
            "assert OPTIMIZERS['adamw'].state_bytes_per_param == 8\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(plait.__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
