"""The accelerators plait knows: `Device`, `Link` and `Cluster`, the table of devices with their
usual servers (peak rates, memory, links, host memory per node), and the peak rate that the
progress display's MFU divides by.

Pure Python (no torch): the planner reads it for 16,384 GPUs on a laptop. Every number in the
table is the vendor's published dense (no sparsity) figure per device; the sources are cited
beside each entry and in docs/hardware.md. Units: FLOP/s, bytes, bandwidth in bytes/s per GPU in
one direction, latency in seconds per message.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass

from plait.config import ConfigError


@dataclass(frozen=True)
class Link:
    """One kind of connection: what a GPU can send per second over it, and the fixed cost of a
    message (latency per step of a collective's algorithm)."""

    bandwidth: float  # bytes/s per GPU, one direction
    latency: float  # seconds per message


@dataclass(frozen=True)
class Device:
    """An accelerator (or a CPU) as the planner sees it."""

    name: str
    peak_flops: dict[str, float]  # dense peak by dtype: "bf16", "fp8", "fp32"
    memory_bytes: int  # usable device memory
    # Fraction of the peak that large matmuls sustain in practice (measured by --calibrate, or
    # the table's default); the time model divides FLOPs by peak x this.
    matmul_efficiency: float = 0.7
    # Sustained bytes/s of memory-bound (elementwise) kernels: norms, residual adds, activation
    # functions, rotary embedding. The time model adds their traffic at this rate.
    memory_bandwidth: float = 1e12
    # Whether collectives run beside compute (GPUs: NCCL on its own stream and SMs). On a CPU the
    # collective runs on the same cores as the matmuls, so nothing is hidden.
    overlaps_comm: bool = True
    # Host seconds plait's parallel wrappers add per call where the host's time adds to the step
    # (a CPU; measured by --calibrate, plait.measure.overhead): per tensor-parallel linear per
    # micro-batch (forward + backward), and per FSDP2 collective call. 0: not modelled (on a GPU
    # the host runs ahead of the device's queue).
    tp_linear_s: float = 0.0
    fsdp_call_s: float = 0.0


@dataclass(frozen=True)
class Cluster:
    """The machines: `gpus` devices, `gpus_per_node` to a node, the links, and each node's host
    memory (what CPU offload keeps its states in; for the "cpu" device, what the workers run in)."""

    device: Device
    gpus: int
    gpus_per_node: int
    intra: Link  # within a node (NVLink, xGMI, shared memory)
    inter: Link  # between nodes (InfiniBand, RoCE, Ethernet)
    host_memory_bytes: int  # per node: the CPU's memory (DIMMs) the node's ranks share
    source: str = "table"  # "table", "flags", a profile path, or "calibrated"

    @property
    def nodes(self) -> int:
        return -(-self.gpus // self.gpus_per_node)

    @property
    def ranks_per_node(self) -> int:
        """Workers that share one node's host memory (fewer than a node: all of them)."""
        return min(self.gpus, self.gpus_per_node)

    @property
    def device_is_host(self) -> bool:
        """The "cpu" device: its memory is the host's, so every worker of a node draws on the
        node's host memory for everything it holds, not only for offloaded states."""
        return self.device.name == "cpu"


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


def sustained_flops(device: Device, dtype: str) -> float:
    """FLOP/s that large matmuls sustain in `dtype`: the peak times the device's efficiency."""
    if device.peak_flops.get(dtype) is None:
        have = ", ".join(k for k, v in device.peak_flops.items() if v) or "none"
        raise ConfigError(
            f"device {device.name!r} has no {dtype} rate in its table or profile (it has: {have}); "
            f"add peak_flops.{dtype} to the profile's [device.peak_flops] or plan with another dtype"
        )
    return device.peak_flops[dtype] * device.matmul_efficiency


def peak_flops(device_name: str, dtype: str) -> float | None:
    """The dense peak in FLOP/s for a device name as the runtime reports it (e.g. "NVIDIA H100 80GB
    HBM3") and a dtype ("bf16", "fp32", "fp8", "tf32"), or None when unknown (e.g. a CPU).

    "fp32" is the plain FP32 rate: PyTorch runs fp32 matmuls without TF32 unless a run enables it.
    An MI250X is one GCD (PyTorch's device), half of the module's datasheet figures."""
    key = device_for_name(device_name)
    if key is None:
        return None
    return DEVICES[key].peak_flops.get(dtype)
