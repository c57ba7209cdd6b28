"""`plait train --nproc-per-node N`: start N workers through PyTorch's elastic launcher.

The workers run `python -m plait train` with the same config arguments, as if started by
`torchrun ... -m plait train ...` (which works too). One node: a standalone rendezvous on the
loopback interface. Several nodes: `--nnodes`, `--node-rank` and `--rdzv-endpoint` pass through.
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def torchrun_command(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc_per_node}",
           f"--nnodes={args.nnodes}", f"--max-restarts={args.max_restarts}"]
    if args.rdzv_endpoint:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={args.rdzv_endpoint}"]
        if args.node_rank is not None:
            cmd.append(f"--node-rank={args.node_rank}")
    elif args.nnodes == 1:
        cmd.append("--standalone")  # rendezvous on localhost, on a free port
    else:
        raise SystemExit("plait train: --nnodes > 1 needs --rdzv-endpoint HOST:PORT (a host every node can reach)")
    cmd += ["-m", "plait", "train"]
    if args.config:
        cmd += ["--config", args.config]
    return cmd + list(overrides)


def launch(args: argparse.Namespace, overrides: list[str]) -> int:
    return subprocess.call(torchrun_command(args, overrides))
