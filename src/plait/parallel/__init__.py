"""Transformations applied to the unmodified model, in one place (`apply.py`): tensor and
sequence parallelism, activation checkpointing and compilation per block, data parallelism
(DDP, ZeRO-1, FSDP2 for ZeRO-2/3 and HSDP), each a function over the model and a mesh axis
(`mesh.py`); pipeline, context and expert parallelism will join the same way.
`distributed.py` joins and leaves the job torchrun started; `comm_counter.py` counts collective bytes."""

from plait.parallel.apply import apply_layout, build_layout_optimizer

__all__ = ["apply_layout", "build_layout_optimizer"]
