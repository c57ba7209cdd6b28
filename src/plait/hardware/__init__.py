"""The machines plait runs on, as plain data (no torch): what the planner plans for and what the
progress display's MFU divides by.

`devices.py` holds `Device`, `Link` and `Cluster`, the table of accelerators with their usual
servers and the published figures behind them, and `peak_flops`; `profile.py` builds a `Cluster`
from the `--gpus/--gpus-per-node/--gpu` flags or a TOML profile and writes profiles back. Measuring
a machine (`plait plan --calibrate`) is `plait.measure`'s business: it writes a profile here.

The names below are the ones other code uses most; the submodules import each other directly.
"""

from plait.hardware.devices import DEVICES, Cluster, Device, Link, device_for_name, peak_flops
from plait.hardware.profile import cluster_from_flags, load_profile, write_profile

__all__ = ["DEVICES", "Cluster", "Device", "Link", "cluster_from_flags", "device_for_name", "load_profile",
           "peak_flops", "write_profile"]
