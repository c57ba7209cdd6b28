"""Transformations applied to the unmodified model, in one place (`apply.py`): activation
checkpointing and compilation per block, data-parallel replication; the tensor, pipeline,
context and expert parallelisms join here, each as a function over the model and a mesh axis.
`distributed.py` joins and leaves the job torchrun started."""

from plait.parallel.apply import apply_layout, build_layout_optimizer

__all__ = ["apply_layout", "build_layout_optimizer"]
