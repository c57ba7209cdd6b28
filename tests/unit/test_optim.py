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


def test_the_optimizer_recipe_in_the_architecture_page_works(monkeypatch) -> None:
    """docs/architecture.md shows adding an optimizer as one file: its code, run as written and
    listed in the table, validates as optim.name, builds under a layout and steps."""
    from plait.validation import resolve_run
    from plait.config import Config

    page = (Path(__file__).resolve().parents[2] / "docs" / "architecture.md").read_text()
    code = page.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {"__name__": "plait.optim.sgd"}
    exec(compile(code, "docs/architecture.md", "exec"), namespace)
    spec = namespace["SGD"]
    monkeypatch.setitem(OPTIMIZERS, spec.name, spec)
    run = resolve_run(Config(optim=OptimSection(name="sgd", lr=0.1, beta1=0.9)), 1)
    model = _model()
    optimizer = build_optimizer(model, run.config.optim)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["nesterov"]
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all("momentum_buffer" in state for state in optimizer.state.values())
