"""The cluster the planner plans for: a table of accelerators, `--gpus/--gpus-per-node/--gpu` flags,
and TOML profiles (written by hand or by `plait plan --calibrate`).

Pure Python. Every number in the table is the vendor's published dense (no sparsity) figure per
device; the sources are cited beside each entry and in docs/planner_cluster.md. Units follow
`plait.planner.types`: FLOP/s, bytes, bytes/s per GPU in one direction, seconds per message.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plait.config import ConfigError, _nearest, read_toml
from plait.planner.types import Cluster, Device, Link

GB = 1e9  # vendors quote link and memory-bandwidth figures in decimal units
MIB = 2**20
TIB = 2**40  # system memory is DIMMs of binary sizes (32 x 64 GiB = "2 TB")

# What the peak_flops table may hold. "fp32" is the rate of the path plait's fp32 matmuls take:
# on NVIDIA GPUs that is plain FP32 on the CUDA cores, because PyTorch leaves TF32 off for matmuls
# by default and plait does not turn it on; "tf32" (NVIDIA only) is the tensor-core rate a run
# that enables TF32 would get. On the MI250X "fp32" is the FP32 matrix-core rate (rocBLAS uses it).
PEAK_DTYPES = ("bf16", "fp8", "fp32", "tf32")


@dataclass(frozen=True)
class _Entry:
    """One row of the table: the device and its usual node."""

    device: Device
    gpus_per_node: int
    intra: Link
    inter: Link
    host_memory_bytes: int  # the usual node's system memory (what CPU offload fills)


# Interconnects, bytes/s per GPU in one direction. Latency is per message (one step of a
# collective's ring): a few microseconds of NCCL/RCCL and wire time, an assumption of this model
# (NCCL's small-message all-reduce times on NVLink and InfiniBand are of this order), not a spec.
# NVLink 3 (A100): 12 links x 25 GB/s = 300 GB/s per direction (600 GB/s "bidirectional").
_NVLINK3 = Link(bandwidth=300 * GB, latency=3e-6)
# NVLink 4 (H100/H200 SXM): 18 links, 900 GB/s bidirectional = 450 GB/s per direction.
_NVLINK4 = Link(bandwidth=450 * GB, latency=3e-6)
# NVLink 5 (B200): 1.8 TB/s bidirectional = 900 GB/s per direction.
_NVLINK5 = Link(bandwidth=900 * GB, latency=3e-6)
# DGX A100: one 200 Gb/s HDR InfiniBand ConnectX-6 port per GPU = 25 GB/s.
_IB_HDR = Link(bandwidth=200 / 8 * GB, latency=5e-6)
# DGX H100/H200/B200: one 400 Gb/s NDR InfiniBand ConnectX-7 port per GPU = 50 GB/s.
_IB_NDR = Link(bandwidth=400 / 8 * GB, latency=5e-6)
# MI250X in an HPE Cray EX node (Frontier): 4 modules = 8 GCDs joined by Infinity Fabric (xGMI)
# links of 50 GB/s per direction; the two GCDs of one module share 4 links, GCDs of different
# modules 1 or 2, so a ring over the node's 8 GCDs runs at one link's 50 GB/s.
_XGMI = Link(bandwidth=50 * GB, latency=5e-6)
# Frontier: one 200 Gb/s Slingshot-11 NIC per MI250X module, shared by its 2 GCDs = 12.5 GB/s.
_SLINGSHOT = Link(bandwidth=200 / 8 / 2 * GB, latency=5e-6)
# L40S: no NVLink; PCIe Gen4 x16 = 32 GB/s per direction. Between nodes an assumed 100 Gb/s NIC
# per GPU (L40S servers vary; write a profile for the real one).
_PCIE4 = Link(bandwidth=32 * GB, latency=5e-6)
_ETH100 = Link(bandwidth=100 / 8 * GB, latency=10e-6)
# CPU processes: gloo over loopback TCP inside a machine, 10 GbE between machines. Placeholders
# of the right order; `plait plan --calibrate` measures the real ones.
_CPU_LOOPBACK = Link(bandwidth=2 * GB, latency=30e-6)
_ETH10 = Link(bandwidth=10 / 8 * GB, latency=50e-6)


def host_memory_bytes() -> int:
    """This machine's physical memory (the "cpu" device plans for the machine it runs on)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


