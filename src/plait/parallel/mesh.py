"""The device mesh: the job's ranks arranged on named axes.

Axes, outermost first: `pp`, `dp_replicate`, `dp_shard`, `cp`, `tp`. Tensor parallelism is
innermost so its ranks are neighbours (on GPUs: inside one node, on NVLink), context parallelism
next (it moves key/value blocks every layer); pipeline stages are outermost because they only
pass activations between neighbouring stages, and data-parallel replicas talk once per step. A
degree of 1 keeps its axis with size 1, so the same code slices the mesh whatever the layout.

Expert parallelism reuses ranks of the `dp_shard` x `cp` axes (experts are spread where the
dense model is data/context parallel): `ep_mesh()` views those ranks as (`ep_shard`, `ep`),
`ep` innermost, as a second mesh over the same ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from plait.layout import Layout
from plait.layout.types import MESH_AXES

AXES = MESH_AXES  # outermost first


@dataclass
class Mesh:
    """A layout's device mesh in a multi-process job (None in one process), and the sub-meshes
    and process groups the parallelisms take from it."""

    layout: Layout
    device_mesh: DeviceMesh | None
    device_type: str = "cpu"
    _flat: dict[tuple[str, ...], DeviceMesh] = field(default_factory=dict, repr=False)

    def submesh(self, *axes: str) -> DeviceMesh:
        """The sub-mesh over `axes` (in mesh order), e.g. submesh("dp_replicate", "dp_shard")."""
        assert self.device_mesh is not None, "no mesh in a single-process run"
        return self.device_mesh[axes if len(axes) > 1 else axes[0]]

    def flat_mesh(self, *axes: str) -> DeviceMesh:
        """One 1-D mesh over the product of `axes` (e.g. every rank that shares a batch slice
        and the same parameters); made once per set of axes and kept."""
        if len(axes) == 1:
            return self.submesh(axes[0])
        if axes not in self._flat:
            self._flat[axes] = self.submesh(*axes)._flatten("_".join(axes))
        return self._flat[axes]

    def dp_group(self):
        """The process group of all data-parallel ranks (replicate x shard) of this position on
        the other axes; None (the default group) when every rank is a data-parallel rank."""
        assert self.device_mesh is not None
        if self.layout.dp == self.layout.world:
            return None
        return self.flat_mesh("dp_replicate", "dp_shard").get_group()

    def coordinate(self, axis: str) -> int:
        """This rank's position on one axis (0 in a single process)."""
        if self.device_mesh is None:
            return 0
        return self.device_mesh.get_local_rank(axis)

    def dp_rank(self) -> int:
        """This rank's position among the data-parallel ranks: ranks that differ only on the
        pp, cp or tp axes read the same slice of the batch."""
        return self.coordinate("dp_replicate") * self.layout.dp_shard + self.coordinate("dp_shard")

    def ep_mesh(self) -> DeviceMesh:
        """The expert-parallel view: the dp_shard x cp ranks of each (pp, dp_replicate, tp)
        position as (ep_shard, ep), ep innermost. Built on first use; a collective call, so
        every rank must call it in the same order."""
        assert self.device_mesh is not None, "no mesh in a single-process run"
        if ("ep",) not in self._flat:
            d = self.layout
            folded = d.dp_shard * d.cp
            assert folded % d.ep == 0, "ep_degree must divide dp_shard x cp (checked by the config)"
            # Rank order is the same as the main mesh (dp_shard then cp vary between pp/dp_replicate
            # and tp), so the folded axes can be reshaped in place.
            shape = (d.pp, d.dp_replicate, folded // d.ep, d.ep, d.tp)
            names = ("pp", "dp_replicate", "ep_shard", "ep", "tp")
            self._flat[("ep",)] = init_device_mesh(self.device_type, shape, mesh_dim_names=names)
        return self._flat[("ep",)]


def build_mesh(layout: Layout, device: torch.device) -> Mesh:
    """The mesh `layout`'s world spans (a collective: every rank calls it); none in one process."""
    if layout.world == 1:
        return Mesh(layout, None, device.type)
    shape = (layout.pp, layout.dp_replicate, layout.dp_shard, layout.cp, layout.tp)
    return Mesh(layout, init_device_mesh(device.type, shape, mesh_dim_names=AXES), device.type)
