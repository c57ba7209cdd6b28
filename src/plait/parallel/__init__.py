"""Transformations applied to the unmodified model, in one place (`apply.py`): tensor and
sequence parallelism, activation checkpointing and compilation per block, data parallelism
(DDP, ZeRO-1, FSDP2 for ZeRO-2/3 and HSDP), each a function over the model and a mesh axis
(`mesh.py`); pipeline, context and expert parallelism will join the same way.
`distributed.py` joins and leaves the job torchrun started.
`apply_layout` and `build_layout_optimizer` load on first use, so that the pure-Python parts
(`pipeline_plan.py`) import without torch."""

from typing import Any

__all__ = ["apply_layout", "build_layout_optimizer"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from plait.parallel import apply

        value = getattr(apply, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'plait.parallel' has no attribute {name!r}")
