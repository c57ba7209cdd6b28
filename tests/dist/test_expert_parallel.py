"""Expert parallelism on 2 gloo ranks against the single-process MoE layer.

One spawn of two CPU workers: each rank feeds its half of a batch through an MoE layer whose
experts are spread over the two ranks (all-to-all dispatch and combine) and whose router counts
are summed over the ranks; the reference is the unsharded layer on the whole batch. Outputs,
balance loss, and the gradients of the input, the router and every expert (gathered with
`.full_tensor()`) must equal the reference, dropless and with a capacity that drops tokens.
"""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

from .spawn import run_cases, run_on_ranks
from plait.model import NAMED_SIZES

WORLD = 2
BATCH, SEQ = 4, 16  # whole batch; each rank takes BATCH / WORLD sequences
ARGS = NAMED_SIZES["debug-moe"].replace(vocab=256)
CASES = {"dropless": 0.0, "capacity-1.0": 1.0}


def _moe(capacity_factor: float):
    from plait.model.moe import MoE

    torch.manual_seed(0)
    layer = MoE(ARGS.replace(moe_capacity_factor=capacity_factor))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.3)  # wide weights: uneven routing, so the splits are really uneven
    return layer


def _run_case(capacity_factor: float, rank: int, mesh) -> dict:
    from torch.distributed.tensor import DTensor

    from plait.parallel.expert_parallel import apply_expert_parallel, apply_global_load_balance

    gen = torch.Generator().manual_seed(1234)
    x_BTD = torch.randn(BATCH, SEQ, ARGS.hidden, generator=gen)
    w_BTD = torch.randn(BATCH, SEQ, ARGS.hidden, generator=gen)  # a fixed linear readout for the loss
    half = BATCH // WORLD
    mine = slice(rank * half, (rank + 1) * half)

    # Reference: the whole batch in one layer. Its loss is the mean of the ranks' losses (as the
    # data-parallel gradient average makes it): a per-rank mean readout, plus the balance loss.
    ref = _moe(capacity_factor)
    x_ref = x_BTD.clone().requires_grad_()
    out_ref = ref(x_ref)
    readout = sum((out_ref[r * half:(r + 1) * half] * w_BTD[r * half:(r + 1) * half]).mean() for r in range(WORLD)) / WORLD
    (readout + ref.aux_loss).backward()

    ep = _moe(capacity_factor)
    apply_expert_parallel(ep, mesh)
    apply_global_load_balance(ep, None)
    x_ep = x_BTD[mine].clone().requires_grad_()
    out_ep = ep(x_ep)
    ((out_ep * w_BTD[mine]).mean() + ep.aux_loss).backward()
    # Data-parallel averaging of the dense gradients (the router) and of the input's; the expert
    # gradients already hold every rank's tokens and are divided by the data-parallel degree.
    router_grad = ep.router.weight.grad.clone()
    dist.all_reduce(router_grad)
    aux = ep.aux_loss.detach().clone()
    dist.all_reduce(aux)
    out = {
        "out": (out_ep - out_ref[mine]).abs().max().item(),
        "x_grad": (x_ep.grad / WORLD - x_ref.grad[mine]).abs().max().item(),
        "router_grad": (router_grad / WORLD - ref.router.weight.grad).abs().max().item(),
        "aux": [aux.item() / WORLD, ref.aux_loss.item()],
        "dropped": ref.stats[-1].item(),
        "local_experts": ep.experts.gate_proj.to_local().shape[0],
    }
    for name in ("gate_proj", "up_proj", "down_proj"):
        param = getattr(ep.experts, name)
        assert isinstance(param, DTensor)
        full = param.grad.full_tensor() / WORLD
        out[name] = (full - getattr(ref.experts, name).grad).abs().max().item()
    return out


def _ranks(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("ep",))
    return run_cases(rank, {name: (lambda c=factor: _run_case(c, rank, mesh)) for name, factor in CASES.items()})


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_on_ranks(_ranks, WORLD, tmp_path_factory.mktemp("ep"))


@pytest.mark.parametrize("case", list(CASES))
def test_dispatch_combine_matches_single_process(results: dict, case: str) -> None:
    r = results[case]
    if "error" in r:
        pytest.fail(r["error"], pytrace=False)
    assert r["local_experts"] == ARGS.moe_experts // WORLD
    assert r["out"] <= 1e-6, r
    assert abs(r["aux"][0] - r["aux"][1]) <= 1e-6 * r["aux"][1], r["aux"]
    for key in ("x_grad", "router_grad", "gate_proj", "up_proj", "down_proj"):
        assert r[key] <= 1e-6, (key, r[key])
    if CASES[case] > 0:
        assert r["dropped"] > 0, "the capacity case must really drop tokens"
    else:
        assert r["dropped"] == 0
