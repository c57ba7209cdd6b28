"""How an optimizer that keeps its state in its own layout shows it to checkpoints.

Most optimizers keep state per parameter, and checkpoints take it through torch's
`get_optimizer_state_dict` (whole tensors, or the DTensor shards of FSDP and tensor parallelism).
An optimizer whose state does not follow the parameters' layout (ZeRO-1's flat slices cut
through parameters) implements `ShardedState` instead: it lists this rank's parts of every
parameter's state as `StatePiece`s, views of the live state. `plait.checkpoint.sharded` saves
each piece as boxes of the whole per-parameter entry `optim/<param>/<key>`, under the names and
shapes torch's optimizers give them, so either kind of optimizer loads the other's checkpoints;
loading writes into the views, which restores the optimizer with nothing more to call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class StatePiece:
    """The part of `param`'s state entry `key` this rank holds: elements [start, start +
    flat.numel()) of its local tensor (of `local_shape`, at `global_offset` in the whole tensor
    of `shape`), in row-major order. `flat` is a 1-D view of the live state. A scalar entry (a
    step count) has shape, local shape and offset () and one element."""

    param: torch.Tensor
    key: str
    shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    global_offset: tuple[int, ...]
    start: int
    flat: torch.Tensor


@runtime_checkable
class ShardedState(Protocol):
    def state_pieces(self) -> list[StatePiece]:
        """This rank's pieces of every parameter's state, as views of the live state. An optimizer
        that has not stepped yet creates its state first, so a checkpoint can be loaded into it."""
        ...
