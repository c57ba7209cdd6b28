"""The launcher's checks that need no worker: GPUs per node, and the torchrun command line."""

from __future__ import annotations

import argparse

import pytest
import torch

from plait.config import ConfigError
from plait.launch import torchrun_command
from plait.parallel.distributed import check_gpus_per_node


def test_more_workers_than_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="--nproc-per-node 2 .* this node has 1; use --nproc-per-node 1, or --train.device=cpu"):
        check_gpus_per_node("auto", 2)
    check_gpus_per_node("auto", 1)
    check_gpus_per_node("cpu", 4)  # CPU workers are not limited by the GPUs


def test_no_gpu_means_cpu_workers(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_gpus_per_node("auto", 8)


def test_torchrun_command_single_and_multi_node():
    one = argparse.Namespace(nproc_per_node=4, nnodes=1, max_restarts=0, rdzv_endpoint=None, node_rank=None, config=None)
    cmd = torchrun_command(one, ["--train.steps=5"])
    assert "--standalone" in cmd and "--nproc-per-node=4" in cmd and cmd[-1] == "--train.steps=5"
    two = argparse.Namespace(nproc_per_node=8, nnodes=2, max_restarts=3, rdzv_endpoint="head:29500", node_rank=1, config="c.toml")
    cmd = torchrun_command(two, [])
    assert "--rdzv-endpoint=head:29500" in cmd and "--node-rank=1" in cmd and "--max-restarts=3" in cmd
    assert cmd[-2:] == ["--config", "c.toml"]
    with pytest.raises(SystemExit, match="--rdzv-endpoint"):
        torchrun_command(argparse.Namespace(**{**vars(two), "rdzv_endpoint": None}), [])
