"""The hardware the planner plans for: the device table, the flags, TOML profiles, and the link fit of --calibrate."""

from __future__ import annotations

import dataclasses
import math

import pytest

from plait.config import ConfigError
from plait.hardware import peak_flops
from plait.hardware.devices import (
    DEVICES,
    Cluster,
    Device,
    Link,
    default_gpus_per_node,
    default_links,
    device_for_name,
    host_memory_bytes,
    sustained_flops,
)
from plait.hardware.profile import cluster_from_flags, load_profile, write_profile
from plait.measure.calibrate import _profile, fit_link

REQUIRED = ("a100-40", "a100-80", "h100", "h200", "b200", "mi250x", "cpu")


def test_table_holds_every_required_device_with_sane_numbers():
    assert set(REQUIRED) <= set(DEVICES)
    for key, device in DEVICES.items():
        assert device.name == key
        assert device.peak_flops["bf16"] > 0 and device.peak_flops["fp32"] > 0, key
        assert 0 < device.matmul_efficiency <= 1, key
        assert device.memory_bytes > 2**30, key
        intra, inter = default_links(key)
        assert intra.bandwidth > 0 and inter.bandwidth > 0 and intra.latency > 0 and inter.latency > 0, key
        assert intra.bandwidth >= inter.bandwidth, key  # a node's own links are the fast ones
        assert default_gpus_per_node(key) >= 1
    # FP8 where the hardware has it, and only there.
    assert {k for k, d in DEVICES.items() if "fp8" in d.peak_flops} >= {"h100", "h200", "b200"}
    for key in ("a100-40", "a100-80", "mi250x", "cpu"):
        assert "fp8" not in DEVICES[key].peak_flops
    # The generations are ordered as their datasheets say.
    bf16 = {k: DEVICES[k].peak_flops["bf16"] for k in REQUIRED}
    assert bf16["a100-80"] < bf16["h100"] == bf16["h200"] < bf16["b200"]
    assert DEVICES["a100-40"].memory_bytes < DEVICES["a100-80"].memory_bytes < DEVICES["h200"].memory_bytes
    assert default_links("b200")[0].bandwidth == 2 * default_links("h100")[0].bandwidth  # NVLink 5 vs 4


def test_runtime_names_map_to_the_table_and_hardware_reads_it():
    names = {
        "NVIDIA H100 80GB HBM3": "h100", "NVIDIA H200": "h200", "NVIDIA A100-SXM4-80GB": "a100-80",
        "NVIDIA A100-SXM4-40GB": "a100-40", "NVIDIA B200": "b200", "AMD Instinct MI250X": "mi250x",
    }
    for name, key in names.items():
        assert device_for_name(name) == key, name
        assert peak_flops(name, "bf16") == DEVICES[key].peak_flops["bf16"]
        assert peak_flops(name, "fp32") == DEVICES[key].peak_flops["fp32"]
    assert device_for_name("AMD EPYC 7763") is None and peak_flops("cpu", "bf16") is None


def test_sustained_flops_and_a_missing_dtype():
    h100 = DEVICES["h100"]
    assert sustained_flops(h100, "bf16") == h100.peak_flops["bf16"] * h100.matmul_efficiency
    with pytest.raises(ConfigError, match=r"no fp8 rate.*peak_flops\.fp8"):
        sustained_flops(DEVICES["a100-80"], "fp8")


def test_flags_build_the_cluster():
    c = cluster_from_flags(16, None, "h100")
    assert (c.gpus, c.gpus_per_node, c.nodes, c.source) == (16, 8, 2, "flags")
    assert (c.intra, c.inter) == default_links("h100") and c.device == DEVICES["h100"]
    c = cluster_from_flags(4, None, "a100-80")  # fewer GPUs than a server: one node of 4
    assert (c.gpus_per_node, c.nodes) == (4, 1)
    c = cluster_from_flags(12, 4, "mi250x")
    assert (c.gpus_per_node, c.nodes) == (4, 3)
    c = cluster_from_flags(4, None, "cpu")  # CPU workers share one machine and its memory
    assert (c.gpus_per_node, c.nodes) == (4, 1)
    assert c.device.memory_bytes == DEVICES["cpu"].memory_bytes // 4


