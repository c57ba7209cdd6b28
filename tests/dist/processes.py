"""A running job seen from /proc (Linux): its process tree, its workers, the TCP addresses it listens on.

`start_plait(*args)` starts `python -m plait ARGS` in a session of its own (so the whole job can
be killed as one process group), with its output in a file; `descendants(pid)` is the process
tree under it; `workers(pid)` maps each worker's LOCAL_RANK to its pid; `listening(pid)` lists
the (address, port) pairs a process listens on, read from /proc/net/tcp and /proc/net/tcp6 by
matching the socket inodes among its file descriptors.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import plait

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's `st` column


def start_plait(*args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m plait ARGS` with this checkout's plait, outside any torchrun job, in its own session."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(Path(plait.__file__).parents[1])}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "plait", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)


def children(pid: int) -> list[int]:
    found = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in threads:
        try:
            found += [int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            continue
    return found


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += children(p)
    return seen


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def workers(pid: int) -> dict[int, int]:
    """LOCAL_RANK -> pid of the workers that torchrun started under `pid`."""
    found = {}
    for p in descendants(pid):
        env = _environ(p)
        if "LOCAL_RANK" in env and "TORCHELASTIC_RUN_ID" in env:
            found[int(env["LOCAL_RANK"])] = p
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:["):-1]))
    return inodes


def _address(hex_address: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """/proc/net/tcp{,6} writes the address as 32-bit words in host (little-endian) order."""
    ip_hex, port_hex = hex_address.split(":")
    raw = bytes.fromhex(ip_hex)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw), int(port_hex, 16)


def listening(pid: int) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """The (address, port) pairs process `pid` listens on over TCP."""
    inodes = _socket_inodes(pid)
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == _LISTEN and int(fields[9]) in inodes:
                found.append(_address(fields[1]))
    return found