# Host memory per node is the usual server's system memory as its vendor ships it (the OS
# reports a little less; memory.py keeps a stated share of it back for the OS and buffers):
# DGX A100 320GB (a100-40) 1 TB, DGX A100 640GB (a100-80) 2 TB (NVIDIA DGX A100 datasheet and
# user guide); DGX H100 and DGX H200 2 TB, 32 DIMMs (NVIDIA DGX H100/H200 user guide); DGX B200
# 2 TB, 32 DIMMs, "upgradable to 4 TB" (NVIDIA DGX B200 user guide: the shipped size is planned
# for, write a profile for an upgraded node); Frontier's HPE Cray EX235a node 512 GB DDR4 for
# its 8 MI250X GCDs (OLCF Frontier user guide); L40S servers vary: 1 TB for 8 GPUs is an
# assumption (write a profile for the real one); "cpu": this machine's memory, which is also the
# device memory the workers share.
#
# Memory is the capacity the driver reports (nvidia-smi / rocm-smi "total"), in MiB; what a
# process can allocate is a little less (the CUDA context, the allocator's fragmentation), which
# memory.py's stated allowance covers.
#
# matmul_efficiency: the fraction of the dense bf16 peak that large matmuls sustain, one number
# per device, an assumption until `--calibrate` measures it: ~0.7 on H100/H200 (the common figure
# for large bf16 GEMMs, 700 of 989 TFLOP/s), 0.8 on A100 (its large GEMMs reach ~250 of 312),
# 0.7 on B200 and 0.65 on the MI250X (its GEMMs sustain a smaller share). Whole-model MFU is lower
# (PAPERS.md: TorchTitan 33-39% on H100, Megatron-Core up to 47%) because it also pays for
# attention, memory-bound kernels and exposed communication, which timing.py models separately.
#
# memory_bandwidth: what memory-bound (elementwise) kernels sustain, taken as HBM_SUSTAINED of the
# datasheet's memory bandwidth (A100 40GB 1,555 GB/s, 80GB 2,039; H100 SXM 3.35 TB/s; H200 4.8;
# B200 8; MI250X 3.2768 per module, half per GCD; L40S 864 GB/s): streaming kernels reach about
# 80-90% of the HBM peak, and plait's eager norms and activations are not fused. The "cpu" entry's
# 5 GB/s is a placeholder of the right order for one core; --calibrate measures it. The "cpu"
# device does not overlap communication with compute (gloo runs on the same cores).
HBM_SUSTAINED = 0.8
_TABLE: dict[str, _Entry] = {
    # NVIDIA A100 Tensor Core GPU datasheet (SXM4): BF16 312 TFLOPS dense (624 sparse), TF32 156,
    # FP32 19.5, no FP8; 40 GB HBM2 or 80 GB HBM2e. DGX A100: 8 GPUs, NVLink 3, 8x HDR IB.
    "a100-40": _Entry(
        Device("a100-40", {"bf16": 312e12, "fp32": 19.5e12, "tf32": 156e12}, 40960 * MIB, 0.8, memory_bandwidth=HBM_SUSTAINED * 1.555e+12),
        8, _NVLINK3, _IB_HDR, 1 * TIB,
    ),
    "a100-80": _Entry(
        Device("a100-80", {"bf16": 312e12, "fp32": 19.5e12, "tf32": 156e12}, 81920 * MIB, 0.8, memory_bandwidth=HBM_SUSTAINED * 2.039e+12),
        8, _NVLINK3, _IB_HDR, 2 * TIB,
    ),
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16 989 TFLOPS dense (1,979 sparse), FP8
    # 1,979 dense, TF32 494.7, FP32 67; 80 GB HBM3. DGX H100: 8 GPUs, NVLink 4, 8x NDR IB.
    "h100": _Entry(
        Device("h100", {"bf16": 989e12, "fp8": 1979e12, "fp32": 67e12, "tf32": 494.7e12}, 81559 * MIB, 0.7, memory_bandwidth=HBM_SUSTAINED * 3.35e+12),
        8, _NVLINK4, _IB_NDR, 2 * TIB,
    ),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): the H100's compute with 141 GB HBM3e.
    "h200": _Entry(
        Device("h200", {"bf16": 989e12, "fp8": 1979e12, "fp32": 67e12, "tf32": 494.7e12}, 143771 * MIB, 0.7, memory_bandwidth=HBM_SUSTAINED * 4.8e+12),
        8, _NVLINK4, _IB_NDR, 2 * TIB,
    ),
    # NVIDIA HGX B200 / DGX B200 datasheets, per GPU: BF16 2.25 PFLOPS dense (4.5 sparse), FP8
    # 4.5 dense, TF32 1.1 dense, FP32 75 (600 for 8 GPUs); 180 GB HBM3e usable. DGX B200: 8 GPUs,
    # NVLink 5, 8x 400 Gb/s ConnectX-7.
    "b200": _Entry(
        Device("b200", {"bf16": 2250e12, "fp8": 4500e12, "fp32": 75e12, "tf32": 1100e12}, 183359 * MIB, 0.7, memory_bandwidth=HBM_SUSTAINED * 8e+12),
        8, _NVLINK5, _IB_NDR, 2 * TIB,
    ),
    # AMD Instinct MI250X datasheet: BF16 383 TFLOPS, FP32 matrix 95.7, no FP8, 128 GB HBM2e, per
    # module of two GCDs. PyTorch shows each GCD as one device, and one rank drives one GCD, so
    # the entry is one GCD: half of each (191.5 TFLOPS bf16, 64 GB). Frontier: 8 GCDs per node.
    "mi250x": _Entry(
        Device("mi250x", {"bf16": 191.5e12, "fp32": 47.85e12}, 65536 * MIB, 0.65, memory_bandwidth=HBM_SUSTAINED * 1.6384e+12),
        8, _XGMI, _SLINGSHOT, 512 * 2**30,
    ),
    # NVIDIA L40S datasheet: BF16 362 TFLOPS dense (733 sparse), FP8 733 dense, TF32 183, FP32
    # 91.6; 48 GB GDDR6; PCIe only.
    "l40s": _Entry(
        Device("l40s", {"bf16": 362e12, "fp8": 733e12, "fp32": 91.6e12, "tf32": 183e12}, 46068 * MIB, 0.7, memory_bandwidth=HBM_SUSTAINED * 8.64e+11),
        8, _PCIE4, _ETH100, 1 * TIB,
    ),
    # A CPU process as a "GPU": a placeholder rate of the right order for one worker (a few AVX2
    # cores), the machine's memory (as device and as host memory: the same bytes).
    # `plait plan --calibrate` measures the real rate and links.
    "cpu": _Entry(
        Device("cpu", {"bf16": 100e9, "fp32": 100e9}, host_memory_bytes(), 1.0, memory_bandwidth=5e9,
               overlaps_comm=False),
        1, _CPU_LOOPBACK, _ETH10, host_memory_bytes(),
    ),
}

