"""ZeRO-1 over element-wise optimizers other than AdamW: SGD with momentum and Adagrad.

3 gloo ranks share the small model of test_zero1.py (68 elements: slices cut through parameters
and through the boundary of the two weight-decay groups). `Zero1Optimizer` wraps torch's
optimizer as it is, knowing none of its state's keys; after a few steps the parameters must equal
the same optimizer's, unsharded, on the whole batch, each rank must hold the state of its slice
only, and the state saved as a sharded checkpoint must load into the unsharded optimizer with
exactly the values the ranks held.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from torch import nn

from .spawn import run_cases, run_on_ranks

WORLD = 3
STEPS = 3
ROWS = 4  # per rank
NUMEL = 68

OPTIMIZERS: dict[str, Callable[[list[dict]], torch.optim.Optimizer]] = {
    "sgd": lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9, foreach=True),
    "adagrad": lambda groups: torch.optim.Adagrad(groups, lr=0.05, foreach=True),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 5), nn.LayerNorm(5), nn.Linear(5, 3))


def _run(rank: int, name: str) -> dict:
    import shutil
    import tempfile
    from pathlib import Path

    from plait.checkpoint import named_parameters
    from plait.checkpoint.sharded import load_chunks, optimizer_chunks, write_checkpoint
    from plait.config import OptimSection
    from plait.optim.groups import param_groups
    from plait.optim.zero1 import Zero1Optimizer

    make = OPTIMIZERS[name]
    cfg = OptimSection(weight_decay=0.1)
    reference, model = _model(), _model()
    opt_ref = make(param_groups(reference, cfg))
    opt = Zero1Optimizer(param_groups(model, cfg), make, dist.group.WORLD)
    out: dict = {"param_diff": []}
    for step in range(STEPS):
        x = torch.randn(WORLD * ROWS, 7, generator=torch.Generator().manual_seed(step))
        reference(x).square().mean().backward()
        model(x[rank * ROWS : (rank + 1) * ROWS]).square().mean().backward()
        for o in (opt_ref, opt):
            o.step()
            o.zero_grad(set_to_none=True)
        out["param_diff"].append(max((a - b).abs().max().item() for a, b in zip(reference.parameters(), model.parameters())))

    # Sharded: the per-element state this rank holds covers its slice, 1/3 of the (padded) bucket.
    held = {}
    for state in opt._inner.state.values():
        for key, value in state.items():
            if value.dim() > 0:
                held[key] = held.get(key, 0) + value.numel()
    out["held"] = held

    where = [tempfile.mkdtemp(prefix="plait-zero1-") if rank == 0 else None]
    dist.broadcast_object_list(where, src=0)
    group = dist.group.WORLD
    path = write_checkpoint(Path(where[0]), STEPS, optimizer_chunks(model, opt), {}, keep_last=1, group=group, distributed=True)
    # Every rank loads the whole state into an unsharded optimizer of the same kind.
    plain_model = _model()
    plain = make(param_groups(plain_model, cfg))
    load_chunks(path, optimizer_chunks(plain_model, plain), group, True)
    plain_params = named_parameters(plain_model)
    # Exactly what each rank held, piece by piece (scalars too), ...
    names = {id(p): n for n, p in named_parameters(model).items()}
    loaded_diff = torch.zeros(())
    for piece in opt.state_pieces():
        loaded = plain.state[plain_params[names[id(piece.param)]]][piece.key].reshape(-1)
        loaded_diff = torch.maximum(loaded_diff, (loaded[piece.start : piece.start + piece.flat.numel()] - piece.flat).abs().max())
    dist.all_reduce(loaded_diff, op=dist.ReduceOp.MAX)  # also: every rank has loaded
    if rank == 0:
        shutil.rmtree(where[0], ignore_errors=True)
    out["loaded_diff"] = loaded_diff.item()
    # ... and, up to the rounding of the averaged gradients, what the unsharded optimizer has.
    ref_params = named_parameters(reference)
    out["keys"] = sorted(opt_ref.state[next(iter(ref_params.values()))])
    out["state_diff"] = max(
        (opt_ref.state[p][key] - plain.state[plain_params[n]][key]).abs().max().item()
        for n, p in ref_params.items() for key in opt_ref.state[p]
    )
    return out


def _ranks(rank: int) -> dict:
    return run_cases(rank, {name: (lambda name=name: _run(rank, name)) for name in OPTIMIZERS})


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_on_ranks(_ranks, WORLD, tmp_path_factory.mktemp("zero1-optimizers"))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_zero1_steps_shards_and_saves_like_the_unsharded_optimizer(results: dict, name: str) -> None:
    out = results[name]
    if "error" in out:
        pytest.fail(out["error"], pytrace=False)
    assert max(out["param_diff"]) <= 1e-6, out["param_diff"]
    slice_numel = -(-NUMEL // WORLD)
    assert out["held"] and all(n <= slice_numel for n in out["held"].values()), out["held"]
    assert out["keys"] == {"sgd": ["momentum_buffer"], "adagrad": ["step", "sum"]}[name]
    assert out["loaded_diff"] == 0.0, out["loaded_diff"]
    assert out["state_diff"] <= 1e-6, out["state_diff"]
