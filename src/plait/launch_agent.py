"""torchrun's agent as `plait train --nproc-per-node` runs it: `python -m plait.launch_agent`.

It is `torch.distributed.run` with two additions, both through interfaces torch offers:

- the `plait-loopback` rendezvous (registered in torch's rendezvous handler registry) for one
  node. One node needs no membership protocol; what it needs is a store for the agent and the
  workers to meet in, and torch's own ones do not suit: the c10d `TCPStore` binds every
  interface ("::") whatever host it is given, and the store that torchrun's c10d rendezvous
  shares with the workers outlives a restart, so a restarted gloo group reads the dead
  workers' addresses from it and fails to connect (pytorch/pytorch#135712). This handler starts
  a new store for every round (every start of the worker group) on a socket it binds to
  127.0.0.1 itself and hands to the store (`master_listen_fd`).
- `--host-store HOST:PORT` (several nodes): when HOST is an IP address, the node that owns it
  starts the store of torchrun's c10d rendezvous on a socket bound to that address only (a host
  name is left to torch: it binds every interface); torch's rendezvous then
  asks for a store on the same port with `multi_tenant=True`, which reuses this running server
  instead of binding every interface.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from datetime import timedelta

import torch.distributed as dist
from torch.distributed.elastic.rendezvous import (
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStoreInfo,
    rendezvous_handler_registry,
)
from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

from plait.launch import LOOPBACK, LOOPBACK_BACKEND

# torchrun's default port of the c10d rendezvous when an endpoint names none.
DEFAULT_RDZV_PORT = 29400
STORE_TIMEOUT = timedelta(minutes=10)


def bind_socket(host: str, port: int) -> socket.socket | None:
    """A TCP socket bound (not yet listening) to host:port (port 0: a free one), or None when host
    is not an address of this machine or the port is taken."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        # As torch's own store sockets do: a port that a previous job's connections still hold
        # in TIME_WAIT can be bound again.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
            return sock
        except OSError:
            sock.close()
    return None


def _is_address(host: str) -> bool:
    """Only an address the user wrote is bound: a host name can resolve on its own node to
    another address (Debian's 127.0.1.1) than on the others, which would then not reach it."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def store_on(sock: socket.socket, multi_tenant: bool = False) -> dist.TCPStore:
    """A c10d store server listening on the bound socket `sock` (which it takes over)."""
    host, port = sock.getsockname()[:2]
    return dist.TCPStore(host, port, is_master=True, timeout=STORE_TIMEOUT, wait_for_workers=False,
                         multi_tenant=multi_tenant, master_listen_fd=sock.detach())


class LoopbackRendezvous(RendezvousHandler):
    """The rendezvous of a one-node job: this agent is node 0 of 1, and each round gets a new
    store on 127.0.0.1 that the workers share (`use_agent_store`)."""

    def __init__(self, run_id: str) -> None:
        self._run_id = run_id
        self._store: dist.TCPStore | None = None
        self._closed = False

    def get_backend(self) -> str:
        return LOOPBACK_BACKEND

    @property
    def use_agent_store(self) -> bool:
        return True

    def next_rendezvous(self) -> RendezvousInfo:
        sock = bind_socket(LOOPBACK, 0)
        if sock is None:
            raise RuntimeError(f"cannot bind a port on {LOOPBACK} for the rendezvous store")
        port = sock.getsockname()[1]
        self._store = store_on(sock)  # the previous round's store (if any) closes with its last user
        return RendezvousInfo(dist.PrefixStore(self._run_id, self._store), 0, 1, RendezvousStoreInfo(LOOPBACK, port))

    def is_closed(self) -> bool:
        return self._closed

    def set_closed(self) -> None:
        self._closed = True

    def num_nodes_waiting(self) -> int:
        return 0

    def get_run_id(self) -> str:
        return self._run_id

    def shutdown(self) -> bool:
        return True


def _create_loopback(params: RendezvousParameters) -> RendezvousHandler:
    if params.max_nodes != 1:
        raise ValueError(f"the {LOOPBACK_BACKEND} rendezvous is for one node, not --nnodes={params.min_nodes}:{params.max_nodes}")
    if params.endpoint and parse_rendezvous_endpoint(params.endpoint, default_port=0)[0] not in (LOOPBACK, "localhost"):
        raise ValueError(f"the {LOOPBACK_BACKEND} rendezvous listens on {LOOPBACK}, not on --rdzv-endpoint={params.endpoint}")
    return LoopbackRendezvous(params.run_id)


def main(argv: list[str] | None = None) -> None:
    """`python -m plait.launch_agent [--host-store HOST:PORT] -- TORCHRUN_ARGS`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    own, torchrun_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else ([], argv)
    rendezvous_handler_registry.register(LOOPBACK_BACKEND, _create_loopback)
    store = None  # referenced until torchrun returns: its server must outlive the job
    for arg in own:
        if arg.startswith("--host-store="):
            host, port = parse_rendezvous_endpoint(arg.split("=", 1)[1], default_port=DEFAULT_RDZV_PORT)
            sock = bind_socket(host, port) if _is_address(host) else None  # None on the other nodes
            store = store_on(sock, multi_tenant=True) if sock is not None else None
    from torch.distributed.run import main as torchrun

    torchrun(torchrun_args)
    del store


if __name__ == "__main__":
    main()
