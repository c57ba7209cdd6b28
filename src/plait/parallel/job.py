"""Process groups: joining the job torchrun started, and leaving it cleanly.

A worker is part of a multi-process job when torchrun has set WORLD_SIZE > 1 in its environment;
this is the one place that reads those variables. Backend: NCCL when each worker has a GPU, gloo
otherwise. World size one initialises nothing and runs the same training code.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# A collective that waits longer than this fails the job (torchrun then stops every worker)
# instead of hanging for PyTorch's default 30 minutes.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    """Workers in this job as torchrun announced them (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_local_world_size() -> int:
    """Workers of this job on this node as torchrun announced them (the whole job outside torchrun
    or when torchrun did not say)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", str(launched_world_size())))


def launched_rank() -> int:
    """This worker's rank in the job as torchrun announced it (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def check_gpus_per_node(device_name: str, nproc_per_node: int) -> None:
    """Workers on a GPU take one GPU each: refuse more workers per node than there are GPUs
    (before any worker starts) instead of failing inside NCCL."""
    if device_name not in ("auto", "cuda") or not torch.cuda.is_available():
        return
    gpus = torch.cuda.device_count()
    if nproc_per_node > gpus:
        from plait.config import ConfigError

        raise ConfigError(
            f"--nproc-per-node {nproc_per_node} with train.device = {device_name!r}: each worker takes one GPU, "
            f"but this node has {gpus}; use --nproc-per-node {gpus}, or --train.device=cpu for CPU workers (gloo)"
        )


def init_distributed(device: torch.device) -> DistInfo:
    """Join the job (if there is one) and pick this worker's device."""
    world = launched_world_size()
    if world == 1:
        return DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        check_gpus_per_node(device.type, int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1)))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT, device_id=device if backend == "nccl" else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def mean_across_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of a scalar over all ranks (the value itself on one process)."""
    if info.world_size == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / info.world_size


def min_across_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The minimum of an integer scalar over all ranks (the value itself on one process)."""
    if info.world_size == 1:
        return value
    low = value.detach().clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return low


@dataclass(frozen=True)
class StoreAddress:
    """Where the job's c10d key-value store listens (torchrun's agent hosts it), and a key prefix
    unique to this run and restart, so that a restarted job does not read the last attempt's keys."""

    host: str
    port: int
    prefix: str


def job_store_address() -> StoreAddress | None:
    """The job's TCPStore as torchrun announced it; None outside a multi-process job."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if launched_world_size() == 1 or not host or not port:
        return None
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return StoreAddress(host=host, port=int(port), prefix=f"plait/{run_id}/{restart}/")


def shutdown(info: DistInfo) -> None:
    """Leave the job cleanly: without the barrier and gc, gloo threads freed during interpreter
    shutdown sometimes abort a worker that finished correctly."""
    if info.world_size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()
