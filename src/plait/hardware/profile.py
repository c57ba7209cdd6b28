"""Where a `Cluster` comes from: the `--gpus/--gpus-per-node/--gpu` flags over the device table,
and TOML profiles, written by hand or by `plait plan --calibrate` (`plait.measure.calibrate`), and
read back by `plait plan --cluster FILE` and `parallel.cluster_profile`; `describe` prints one for
people.

Pure Python (no torch). The format is in docs/hardware.md.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from plait.config import ConfigError, _nearest, read_toml
from plait.hardware.devices import DEVICES, GB, PEAK_DTYPES, Cluster, Device, Link, _entry, default_host_memory


def cluster_from_flags(gpus: int, gpus_per_node: int | None, gpu: str) -> Cluster:
    """The cluster `--gpus N [--gpus-per-node G] --gpu TYPE` describes, with the table's links.

    Without `--gpus-per-node` a node is the device's usual server (8 GPUs); fewer GPUs than that
    are one node of that many. For "cpu" all workers share one machine by default, and each gets
    an equal share of its memory."""
    entry = _entry(gpu)
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ConfigError(f"--gpus = {gpus!r} must be a whole number of at least 1")
    if gpus_per_node is None:
        per_node = gpus if gpu == "cpu" else min(gpus, entry.gpus_per_node)
        flag_hint = f"the {entry.gpus_per_node} GPUs per node of the usual {gpu} server"
    else:
        if isinstance(gpus_per_node, bool) or not isinstance(gpus_per_node, int) or gpus_per_node < 1:
            raise ConfigError(f"--gpus-per-node = {gpus_per_node!r} must be a whole number of at least 1")
        per_node = min(gpus, gpus_per_node)
        flag_hint = f"--gpus-per-node = {gpus_per_node}"
    if gpus % per_node:
        raise ConfigError(
            f"--gpus = {gpus} spans more than one node but is not a multiple of {flag_hint}; "
            f"use --gpus {gpus - gpus % per_node} or {gpus + per_node - gpus % per_node}, "
            f"or pass a --gpus-per-node that divides {gpus}"
        )
    device = entry.device
    if gpu == "cpu":
        device = dataclasses.replace(device, peak_flops=dict(device.peak_flops), memory_bytes=device.memory_bytes // per_node)
    return Cluster(device=device, gpus=gpus, gpus_per_node=per_node, intra=entry.intra, inter=entry.inter,
                   host_memory_bytes=entry.host_memory_bytes, source="flags")


def describe(cluster: Cluster) -> list[str]:
    """A few lines for people: the device, the shape, the links."""
    d = cluster.device
    rates = ", ".join(f"{k} {v / 1e12:.4g}" for k, v in d.peak_flops.items())
    return [
        f"cluster: {cluster.gpus} x {d.name} ({cluster.nodes} node(s) of {cluster.gpus_per_node}), from {cluster.source}",
        f"device: peak TFLOP/s {rates}; sustained {d.matmul_efficiency:.2f} of peak; memory {d.memory_bytes / 2**30:.1f} GiB",
        f"memory-bound kernels: {d.memory_bandwidth / GB:.4g} GB/s; communication "
        + ("overlaps compute" if d.overlaps_comm else "does not overlap compute (it runs on the same cores)")
        + (f"; host time per TP linear {d.tp_linear_s * 1e6:.3g} us, per FSDP call {d.fsdp_call_s * 1e6:.3g} us"
           if d.tp_linear_s or d.fsdp_call_s else ""),
        f"host memory: {cluster.host_memory_bytes / 2**30:.1f} GiB per node"
        + (" (the workers' own memory: the device is the host)" if cluster.device_is_host else ""),
        f"intra-node link: {cluster.intra.bandwidth / GB:.4g} GB/s per GPU, {cluster.intra.latency * 1e6:.3g} us per message",
        f"inter-node link: {cluster.inter.bandwidth / GB:.4g} GB/s per GPU, {cluster.inter.latency * 1e6:.3g} us per message",
    ]


# ---- TOML profiles ---------------------------------------------------------------------------
#
# [device]          name, memory_bytes, matmul_efficiency; optional (default: the table's entry
#                   for the name, else the Device defaults): memory_bandwidth_bytes_per_s,
#                   overlaps_comm, tp_linear_s, fsdp_call_s
# [device.peak_flops] bf16, fp8, fp32, tf32 (FLOP/s; leave a dtype out where the device has none)
# [cluster]         gpus, gpus_per_node, host_memory_bytes (per node; optional, default below),
#                   source (optional)
# [links.intra]     bandwidth_bytes_per_s (per GPU, one direction), latency_s (per message)
# [links.inter]     the same
# [calibration]     optional, free-form: what --calibrate measured and how (not read back)
#
# Bytes/s and seconds, not GB/s and microseconds, so that writing and reading a profile gives the
# same numbers bit for bit; the writer adds the human units as comments.

_SECTIONS = {
    "device": {"name", "memory_bytes", "matmul_efficiency", "peak_flops", "memory_bandwidth_bytes_per_s",
               "overlaps_comm", "tp_linear_s", "fsdp_call_s"},
    "cluster": {"gpus", "gpus_per_node", "host_memory_bytes", "source"},
    "links": {"intra", "inter"},
    "calibration": None,  # free-form
}
_LINK_KEYS = {"bandwidth_bytes_per_s", "latency_s"}


def write_profile(cluster: Cluster, path: str | Path, calibration: dict[str, Any] | None = None) -> None:
    """Write `cluster` as a TOML profile that `load_profile` reads back equal."""
    d = cluster.device
    lines = [
        "# plait cluster profile: read by `plait plan --cluster FILE`; units are FLOP/s, bytes,",
        "# bytes/s per GPU in one direction, and seconds per message.",
        "",
        "[device]",
        f"name = {_toml_str(d.name)}",
        f"memory_bytes = {int(d.memory_bytes)}  # {d.memory_bytes / 2**30:.2f} GiB",
        f"matmul_efficiency = {_toml_float(d.matmul_efficiency)}",
        f"memory_bandwidth_bytes_per_s = {_toml_float(d.memory_bandwidth)}  # {d.memory_bandwidth / GB:.4g} GB/s",
        f"overlaps_comm = {'true' if d.overlaps_comm else 'false'}",
        f"tp_linear_s = {_toml_float(d.tp_linear_s)}  # {d.tp_linear_s * 1e6:.4g} us",
        f"fsdp_call_s = {_toml_float(d.fsdp_call_s)}  # {d.fsdp_call_s * 1e6:.4g} us",
        "",
        "[device.peak_flops]",
        *(f"{k} = {_toml_float(v)}  # {v / 1e12:.4g} TFLOP/s" for k, v in d.peak_flops.items()),
        "",
        "[cluster]",
        f"gpus = {int(cluster.gpus)}",
        f"gpus_per_node = {int(cluster.gpus_per_node)}",
        f"host_memory_bytes = {int(cluster.host_memory_bytes)}  # per node, {cluster.host_memory_bytes / 2**30:.2f} GiB",
        f"source = {_toml_str(cluster.source)}",
    ]
    for name, link in (("intra", cluster.intra), ("inter", cluster.inter)):
        lines += [
            "",
            f"[links.{name}]",
            f"bandwidth_bytes_per_s = {_toml_float(link.bandwidth)}  # {link.bandwidth / GB:.4g} GB/s",
            f"latency_s = {_toml_float(link.latency)}  # {link.latency * 1e6:.4g} us",
        ]
    if calibration:
        lines += ["", "[calibration]"]
        for key, value in calibration.items():
            lines.append(f"{key} = {_toml_value(value)}")
    Path(path).write_text("\n".join(lines) + "\n")


def load_profile(path: str | Path) -> Cluster:
    """A cluster from a TOML profile; every problem raises ConfigError naming the key and the fix."""
    path = Path(path)
    where = f"--cluster {path}"
    data = read_toml(path, "--cluster", f"no such file; write one with `plait plan --calibrate --out {path}`")
    for section, value in data.items():
        if section not in _SECTIONS:
            raise ConfigError(f"{where}: unknown section [{section}]{_nearest(section, list(_SECTIONS))}")
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: [{section}] must be a table")
        allowed = _SECTIONS[section]
        for key in value if allowed is not None else ():
            if key not in allowed:
                raise ConfigError(f"{where}: unknown key {section}.{key}{_nearest(key, sorted(allowed), section + '.')}")
    for section in ("device", "cluster", "links"):
        if section not in data:
            raise ConfigError(f"{where}: the [{section}] section is missing; see docs/hardware.md for the format")
    dev, clu, links = data["device"], data["cluster"], data["links"]

    name = _get(dev, "device", "name", where, str)
    memory = _get(dev, "device", "memory_bytes", where, int)
    if memory < 1:
        raise ConfigError(f"{where}: device.memory_bytes = {memory} must be a positive number of bytes")
    efficiency = float(_get(dev, "device", "matmul_efficiency", where, float))
    if not 0 < efficiency <= 1:
        raise ConfigError(
            f"{where}: device.matmul_efficiency = {efficiency} must be in (0, 1]: the fraction of the peak "
            f"large matmuls sustain (0.7 is typical for bf16 on an H100)"
        )
    peaks = _get(dev, "device", "peak_flops", where, dict)
    peak_flops: dict[str, float] = {}
    for key, value in peaks.items():
        if key not in PEAK_DTYPES:
            raise ConfigError(f"{where}: unknown key device.peak_flops.{key}{_nearest(key, list(PEAK_DTYPES), 'device.peak_flops.')}")
        rate = _number(value, f"device.peak_flops.{key}", where)
        if not rate > 0:
            raise ConfigError(
                f"{where}: device.peak_flops.{key} = {value!r} must be a positive rate in FLOP/s "
                f"(leave the key out where the device has no {key})"
            )
        peak_flops[key] = rate
    if not peak_flops:
        raise ConfigError(f"{where}: [device.peak_flops] is empty; give at least one of {', '.join(PEAK_DTYPES)} in FLOP/s")

    gpus = _get(clu, "cluster", "gpus", where, int)
    per_node = _get(clu, "cluster", "gpus_per_node", where, int)
    if gpus < 1 or per_node < 1:
        raise ConfigError(f"{where}: cluster.gpus = {gpus} and cluster.gpus_per_node = {per_node} must be at least 1")
    if gpus > per_node and gpus % per_node:
        raise ConfigError(
            f"{where}: cluster.gpus = {gpus} is not a multiple of cluster.gpus_per_node = {per_node}; "
            f"every node holds the same number of GPUs"
        )
    source = clu.get("source", str(path))
    if not isinstance(source, str):
        raise ConfigError(f"{where}: cluster.source = {source!r} must be a string")
    if "host_memory_bytes" in clu:
        host = _get(clu, "cluster", "host_memory_bytes", where, int)
        if host < 1:
            raise ConfigError(
                f"{where}: cluster.host_memory_bytes = {host} must be a positive number of bytes "
                f"(each node's system memory, e.g. 2199023255552 for a 2 TB DGX H100)"
            )
    else:
        host = default_host_memory(name, min(gpus, per_node), memory)

    parsed: dict[str, Link] = {}
    for name_ in ("intra", "inter"):
        if name_ not in links:
            raise ConfigError(f"{where}: the [links.{name_}] section is missing (bandwidth_bytes_per_s, latency_s)")
        link = links[name_]
        if not isinstance(link, dict):
            raise ConfigError(f"{where}: links.{name_} must be a table")
        for key in link:
            if key not in _LINK_KEYS:
                raise ConfigError(f"{where}: unknown key links.{name_}.{key}{_nearest(key, sorted(_LINK_KEYS), f'links.{name_}.')}")
        bandwidth = _number(_get(link, f"links.{name_}", "bandwidth_bytes_per_s", where, float), f"links.{name_}.bandwidth_bytes_per_s", where)
        latency = _number(_get(link, f"links.{name_}", "latency_s", where, float), f"links.{name_}.latency_s", where)
        if not bandwidth > 0:
            raise ConfigError(
                f"{where}: links.{name_}.bandwidth_bytes_per_s = {bandwidth} must be positive "
                f"(bytes/s per GPU in one direction, e.g. 4.5e11 for NVLink 4)"
            )
        if not latency >= 0:
            raise ConfigError(f"{where}: links.{name_}.latency_s = {latency} must be >= 0 (seconds per message, e.g. 3e-6)")
        parsed[name_] = Link(bandwidth=bandwidth, latency=latency)

    known = DEVICES.get(name, Device(name, {}, 1))
    bandwidth = _number(dev.get("memory_bandwidth_bytes_per_s", known.memory_bandwidth),
                        "device.memory_bandwidth_bytes_per_s", where)
    if not bandwidth > 0:
        raise ConfigError(f"{where}: device.memory_bandwidth_bytes_per_s = {bandwidth} must be positive "
                          f"(bytes/s that elementwise kernels sustain, e.g. 2.68e12 for an H100)")
    overlaps = dev.get("overlaps_comm", known.overlaps_comm)
    if not isinstance(overlaps, bool):
        raise ConfigError(f"{where}: device.overlaps_comm = {overlaps!r} must be true or false")
    host_times = {}
    for key in ("tp_linear_s", "fsdp_call_s"):
        value = _number(dev.get(key, getattr(known, key)), f"device.{key}", where)
        if not value >= 0:
            raise ConfigError(f"{where}: device.{key} = {value} must be >= 0 seconds (0: not modelled)")
        host_times[key] = value
    device = Device(name=name, peak_flops=peak_flops, memory_bytes=memory, matmul_efficiency=efficiency,
                    memory_bandwidth=bandwidth, overlaps_comm=overlaps, **host_times)
    return Cluster(device=device, gpus=gpus, gpus_per_node=per_node, intra=parsed["intra"], inter=parsed["inter"],
                   host_memory_bytes=host, source=source)


def _get(table: dict, section: str, key: str, where: str, kind: type) -> Any:
    if key not in table:
        raise ConfigError(f"{where}: {section}.{key} is missing; see docs/hardware.md for the format")
    value = table[key]
    ok = {
        str: isinstance(value, str),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        dict: isinstance(value, dict),
    }[kind]
    if not ok:
        wanted = {str: "a string", int: "a whole number", float: "a number", dict: "a table"}[kind]
        raise ConfigError(f"{where}: {section}.{key} = {value!r} must be {wanted}")
    return value


def _number(value: Any, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: {key} = {value!r} must be a finite number")
    return float(value)


def _toml_float(value: float) -> str:
    return repr(float(value))  # the shortest text that reads back as the same float


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _toml_float(value)
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")
