"""The non-finite loss check on 2 gloo ranks: every rank reaches the same verdict and names the
lowest rank that saw a NaN or inf, and whether it was the loss or only the gradient norm."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .spawn import run_on_ranks

WORLD = 2
NAN, INF = math.nan, math.inf
# Per case: each rank's (step loss, gradient norm or None).
CASES = {
    "all_finite": [(2.0, 1.0), (2.1, None)],
    "loss_on_1": [(2.0, 1.0), (NAN, 1.0)],
    "lowest_wins": [(INF, 1.0), (NAN, NAN)],
    "grad_norm_on_0": [(2.0, INF), (NAN, 1.0)],
}


def _run(rank: int) -> dict:
    from plait.parallel.job import DistInfo
    from plait.trainer.nan_guard import NanGuard

    guard = NanGuard("stop", DistInfo(rank=rank, world_size=WORLD, local_rank=rank, device=torch.device("cpu")))
    mine = {}
    for name, values in CASES.items():
        loss, norm = values[rank]
        found = guard.find_offender(torch.tensor(loss), None if norm is None else torch.tensor(norm))
        mine[name] = None if found is None else [found.rank, found.what]
    every: list = [None] * WORLD
    dist.all_gather_object(every, mine)
    return {"per_rank": every}


def test_every_rank_names_the_lowest_offender(tmp_path):
    per_rank = run_on_ranks(_run, WORLD, tmp_path)["per_rank"]
    assert all(answers == per_rank[0] for answers in per_rank), per_rank
    assert per_rank[0] == {
        "all_finite": None,
        "loss_on_1": [1, "loss"],
        "lowest_wins": [0, "loss"],
        "grad_norm_on_0": [0, "gradient norm"],
    }
