"""ZeRO-1 AdamW against torch's AdamW on one process, where the parity rows cannot reach.

The parity rows (`test_parity.py`) train the `debug` model, whose parameters split evenly over
2 ranks. Here 3 gloo ranks share a small model of 68 elements: the flat bucket is padded
(3 x 23), slices cut through parameters and through the boundary of the two weight-decay groups.
Each rank backpropagates its third of the batch over two micro-batches (no collective may run
before the step), clips and steps; every step's parameters and gradient norm must equal the
single-process optimizer's, and the Adam moments saved as a sharded checkpoint must equal torch's
and load back.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from .spawn import run_cases, run_on_ranks

WORLD = 3
STEPS = 4
ROWS = 4  # per rank and micro-batch


def _model() -> nn.Module:
    torch.manual_seed(0)
    # 40 + 10 + 18 = 68 elements: matrices decayed, the norm's vectors and biases not.
    return nn.Sequential(nn.Linear(7, 5), nn.LayerNorm(5), nn.Linear(5, 3))


def _run(rank: int) -> dict:
    from plait.config import OptimSection
    from plait.measure.comm_counter import CommCounter
    from plait.optim.groups import param_groups
    from plait.optim.zero1 import build_zero1_optimizer

    cfg = OptimSection(weight_decay=0.1)
    reference, model = _model(), _model()
    opt_ref = torch.optim.AdamW(param_groups(reference, cfg), betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    opt = build_zero1_optimizer(model, cfg, dist.group.WORLD, None, None)
    out: dict = {"param_diff": [], "norms": [], "micro_batch_calls": []}
    for step in range(STEPS):
        x = torch.randn(2, WORLD * ROWS, 7, generator=torch.Generator().manual_seed(step))
        for o in (opt_ref, opt):
            for group in o.param_groups:
                group["lr"] = 1e-2 * (step + 1)
        for micro in x:  # 2 accumulation steps, each the mean over its rows
            (reference(micro).square().mean() / 2).backward()
        with CommCounter() as counter:
            for micro in x:
                (model(micro[rank * ROWS : (rank + 1) * ROWS]).square().mean() / 2).backward()
        out["micro_batch_calls"].append(sum(counter.calls.values()))
        norm_ref = nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        norm = opt.clip_grad_norm_(0.05)
        out["norms"].append([norm_ref.item(), norm.item()])
        for o in (opt_ref, opt):
            o.step()
            o.zero_grad(set_to_none=True)
        out["param_diff"].append(max((a - b).abs().max().item() for a, b in zip(reference.parameters(), model.parameters())))

    # Saved as plait saves it: every rank writes its slices as boxes of the whole tensors.
    import tempfile
    from pathlib import Path

    from plait.checkpoint import named_parameters
    from plait.checkpoint.dcp_io import read_whole_tensors
    from plait.checkpoint.sharded import load_chunks, optimizer_chunks, write_checkpoint

    where = [tempfile.mkdtemp(prefix="plait-zero1-") if rank == 0 else None]
    dist.broadcast_object_list(where, src=0)
    group = dist.group.WORLD
    path = write_checkpoint(Path(where[0]), STEPS, optimizer_chunks(model, opt), {}, keep_last=1, group=group, distributed=True)
    saved = dict(read_whole_tensors(path, prefix="optim/"))
    by_id = {id(p): name for name, p in named_parameters(reference).items()}
    out["moment_diff"] = max(
        (opt_ref.state[p][key] - saved[f"{by_id[id(p)]}/{key}"]).abs().max().item()
        for group_ in opt_ref.param_groups for p in group_["params"] for key in ("exp_avg", "exp_avg_sq")
    )
    out["steps_saved"] = saved["0.weight/step"].item()
    # A fresh optimizer loads its own slices (a 3-rank reshard of the same boxes) and continues
    # like the one that saved them.
    restored = build_zero1_optimizer(model, cfg, dist.group.WORLD, None, None)
    chunks = optimizer_chunks(model, restored)
    load_chunks(path, chunks, group, True)  # the step count too: the boxes are views of the state
    for mine, theirs in zip(restored.param_groups, opt.param_groups):  # the loop sets lr every step
        mine["lr"] = theirs["lr"]
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(WORLD * ROWS, 7, generator=torch.Generator().manual_seed(99))
    results = []
    for o in (opt, restored):
        with torch.no_grad():
            for p, b in zip(model.parameters(), before):
                p.copy_(b)
        model(x[rank * ROWS : (rank + 1) * ROWS]).square().mean().backward()
        o.step()
        o.zero_grad(set_to_none=True)
        results.append([p.detach().clone() for p in model.parameters()])
    out["restored_diff"] = max((a - b).abs().max().item() for a, b in zip(*results))
    return out


def _ranks(rank: int) -> dict:
    return run_cases(rank, {"run": lambda: _run(rank)})


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = run_on_ranks(_ranks, WORLD, tmp_path_factory.mktemp("zero1"))["run"]
    if "error" in out:
        pytest.fail(out["error"], pytrace=False)
    return out


def test_steps_match_single_process_adamw(result: dict) -> None:
    assert max(result["param_diff"]) <= 1e-6, result["param_diff"]
    for ref, got in result["norms"]:
        assert abs(got - ref) <= 1e-6 * ref, (got, ref)


def test_no_collective_before_the_step(result: dict) -> None:
    assert result["micro_batch_calls"] == [0] * STEPS


def test_saved_state_is_torchs_and_loads_back(result: dict) -> None:
    assert result["moment_diff"] <= 1e-9
    assert result["steps_saved"] == STEPS
    assert result["restored_diff"] == 0.0
