"""Multi-process unit tests: run a function on N gloo processes and bring back rank 0's results.

`run_on_ranks(body, world, tmp)` spawns `world` processes, joins them to one gloo group, calls
`body(rank)` in each (a module-level function, so it can be sent to the children) and returns
the JSON-able dict rank 0's call returned. `run_cases` runs several cases on a rank, keeping each
failure's traceback as that case's result, so one broken case reports itself and the others
still run.
"""

from __future__ import annotations

import datetime
import gc
import json
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_on_ranks(body: Callable[[int], dict], world: int, tmp: Path) -> dict:
    result_path = tmp / "results.json"
    # mp.spawn raises with the worker's traceback if a worker fails or dies.
    mp.spawn(_worker, args=(body, world, str(tmp / "store"), str(result_path)), nprocs=world, join=True)
    return json.loads(result_path.read_text())


def run_cases(rank: int, cases: dict[str, Callable[[], object]]) -> dict:
    results: dict = {}
    for name, case in cases.items():
        try:
            results[name] = case()
        except Exception:
            results[name] = {"error": f"rank {rank}:\n{traceback.format_exc()}"}
    return results


def _worker(rank: int, body: Callable[[int], dict], world: int, store: str, result_path: str) -> None:
    torch.set_num_threads(1)  # several processes share two cores
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    results = body(rank)
    if rank == 0:
        Path(result_path).write_text(json.dumps(results))
    # Without this teardown gloo sometimes aborts the process at interpreter exit.
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()
