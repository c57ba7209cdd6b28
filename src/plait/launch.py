"""`plait train --nproc-per-node N`: start N workers through PyTorch's elastic launcher.

The launcher validates and resolves the run once (`plait.cli`); the workers run `python -m plait
train` and take that run from the environment (`RESOLVED_RUN_ENV`), checking nothing again. A job
started by `torchrun ... -m plait train --config ...` works too, with torchrun's own rendezvous
and addresses: each of its workers is then an entry point that validates for itself.
The agent is torchrun's, run as `python -m plait.launch_agent` (see there for why):

- One node (no `--rdzv-endpoint`): plait's loopback rendezvous. The store of the agent and the
  workers listens on 127.0.0.1 only (a new one for each start of the worker group), and gloo and
  NCCL are told to use the loopback interface (`GLOO_SOCKET_IFNAME`, `NCCL_SOCKET_IFNAME`) unless
  the user set those. Nothing of the job listens on another interface.
- Several nodes: torchrun's c10d rendezvous at the `--rdzv-endpoint HOST:PORT` the user named;
  when HOST is an IP address, the node that owns it binds the rendezvous store to it only. Each start of the worker
  group gets a new store for the workers (`TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`), hosted by
  rank 0 at the address torchrun gives it (node 0's fully qualified host name), on every interface.

Restarts: torchrun restarts the worker group up to `--max-restarts` times after a worker fails,
and every start of `plait train` resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from plait.validation import ResolvedRun

# One restart recovers from a one-off failure (a worker killed by the OOM killer or a scheduler,
# a lost process) at the cost of the steps since the last checkpoint; a failure that repeats (a bug,
# a NaN loss) fails the restarted group again, so at most one replay is wasted. Long unattended
# runs may want more.
DEFAULT_MAX_RESTARTS = 1
LOOPBACK = "127.0.0.1"
LOOPBACK_BACKEND = "plait-loopback"  # the rendezvous handler in plait.launch_agent
_IFF_LOOPBACK = 0x8  # linux/if.h
# The run the launcher validated and resolved (`plait.validation.ResolvedRun.to_json`), for its
# workers: they train it without checking or deriving anything again. Restarts of the worker
# group (torchrun's --max-restarts) inherit it.
RESOLVED_RUN_ENV = "PLAIT_RESOLVED_RUN"


def loopback_interface() -> str:
    """The name of the loopback network interface ("lo" on Linux, "lo0" on macOS)."""
    for _, name in socket.if_nameindex():
        try:
            if int((Path("/sys/class/net") / name / "flags").read_text(), 16) & _IFF_LOOPBACK:
                return name
        except (OSError, ValueError):
            continue
    return "lo0" if sys.platform == "darwin" else "lo"


def launch_env(args: argparse.Namespace, environ: dict[str, str]) -> dict[str, str]:
    """The agent's (and so the workers') environment; what the user set wins."""
    env = dict(environ)
    if args.rdzv_endpoint:  # several nodes: a fresh workers' store for every start (see the module doc)
        env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    else:  # one node: gloo's and NCCL's sockets on the loopback interface
        lo = loopback_interface()
        env.setdefault("GLOO_SOCKET_IFNAME", lo)
        env.setdefault("NCCL_SOCKET_IFNAME", lo)
    return env


def torchrun_command(args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "plait.launch_agent"]
    if args.rdzv_endpoint:
        cmd.append(f"--host-store={args.rdzv_endpoint}")
    cmd += ["--", f"--nproc-per-node={args.nproc_per_node}", f"--nnodes={args.nnodes}", f"--max-restarts={args.max_restarts}"]
    if args.rdzv_endpoint:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={args.rdzv_endpoint}"]
        if args.node_rank is not None:
            cmd.append(f"--node-rank={args.node_rank}")
    elif args.nnodes == 1:
        cmd += [f"--rdzv-backend={LOOPBACK_BACKEND}", f"--rdzv-endpoint={LOOPBACK}"]
    else:
        raise SystemExit("plait train: --nnodes > 1 needs --rdzv-endpoint HOST:PORT (a host every node can reach)")
    # No config arguments: the workers get the run the launcher resolved (RESOLVED_RUN_ENV).
    return cmd + ["-m", "plait", "train"]


def launch(args: argparse.Namespace, resolved: "ResolvedRun") -> int:
    """Start the job's workers (through torchrun's agent) with the validated, resolved run."""
    env = launch_env(args, dict(os.environ))
    env[RESOLVED_RUN_ENV] = resolved.to_json()
    with subprocess.Popen(torchrun_command(args), env=env) as agent:
        try:
            return agent.wait()
        except KeyboardInterrupt:  # the agent got the same Ctrl-C: let it stop its workers first
            agent.wait()
            raise
