"""Count what every collective moves, per rank, as it runs.

A `TorchDispatchMode` sees each collective at the dispatcher: the c10d ops that DDP's reducer,
FSDP2 and plait's ZeRO-1 (`zero1.py`) issue, and the functional collectives of DTensor (tensor and
sequence parallelism). For each we record the payload and the bytes a rank sends on a ring, the
convention of PAPERS.md: for a payload of M bytes over n ranks, all-reduce 2(n-1)/n M, all-gather
(M = the gathered output) and reduce-scatter (M = the unreduced input) (n-1)/n M, all-to-all
(n-1)/n M, broadcast M (a pipelined ring forwards the whole payload once). An all-to-all with
uneven splits (expert parallelism) counts exactly what leaves the rank: M minus its own block.
Point-to-point sends (`isend`, `batch_isend_irecv`: ring attention, pipeline stages) count their
whole payload as kind "send"; receives are not counted (they are another rank's sends).

A diagnostic: tests/ (the byte counts of PAPERS.md's formulas, ZeRO-1's traffic) and bench/ run
steps under it; training never does, so nothing here is on the path of a `plait train` step.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _nbytes(t: Any) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


def _group_size(group: Any) -> int:
    if isinstance(group, str):  # functional collectives name their group
        from torch.distributed.distributed_c10d import _resolve_process_group

        return _resolve_process_group(group).size()
    if isinstance(group, torch.ScriptObject):  # at the dispatcher a group is a boxed script object
        from torch.distributed import ProcessGroup

        return ProcessGroup.unbox(group).size()
    return group.size()


# op name -> (kind, index of the payload argument, index of the group argument)
_C10D = {
    "c10d.allreduce_": ("all_reduce", 0, 1),
    "c10d.allreduce_coalesced_": ("all_reduce", 0, 1),
    "c10d._allgather_base_": ("all_gather", 0, 2),
    "c10d.allgather_into_tensor_coalesced_": ("all_gather", 0, 2),
    "c10d._reduce_scatter_base_": ("reduce_scatter", 1, 2),
    "c10d.reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1, 2),
    "c10d.broadcast_": ("broadcast", 0, 1),
    "c10d.alltoall_base_": ("all_to_all", 1, 2),
    "c10d.send": ("send", 0, 1),
    "_c10d_functional.all_reduce": ("all_reduce", 0, 2),
    "_c10d_functional.all_gather_into_tensor": ("all_gather_in", 0, 2),
    "_c10d_functional.reduce_scatter_tensor": ("reduce_scatter", 0, 3),
    "_c10d_functional.all_to_all_single": ("all_to_all", 0, 3),
}
_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
           "reduce_scatter": lambda n: (n - 1) / n, "all_to_all": lambda n: (n - 1) / n,
           "broadcast": lambda n: 1.0 if n > 1 else 0.0, "send": lambda n: 1.0}


class CommCounter(TorchDispatchMode):
    """`with CommCounter() as c: ...` then `c.wire_bytes` (sum) and `c.summary()` (per kind)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = defaultdict(int)
        self.payload: dict[str, int] = defaultdict(int)
        self.wire: dict[str, float] = defaultdict(float)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name = str(getattr(func, "overloadpacket", func))
        spec = _C10D.get(name)
        if spec is not None:
            kind, payload_at, group_at = spec
            n = _group_size(args[group_at])
            nbytes = _nbytes(args[payload_at])
            if kind == "all_gather_in":  # functional all-gather gets its input: output is n x
                kind, nbytes = "all_gather", nbytes * n
            wire = _FACTOR[kind](n) * nbytes
            if name == "c10d.alltoall_base_" and args[4]:  # uneven splits: the rows kept are not sent
                from torch.distributed import ProcessGroup

                rank = ProcessGroup.unbox(args[2]).rank()
                src = args[1]
                wire = nbytes - args[4][rank] * (src[0].numel() * src.element_size() if src.shape[0] else 0)
            self.calls[kind] += 1
            self.payload[kind] += nbytes
            self.wire[kind] += wire
        return func(*args, **(kwargs or {}))

    @property
    def wire_bytes(self) -> float:
        return sum(self.wire.values())

    def summary(self) -> dict[str, Any]:
        return {
            "wire_bytes": self.wire_bytes,
            "by_kind": {k: {"calls": self.calls[k], "payload_bytes": self.payload[k], "wire_bytes": self.wire[k]}
                        for k in sorted(self.calls)},
        }
