"""`plait plan --calibrate` and `parallel.auto`: measure this machine, write a cluster profile.

Two measurements, both taken on `workers` processes at once, as `plait train` would run them:
1. the matmul rate: `F.linear` of square matrices of a few sizes (bf16 on a GPU; fp32 and bf16 on a
   CPU), the best sustained rate of each worker, and the slowest worker's figure (a synchronous step
   waits for it);
2. the links: all-reduce and all-gather (NCCL on GPUs, gloo on CPUs) of messages from a few KB to
   tens of MB, on groups of 2..N workers, fitted by weighted least squares to
       time = steps x latency + bytes_on_wire / bandwidth,
   with the ring's steps and per-rank bytes: all-reduce 2(n-1) steps and 2(n-1)/n x size bytes,
   all-gather n-1 steps and (n-1)/n x size bytes (size: the full buffer).
All workers run on this one machine, so the inter-node link is written equal to the intra-node one.

Imports torch only inside these functions and the workers; it builds the `Cluster` of plait.hardware
that the planner plans for, and the planner never imports it.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from plait.config import ConfigError
from plait.hardware.devices import DEVICES, GB, Cluster, Device, Link, default_links, device_for_name, host_memory_bytes
from plait.hardware.profile import describe, write_profile

KB, MB = 2**10, 2**20
DEFAULT_MESSAGE_BYTES = (4 * KB, 64 * KB, 1 * MB, 8 * MB, 32 * MB)
CPU_MATMUL_SIZES = (256, 512, 1024)
GPU_MATMUL_SIZES = (4096, 8192)
CPU_ELEMENTWISE_BYTES = (1 * MB, 4 * MB, 16 * MB)
GPU_ELEMENTWISE_BYTES = (64 * MB, 256 * MB)


def calibrate(
    workers: int,
    out: Path | str,
    *,
    message_bytes: tuple[int, ...] = DEFAULT_MESSAGE_BYTES,
    matmul_sizes: tuple[int, ...] | None = None,
    seconds_per_point: float = 0.1,
) -> Cluster:
    """Measure this machine with `workers` processes, write the profile to `out`, return it.
    `message_bytes`, `matmul_sizes` and `seconds_per_point` (the time spent on each measured point,
    per window) make it quicker or more precise."""
    cluster, calibration = measure(workers, message_bytes=message_bytes, matmul_sizes=matmul_sizes,
                                   seconds_per_point=seconds_per_point)
    write_profile(cluster, out, calibration=calibration)
    return cluster


def measure(
    workers: int,
    *,
    message_bytes: tuple[int, ...] = DEFAULT_MESSAGE_BYTES,
    matmul_sizes: tuple[int, ...] | None = None,
    seconds_per_point: float = 0.1,
) -> tuple[Cluster, dict[str, Any]]:
    """The measured cluster and what was measured (the profile's [calibration] table)."""
    import torch
    import torch.multiprocessing as mp

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--workers = {workers!r} must be a whole number of at least 1 (2 or more to measure links)")
    on_gpu = torch.cuda.is_available()
    if on_gpu and workers > torch.cuda.device_count():
        raise ConfigError(
            f"--workers = {workers} is more than the {torch.cuda.device_count()} GPU(s) of this machine; "
            f"use --workers {torch.cuda.device_count()} (one worker per GPU)"
        )
    if not message_bytes or any(size < 16 for size in message_bytes):
        raise ConfigError(f"message sizes {message_bytes} must be at least 16 bytes each")
    sizes = tuple(matmul_sizes or (GPU_MATMUL_SIZES if on_gpu else CPU_MATMUL_SIZES))
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        settings = {"message_bytes": list(message_bytes), "matmul_sizes": list(sizes), "seconds": seconds_per_point,
                    "elementwise_bytes": list(GPU_ELEMENTWISE_BYTES if on_gpu else CPU_ELEMENTWISE_BYTES),
                    "overhead_seconds": max(0.1, 3 * seconds_per_point)}
        # mp.spawn raises with the worker's traceback if a worker fails.
        mp.spawn(_worker, args=(workers, str(Path(tmp) / "store"), str(result_path), settings), nprocs=workers, join=True)
        result = json.loads(result_path.read_text())
    return _profile(result, workers)


def main_calibrate(workers: int, out: str) -> int:
    """`plait plan --calibrate [--workers N] [--out FILE]`: measure, print a short table, write the profile."""
    print(f"calibrating this machine with {workers} worker(s) ...", flush=True)
    cluster, calibration = measure(workers)
    write_profile(cluster, out, calibration=calibration)
    for key, value in calibration.items():
        if key.startswith("matmul_"):
            print(f"{key[len('matmul_'):-len('_flops')]} matmul: {value / 1e12:.4g} TFLOP/s per worker")
    fits = [(key[len("fit_"):], value) for key, value in calibration.items() if key.startswith("fit_")]
    if fits:
        print(f"{'fit':<16} {'GB/s':>10} {'latency us':>11} {'points':>6}")
        for name, (bandwidth, latency, points) in fits:
            print(f"{name:<16} {bandwidth / GB:>10.4g} {latency * 1e6:>11.4g} {points:>6}")
    for line in describe(cluster):
        print(line)
    print(calibration["method_links"])
    print(f"wrote {out}: use it with `plait plan --cluster {out}`")
    return 0


# ---- the workers ---------------------------------------------------------------------------------


def _worker(rank: int, workers: int, store: str, result_path: str, settings: dict) -> None:
    import torch
    import torch.distributed as dist

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(rank)
    elif workers > 1:
        torch.set_num_threads(1)  # as torchrun sets OMP_NUM_THREADS=1 for each of several workers
    dist.init_process_group(
        "nccl" if on_gpu else "gloo", init_method=f"file://{store}", rank=rank, world_size=workers,
        timeout=datetime.timedelta(seconds=120),
    )
    device = torch.device("cuda", rank) if on_gpu else torch.device("cpu")
    try:
        dtypes = ("bf16",) if on_gpu else ("fp32", "bf16")
        rates = {}
        for dtype in dtypes:
            dist.barrier()  # every worker multiplies at the same time, sharing the machine as in training
            rates[dtype] = _matmul_rate(device, dtype, settings["matmul_sizes"], settings["seconds"])
        dist.barrier()
        bandwidth = _elementwise_bandwidth(device, settings["elementwise_bytes"], settings["seconds"])
        slowest = torch.tensor([rates[d] for d in dtypes] + [bandwidth], dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MIN)
        # The wrappers' host time (plait.measure.overhead) adds to the step only where the host
        # does the compute too: measured on CPUs, every worker at once; the slowest sets the pace.
        overheads = {"tp_linear_s": 0.0, "fsdp_call_s": 0.0}
        if not on_gpu:
            from plait.measure.overhead import measure_overheads

            dist.barrier()
            measured = measure_overheads(settings["overhead_seconds"])
            most = torch.tensor([measured["tp_linear_s"], measured["fsdp_call_s"]], dtype=torch.float64)
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            overheads = dict(zip(("tp_linear_s", "fsdp_call_s"), most.tolist()))
        samples = []
        for n in range(2, workers + 1):
            group = dist.new_group(list(range(n)))  # every rank takes part in creating every group
            if rank < n:
                samples += _collective_samples(group, n, device, settings["message_bytes"], settings["seconds"])
            dist.barrier()
        if rank == 0:
            info: dict[str, Any] = {
                "matmul": dict(zip(dtypes, slowest.tolist()[: len(dtypes)])), "memory_bandwidth": slowest.tolist()[-1],
                "overheads": overheads, "samples": samples, "torch": torch.__version__,
                "backend": dist.get_backend(), "device_name": torch.cuda.get_device_name(device) if on_gpu else "cpu",
                "memory_bytes": torch.cuda.get_device_properties(device).total_memory if on_gpu else None,
            }
            Path(result_path).write_text(json.dumps(info))
        dist.barrier()
    finally:
        # Without this teardown gloo sometimes aborts the process at interpreter exit.
        dist.destroy_process_group()
        gc.collect()


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _matmul_rate(device: Any, dtype: str, sizes: list[int], seconds: float) -> float:
    """The best FLOP/s of a square matmul (`F.linear`, the path of the model's layers: on a CPU its
    bf16 kernel is several times faster than `torch.mm`'s) over sizes, each timed over two windows
    of ~`seconds`.
    Sizes above one whose single product took longer than a window are skipped (a slow dtype, such
    as bf16 on a CPU without bf16 instructions, would otherwise take minutes)."""
    import torch
    import torch.nn.functional as F

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    best = 0.0
    for size in sizes:
        x = torch.randn(size, size, device=device, dtype=torch_dtype)
        weight = torch.randn(size, size, device=device, dtype=torch_dtype)
        F.linear(x, weight)  # warm-up: kernel selection, page faults
        _sync(device)
        start = time.perf_counter()
        F.linear(x, weight)
        _sync(device)
        once = time.perf_counter() - start
        best = max(best, 2 * size**3 / once)
        if once > seconds:
            break
        reps = min(1000, math.ceil(seconds / max(once, 1e-9)))
        for _ in range(2):
            _sync(device)
            start = time.perf_counter()
            for _ in range(reps):
                F.linear(x, weight)
            _sync(device)
            best = max(best, 2 * size**3 * reps / (time.perf_counter() - start))
    return best


def _elementwise_bandwidth(device: Any, sizes: list[int], seconds: float) -> float:
    """Bytes/s of an eager out-of-place fp32 add (read two, write one, as plait's unfused residual
    adds and norms do), the geometric mean over tensor sizes of the order of a layer's activations
    (the rate depends on the size: caches below, page faults of fresh outputs above)."""
    import torch

    logs = []
    for size in sizes:
        numel = max(1, size // 4)
        a = torch.randn(numel, device=device)
        b = torch.randn(numel, device=device)
        torch.add(a, b)  # warm-up
        _sync(device)
        best = math.inf
        for _ in range(2):
            reps, start = 0, time.perf_counter()
            while True:
                torch.add(a, b)
                reps += 1
                if reps % 8 == 0:
                    _sync(device)
                    if time.perf_counter() - start >= seconds:
                        break
            best = min(best, (time.perf_counter() - start) / reps)
        logs.append(math.log(3 * numel * 4 / best))
    return math.exp(sum(logs) / len(logs))


def _collective_samples(group: Any, n: int, device: Any, message_bytes: list[int], seconds: float) -> list[dict]:
    """(collective, n, size, steps, bytes on the wire per rank, seconds) for each message size."""
    import torch
    import torch.distributed as dist

    # torch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single.
    _all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    samples = []
    for size in message_bytes:
        numel = max(n, size // 4) // n * n  # fp32 elements, a multiple of n for all-gather
        full = torch.ones(numel, dtype=torch.float32, device=device)
        part = torch.ones(numel // n, dtype=torch.float32, device=device)
        ops = {
            "all_reduce": (lambda: dist.all_reduce(full, group=group), 2 * (n - 1), 2 * (n - 1) / n),
            "all_gather": (lambda: _all_gather(full, part, group=group), n - 1, (n - 1) / n),
        }
        for name, (op, steps, wire_fraction) in ops.items():
            op()  # warm-up (connections, buffers)
            _sync(device)
            start = time.perf_counter()
            op()
            _sync(device)
            # The group agrees on the repetitions (a collective must be called equally often).
            reps = torch.tensor([max(2, min(200, math.ceil(seconds / max(time.perf_counter() - start, 1e-9))))], device=device)
            dist.all_reduce(reps, op=dist.ReduceOp.MAX, group=group)
            best = math.inf
            for _ in range(3):  # the best of three windows: other work on the machine only adds time
                dist.barrier(group=group)
                start = time.perf_counter()
                for _ in range(int(reps.item())):
                    op()
                _sync(device)
                elapsed = torch.tensor([(time.perf_counter() - start) / int(reps.item())], dtype=torch.float64, device=device)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)  # done when the slowest rank is
                best = min(best, elapsed.item())
            samples.append({
                "collective": name, "workers": n, "size": numel * 4, "steps": steps,
                "wire_bytes": wire_fraction * numel * 4, "seconds": best,
            })
    return samples


# ---- the fit and the profile ---------------------------------------------------------------------


def fit_link(samples: list[dict]) -> Link:
    """Least squares for time = steps x latency + wire_bytes / bandwidth, each point weighted by
    1/time (relative errors, so that small messages fix the latency and large ones the bandwidth).
    A negative latency (noise) is refitted as zero; the bandwidth must come out positive."""
    rows = [(s["steps"] / s["seconds"], s["wire_bytes"] / s["seconds"]) for s in samples]  # each row / y
    # Normal equations of min sum (a*x1 + b*x2 - 1)^2 over (a, b) = (latency, 1/bandwidth).
    s11 = sum(x1 * x1 for x1, _ in rows)
    s12 = sum(x1 * x2 for x1, x2 in rows)
    s22 = sum(x2 * x2 for _, x2 in rows)
    t1 = sum(x1 for x1, _ in rows)
    t2 = sum(x2 for _, x2 in rows)
    det = s11 * s22 - s12 * s12
    latency, inverse_bandwidth = ((t1 * s22 - t2 * s12) / det, (s11 * t2 - s12 * t1) / det) if det > 0 else (-1.0, 0.0)
    if latency < 0:
        latency, inverse_bandwidth = 0.0, t2 / s22
    if not inverse_bandwidth > 0:
        raise ConfigError(
            "the collective timings do not grow with the message size, so no bandwidth can be fitted; "
            "calibrate with larger messages or on a quieter machine"
        )
    return Link(bandwidth=1 / inverse_bandwidth, latency=latency)


def _profile(result: dict, workers: int) -> tuple[Cluster, dict[str, Any]]:
    matmul = result["matmul"]
    calibration: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": result["torch"], "backend": result["backend"], "device_name": result["device_name"],
        "workers": workers,
        **{f"matmul_{dtype}_flops": rate for dtype, rate in matmul.items()},
    }
    if result["device_name"] == "cpu":
        key = "cpu"
        device = Device("cpu", dict(matmul), host_memory_bytes() // workers, 1.0)
        calibration["method_matmul"] = "measured fp32 and bf16 matmul (F.linear) rates are the peaks; efficiency 1.0"
    else:
        key = device_for_name(result["device_name"])
        if key is None:
            device = Device(result["device_name"].lower(), {"bf16": matmul["bf16"]}, result["memory_bytes"], 1.0)
            calibration["method_matmul"] = "device not in the table: the measured bf16 rate is the peak; efficiency 1.0"
        else:
            table = DEVICES[key]
            efficiency = min(1.0, matmul["bf16"] / table.peak_flops["bf16"])
            device = Device(key, dict(table.peak_flops), result["memory_bytes"], efficiency)
            calibration["method_matmul"] = "the table's peaks; efficiency = measured bf16 matmul (F.linear) rate / bf16 peak"
    device = dataclasses.replace(device, memory_bandwidth=result["memory_bandwidth"], overlaps_comm=key != "cpu",
                                 **result["overheads"])
    calibration["memory_bandwidth_bytes_per_s"] = result["memory_bandwidth"]
    calibration["method_memory_bandwidth"] = ("eager fp32 add (3 x 4 bytes per element), geometric mean over "
                                              "sizes, the slowest worker")
    if key == "cpu":
        calibration["method_overheads"] = ("tp_linear_s, fsdp_call_s: forward + backward of small linears with and "
                                           "without DTensor TP / FSDP2 on a one-rank group, the slowest worker")
    if workers >= 2:
        samples = result["samples"]
        intra = inter = fit_link(samples)
        calibration["fit_all"] = [intra.bandwidth, intra.latency, len(samples)]
        for name in ("all_reduce", "all_gather"):
            for n in range(2, workers + 1):
                points = [s for s in samples if s["collective"] == name and s["workers"] == n]
                calibration[f"samples_{name}_{n}"] = [[s["size"], s["seconds"]] for s in points]
                try:  # for the table only: the profile's link is the fit over all points above
                    link = fit_link(points)
                except ConfigError:
                    continue
                calibration[f"fit_{name}_{n}"] = [link.bandwidth, link.latency, len(points)]
        calibration["method_links"] = (
            "time = steps x latency + bytes_on_wire / bandwidth, fitted to all-reduce and all-gather "
            "(fit_*: bandwidth bytes/s, latency s, points; samples_*: message bytes, seconds); "
            "all workers run on this machine, so the inter-node link is set equal to the intra-node one"
        )
    else:
        intra, inter = default_links(key) if key else default_links("cpu")
        calibration["method_links"] = "one worker measures no links: the table's default links for this device"
    # This machine's memory is the node's host memory (for "cpu" also the workers' device memory).
    cluster = Cluster(device=device, gpus=workers, gpus_per_node=workers, intra=intra, inter=inter,
                      host_memory_bytes=host_memory_bytes(), source="calibrated")
    return cluster, calibration