@pytest.mark.parametrize(
    "gpus, per_node, gpu, match",
    [
        (8, None, "h10", r"--gpu = 'h10' is not a known device; did you mean 'h100'"),
        (8, None, "tpu", r"--gpu = 'tpu' is not a known device; .*valid: a100-40, a100-80, b200, cpu, h100, h200, l40s, mi250x"),
        (0, None, "h100", r"--gpus = 0 must be a whole number of at least 1"),
        (12, None, "h100", r"--gpus = 12 .*not a multiple of the 8 GPUs per node of the usual h100 server; use --gpus 8 or 16"),
        (12, 8, "h100", r"--gpus = 12 .*--gpus-per-node = 8"),
        (8, 0, "h100", r"--gpus-per-node = 0 must be"),
    ],
)
def test_flag_errors_name_the_flag_and_the_fix(gpus, per_node, gpu, match):
    with pytest.raises(ConfigError, match=match):
        cluster_from_flags(gpus, per_node, gpu)


def test_profile_round_trips_exactly(tmp_path):
    clusters = [cluster_from_flags(64, None, key) for key in DEVICES if key != "cpu"]
    clusters.append(cluster_from_flags(2, None, "cpu"))
    odd = Device("my-gpu", {"bf16": 1 / 3 * 1e15, "fp32": 123456789.123456789}, 12345678901, 0.123456789)
    clusters.append(Cluster(odd, 24, 6, Link(1 / 7 * 1e11, 2.5e-6 / 3), Link(3.3e9, 1e-5), 987654321987,
                            source="calibrated"))
    for i, cluster in enumerate(clusters):
        path = tmp_path / f"profile{i}.toml"
        write_profile(cluster, path, calibration={"workers": 2, "fit_all": [1e9, 5e-5, 10], "note": 'a "quoted" text'})
        assert load_profile(path) == cluster, cluster.device.name


def test_host_memory_per_node_in_the_table_and_the_flags():
    nodes = {key: cluster_from_flags(8, None, key) for key in DEVICES if key != "cpu"}
    for key, cluster in nodes.items():
        # A node's system memory holds at least what its GPUs hold (offload needs room for it).
        assert cluster.host_memory_bytes >= cluster.gpus_per_node * cluster.device.memory_bytes, key
    # The 80 GB DGX A100 ships with twice the 40 GB one's memory; H100 and H200 nodes alike.
    assert nodes["a100-80"].host_memory_bytes == 2 * nodes["a100-40"].host_memory_bytes
    assert nodes["h100"].host_memory_bytes == nodes["h200"].host_memory_bytes
    # "cpu": the machine's memory is the node's host memory and, shared, the workers' device memory.
    c = cluster_from_flags(4, None, "cpu")
    assert c.host_memory_bytes == host_memory_bytes() and c.device_is_host and c.ranks_per_node == 4
    assert c.device.memory_bytes * 4 <= c.host_memory_bytes
    assert not nodes["h100"].device_is_host


def test_profile_without_host_memory_takes_the_default(tmp_path):
    """A profile written before cluster.host_memory_bytes existed: the table's node for a device
    in it; for "cpu" and unknown devices, the node's device memory together."""
    path = tmp_path / "p.toml"
    odd = Device("my-gpu", {"bf16": 1e15}, 10 * 2**30, 0.5)
    calibrated_cpu = Device("cpu", {"fp32": 1e11}, 3 * 2**30, 1.0)  # 3 GiB per worker, as --calibrate wrote
    for device, expected in ((DEVICES["h100"], cluster_from_flags(8, None, "h100").host_memory_bytes),
                             (odd, 4 * 10 * 2**30), (calibrated_cpu, 4 * 3 * 2**30)):
        cluster = Cluster(device, 8, 4, Link(1e11, 1e-6), Link(1e10, 1e-5), host_memory_bytes=12345, source="s")
        write_profile(cluster, path)
        text = path.read_text()
        assert "host_memory_bytes = 12345" in text
        path.write_text("\n".join(line for line in text.splitlines() if not line.startswith("host_memory_bytes")))
        assert load_profile(path) == dataclasses.replace(cluster, host_memory_bytes=expected), device.name


