"""The launcher's checks that need no worker: GPUs per node, the torchrun command line, the workers'
environment, the loopback rendezvous's refusals."""

from __future__ import annotations

import argparse
import socket

import pytest
import torch

from plait.config import ConfigError
from plait.launch import DEFAULT_MAX_RESTARTS, launch_env, loopback_interface, torchrun_command
from plait.parallel.job import check_gpus_per_node


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


def _args(**kw) -> argparse.Namespace:
    """The launch options as `plait train` parses them (defaults included), updated with `kw`."""
    from plait.cli import _parser

    args, _ = _parser().parse_known_args(["train", "--nproc-per-node", "4"])
    return argparse.Namespace(**{**vars(args), **kw})


def test_torchrun_command_single_and_multi_node():
    cmd = torchrun_command(_args())
    agent, torchrun = cmd[:cmd.index("--")], cmd[cmd.index("--") + 1:]
    assert agent[1:] == ["-m", "plait.launch_agent"]  # torchrun's agent with plait's loopback rendezvous
    assert "--rdzv-backend=plait-loopback" in torchrun and "--rdzv-endpoint=127.0.0.1" in torchrun
    assert "--standalone" not in torchrun  # its store would listen on every interface
    assert "--nproc-per-node=4" in torchrun and f"--max-restarts={DEFAULT_MAX_RESTARTS}" in torchrun
    assert torchrun[-3:] == ["-m", "plait", "train"]  # no config: the workers get the resolved run
    two = _args(nproc_per_node=8, nnodes=2, max_restarts=3, rdzv_endpoint="head:29500", node_rank=1, config="c.toml")
    cmd = torchrun_command(two)
    assert "--host-store=head:29500" in cmd[:cmd.index("--")]  # hosted on head's address, by the node that owns it
    assert "--rdzv-backend=c10d" in cmd and "--rdzv-endpoint=head:29500" in cmd and "--node-rank=1" in cmd
    assert "--max-restarts=3" in cmd and "c.toml" not in cmd
    with pytest.raises(SystemExit, match="--rdzv-endpoint"):
        torchrun_command(_args(nnodes=2))


def test_launch_env_keeps_one_node_on_loopback_and_user_choices():
    lo = loopback_interface()
    assert lo in {name for _, name in socket.if_nameindex()}
    env = launch_env(_args(), {"PATH": "/bin"})
    assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == lo and env["PATH"] == "/bin"
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in env
    assert launch_env(_args(), {"NCCL_SOCKET_IFNAME": "ib0"})["NCCL_SOCKET_IFNAME"] == "ib0"
    multi = launch_env(_args(nnodes=2, rdzv_endpoint="head:29500"), {})
    assert "GLOO_SOCKET_IFNAME" not in multi and multi["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"


def test_loopback_rendezvous_refuses_other_endpoints_and_nodes():
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    from plait.launch_agent import _create_loopback

    assert _create_loopback(RendezvousParameters("plait-loopback", "127.0.0.1", "r", 1, 1)).get_run_id() == "r"
    with pytest.raises(ValueError, match="listens on 127.0.0.1, not on --rdzv-endpoint=10.0.0.1:29400"):
        _create_loopback(RendezvousParameters("plait-loopback", "10.0.0.1:29400", "r", 1, 1))
    with pytest.raises(ValueError, match="for one node"):
        _create_loopback(RendezvousParameters("plait-loopback", "", "r", 2, 2))


def test_a_worker_trains_the_resolved_run_without_validating_again(tmp_path, monkeypatch, capsys):
    """What `plait train --nproc-per-node` hands its workers is the validated, resolved run: a
    worker trains it as given, with no validation, resolution or planning of its own (here one
    process plays the worker; refusing any of those calls proves none is made)."""
    import plait.validation
    from plait.cli import main
    from plait.launch import RESOLVED_RUN_ENV
    from plait.validation import build_config, resolve_run

    cfg = build_config(None, ["--model.name=debug", "--train.seq_len=64", "--train.global_batch_tokens=512",
                              "--train.micro_batch_size=4", "--train.steps=2", "--train.eval_every=0",
                              "--train.sample_tokens=0", "--run.progress=none", "--run.tensorboard=false",
                              "--checkpoint.every=0", f"--run.dir={tmp_path / 'run'}"])
    resolved = resolve_run(cfg, 1)
    import plait.api

    for module in (plait.validation, plait.api):  # also where the entry points hold the names
        for name in ("validate", "resolve_run", "check_fields", "checked_layout", "resolve_for_job"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("a worker validated again"))
    monkeypatch.setenv(RESOLVED_RUN_ENV, resolved.to_json())
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert main(["train", "--train.steps=99"]) == 0  # the worker's own arguments are not read
    assert "done: step 2" in capsys.readouterr().out
    assert (tmp_path / "run" / "config.toml").is_file()
