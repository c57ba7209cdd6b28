"""`plait plan --calibrate` on 2 gloo workers with tiny sizes: it writes a profile that loads, with
positive, plausible numbers (no timing is asserted beyond orders of magnitude)."""

from __future__ import annotations

from plait.hardware.profile import load_profile
from plait.measure.calibrate import calibrate

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def test_calibrate_two_workers_writes_a_plausible_profile(tmp_path):
    out = tmp_path / "local.toml"
    cluster = calibrate(2, out, message_bytes=(4096, 2**18, 2**21), matmul_sizes=(64, 128), seconds_per_point=0.02)
    assert load_profile(out) == cluster
    assert (cluster.gpus, cluster.gpus_per_node, cluster.source, cluster.device.name) == (2, 2, "calibrated", "cpu")
    for dtype in ("fp32", "bf16"):
        assert 1e6 < cluster.device.peak_flops[dtype] < 1e14, dtype  # 1 MFLOP/s .. 100 TFLOP/s
    assert cluster.device.matmul_efficiency == 1.0 and cluster.device.memory_bytes > 0
    assert 1e6 < cluster.intra.bandwidth < 1e12  # 1 MB/s .. 1 TB/s
    assert 0 <= cluster.intra.latency < 0.1
    assert cluster.inter == cluster.intra  # one machine: the inter-node link is the measured one
    calibration = tomllib.loads(out.read_text())["calibration"]
    # Every message size was timed for both collectives, and the per-collective fits are there.
    for name in ("all_reduce", "all_gather"):
        assert [size for size, _ in calibration[f"samples_{name}_2"]] == [4096, 2**18, 2**21]
        assert all(seconds > 0 for _, seconds in calibration[f"samples_{name}_2"])
        bandwidth, latency, points = calibration[f"fit_{name}_2"]
        assert bandwidth > 0 and latency >= 0 and points == 3
