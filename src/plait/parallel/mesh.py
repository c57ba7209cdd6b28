"""The device mesh: the job's ranks arranged on named axes.

Axes, outermost first: `dp_replicate`, `dp_shard`, `tp`. Tensor parallelism is innermost so its
ranks are neighbours (on GPUs: inside one node, on NVLink); data-parallel replicas are outermost
because they communicate least often (once per step). A degree of 1 keeps its axis with size 1,
so the same code slices the mesh whatever the layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from plait.config import Degrees

AXES = ("dp_replicate", "dp_shard", "tp")


@dataclass
class Layout:
    """Degrees and, in a multi-process job, the mesh they span."""

    degrees: Degrees
    mesh: DeviceMesh | None

    def submesh(self, *axes: str) -> DeviceMesh:
        assert self.mesh is not None, "no mesh in a single-process run"
        return self.mesh[axes if len(axes) > 1 else axes[0]]

    def dp_rank(self) -> int:
        """This rank's position among the data-parallel ranks (ranks of one TP group share it)."""
        if self.mesh is None:
            return 0
        coords = self.mesh.get_coordinate()
        assert coords is not None
        return coords[0] * self.degrees.dp_shard + coords[1]


def build_layout(degrees: Degrees, device: torch.device) -> Layout:
    if degrees.world == 1:
        return Layout(degrees, None)
    shape = (degrees.dp_replicate, degrees.dp_shard, degrees.tp)
    return Layout(degrees, init_device_mesh(device.type, shape, mesh_dim_names=AXES))