def test_calibrated_profile_holds_this_machines_memory():
    result = {"matmul": {"fp32": 2e10, "bf16": 1e10}, "torch": "x", "backend": "gloo", "device_name": "cpu",
              "memory_bandwidth": 6e9, "overheads": {"tp_linear_s": 1e-3, "fsdp_call_s": 3e-4}}
    cluster, _ = _profile(result, 1)
    assert cluster.host_memory_bytes == host_memory_bytes()
    assert cluster.device.memory_bytes == host_memory_bytes()  # one worker: all of it
    # The measured bandwidth and host times are the device's; a CPU does not overlap.
    d = cluster.device
    assert (d.memory_bandwidth, d.tp_linear_s, d.fsdp_call_s, d.overlaps_comm) == (6e9, 1e-3, 3e-4, False)


def test_profiles_carry_the_device_timing_keys_and_older_ones_take_the_table(tmp_path):
    path = tmp_path / "p.toml"
    cpu = cluster_from_flags(2, 2, "cpu")
    measured = dataclasses.replace(cpu, device=dataclasses.replace(cpu.device, memory_bandwidth=7.5e9,
                                                                  tp_linear_s=1.25e-3, fsdp_call_s=2.5e-4))
    write_profile(measured, path)
    assert load_profile(path) == dataclasses.replace(measured, source="flags")
    text = path.read_text()
    for key in ("memory_bandwidth_bytes_per_s", "overlaps_comm", "tp_linear_s", "fsdp_call_s"):
        text = "\n".join(line for line in text.splitlines() if not line.startswith(key + " ="))
    path.write_text(text)
    old = load_profile(path).device  # a profile written before these keys: the table's cpu entry
    assert (old.memory_bandwidth, old.overlaps_comm, old.tp_linear_s) == (cpu.device.memory_bandwidth, False, 0.0)
    h100 = tmp_path / "h.toml"
    write_profile(cluster_from_flags(8, None, "h100"), h100)
    assert load_profile(h100).device.overlaps_comm is True
    h100.write_text(h100.read_text().replace("overlaps_comm = true", "overlaps_comm = 1"))
    with pytest.raises(ConfigError, match="device.overlaps_comm = 1 must be true or false"):
        load_profile(h100)


def test_profile_without_a_source_takes_the_path(tmp_path):
    path = tmp_path / "p.toml"
    write_profile(cluster_from_flags(8, None, "h100"), path)
    path.write_text(path.read_text().replace('source = "flags"\n', ""))
    assert load_profile(path) == dataclasses.replace(cluster_from_flags(8, None, "h100"), source=str(path))