DEVICES: dict[str, Device] = {key: entry.device for key, entry in _TABLE.items()}


def _entry(gpu: str, flag: str = "--gpu") -> _Entry:
    if gpu not in _TABLE:
        close = difflib.get_close_matches(gpu, list(_TABLE), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"{flag} = {gpu!r} is not a known device; {hint}valid: {', '.join(sorted(_TABLE))} "
            f"(or describe the machine in a profile: --cluster FILE)"
        )
    return _TABLE[gpu]


def default_links(device_key: str) -> tuple[Link, Link]:
    """(intra-node, inter-node) links of the usual server for a table device."""
    entry = _entry(device_key)
    return entry.intra, entry.inter


def default_gpus_per_node(device_key: str) -> int:
    """GPUs per node of the usual server (for "cpu": 1, as many processes as the job asks)."""
    return _entry(device_key).gpus_per_node


def default_host_memory(device_name: str, gpus_per_node: int, device_memory_bytes: int) -> int:
    """Host memory per node for a profile that does not give `cluster.host_memory_bytes` (one
    written before the key existed): the usual server's for a device in the table; otherwise, and
    for "cpu" (whose profile's device memory is the machine's share per worker), as much as the
    node's device memory together, an assumption on the safe side for offload."""
    if device_name in _TABLE and device_name != "cpu":
        return _TABLE[device_name].host_memory_bytes
    return device_memory_bytes * gpus_per_node


def device_for_name(device_name: str) -> str | None:
    """The table key for a device name as the runtime reports it (torch.cuda.get_device_name),
    e.g. "NVIDIA H100 80GB HBM3" -> "h100"; None when it is not in the table."""
    name = device_name.lower().replace(" ", "").replace("-", "")
    if "a100" in name:
        return "a100-80" if "80g" in name else "a100-40"
    for key in ("h200", "h100", "b200", "mi250x", "l40s"):
        if key in name:
            return key
    return None


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


def sustained_flops(device: Device, dtype: str) -> float:
    """FLOP/s that large matmuls sustain in `dtype`: the peak times the device's efficiency."""
    if device.peak_flops.get(dtype) is None:
        have = ", ".join(k for k, v in device.peak_flops.items() if v) or "none"
        raise ConfigError(
            f"device {device.name!r} has no {dtype} rate in its table or profile (it has: {have}); "
            f"add peak_flops.{dtype} to the profile's [device.peak_flops] or plan with another dtype"
        )
    return device.peak_flops[dtype] * device.matmul_efficiency


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
            raise ConfigError(f"{where}: the [{section}] section is missing; see docs/planner_cluster.md for the format")
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
        raise ConfigError(f"{where}: {section}.{key} is missing; see docs/planner_cluster.md for the format")
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
