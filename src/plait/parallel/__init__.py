"""Transformations applied to the unmodified model: today activation checkpointing and
compilation per block; the data, tensor, pipeline, context and expert parallelisms join here,
each as a function over the model and a mesh axis, applied in one place (`apply.py`)."""

from plait.parallel.apply import apply_layout

__all__ = ["apply_layout"]