def _broken(tmp_path, old: str, new: str):
    path = tmp_path / "p.toml"
    write_profile(cluster_from_flags(16, None, "h100"), path)
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize(
    "old, new, match",
    [
        ("[device]", "[devise]", r"unknown section \[devise\]; did you mean 'device'"),
        ("matmul_efficiency = 0.7", "matmul_eficiency = 0.7", r"unknown key device.matmul_eficiency; did you mean 'device.matmul_efficiency'"),
        ("matmul_efficiency = 0.7", "matmul_efficiency = 1.5", r"device.matmul_efficiency = 1.5 must be in \(0, 1\]"),
        ("memory_bytes = ", "memory_bytes = -", r"device.memory_bytes = -\d+ must be a positive"),
        ("bf16 = ", "bf17 = ", r"unknown key device.peak_flops.bf17; did you mean 'device.peak_flops.bf16'"),
        ("bf16 = 989000000000000.0", 'bf16 = "989e12"', r"device.peak_flops.bf16 = '989e12' must be a finite number"),
        ("bf16 = 989000000000000.0", "bf16 = 0.0", r"device.peak_flops.bf16 = 0.0 must be a positive rate"),
        ("gpus = 16", "gpus = 12", r"cluster.gpus = 12 is not a multiple of cluster.gpus_per_node = 8"),
        ("gpus = 16", "gpus = 16.0", r"cluster.gpus = 16.0 must be a whole number"),
        ("gpus_per_node = 8\n", "", r"cluster.gpus_per_node is missing"),
        ("host_memory_bytes = ", "host_memory_bytes = -", r"cluster.host_memory_bytes = -\d+ must be a positive"),
        ("host_memory_bytes = ", "host_memory_byte = ", r"unknown key cluster.host_memory_byte; did you mean 'cluster.host_memory_bytes'"),
        ("host_memory_bytes = 2199023255552", 'host_memory_bytes = "2TB"', r"cluster.host_memory_bytes = '2TB' must be a whole number"),
        ("bandwidth_bytes_per_s = 450000000000.0", "bandwidth_bytes_per_s = -1.0", r"links.intra.bandwidth_bytes_per_s = -1.0 must be positive"),
        ("latency_s = 5e-06", "latency_s = -5e-06", r"links.inter.latency_s = -5e-06 must be >= 0"),
        ("latency_s = 3e-06", "latency_us = 3.0", r"unknown key links.intra.latency_us; did you mean 'links.intra.latency_s'"),
        ("[links.inter]", "[links.outer]", r"unknown key links.outer; did you mean 'links.inter'"),
        ("[links.intra]", "[lunks.intra]", r"unknown section \[lunks\]; did you mean 'links'"),
        ("name = ", "name = = ", r"not valid TOML"),
    ],
)
def test_profile_errors_name_the_key_and_the_fix(tmp_path, old, new, match):
    with pytest.raises(ConfigError, match=match):
        load_profile(_broken(tmp_path, old, new))


def test_missing_profile_says_how_to_make_one(tmp_path):
    with pytest.raises(ConfigError, match=r"no such file; write one with `plait plan --calibrate"):
        load_profile(tmp_path / "absent.toml")


def test_link_fit_recovers_known_latency_and_bandwidth():
    latency, bandwidth = 7e-6, 3.2e10
    samples = []
    for n in (2, 3, 4):
        for size in (4096, 2**16, 2**20, 2**24):
            for steps, wire in ((2 * (n - 1), 2 * (n - 1) / n * size), (n - 1, (n - 1) / n * size)):
                samples.append({"steps": steps, "wire_bytes": wire, "seconds": steps * latency + wire / bandwidth})
    link = fit_link(samples)
    assert math.isclose(link.latency, latency, rel_tol=1e-9)
    assert math.isclose(link.bandwidth, bandwidth, rel_tol=1e-9)
    # Noise that would make the latency negative: it is refitted as zero, bandwidth stays close.
    noisy = [dict(s, seconds=s["wire_bytes"] / bandwidth * (1.05 if s["wire_bytes"] < 1e5 else 1.0)) for s in samples]
    link = fit_link(noisy)
    assert link.latency >= 0 and math.isclose(link.bandwidth, bandwidth, rel_tol=0.05)
    with pytest.raises(ConfigError, match="do not grow with the message size"):
        fit_link([{"steps": 2, "wire_bytes": w, "seconds": 1.0 / w} for w in (1e3, 1e6)])


def test_missing_sections_are_named(tmp_path):
    path = tmp_path / "p.toml"
    write_profile(cluster_from_flags(16, None, "h100"), path)
    text = path.read_text()
    path.write_text(text[: text.index("[links.inter]")])
    with pytest.raises(ConfigError, match=r"the \[links.inter\] section is missing"):
        load_profile(path)
    path.write_text(text[: text.index("[cluster]")])
    with pytest.raises(ConfigError, match=r"the \[cluster\] section is missing"):
        load_profile(path)
