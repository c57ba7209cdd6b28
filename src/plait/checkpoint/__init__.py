"""Checkpoints: sharded on save, layout-free on load, atomic, verified.

`plait.checkpoint.sharded` writes and reads them (every rank its own part, through PyTorch
Distributed Checkpoint) and describes the files; `plait.checkpoint.dcp_io` is the DCP glue;
`plait.checkpoint.hf` converts to and from Hugging Face Llama directories. This module holds
the small helpers the rest of plait uses: names, finding the newest checkpoint, reading one
whole into a single-process model, and writing whole tensors (an import) as a checkpoint.

Nothing is unpickled when loading: tensors are read with `torch.load(weights_only=True)`,
everything else is JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from plait.checkpoint.dcp_io import Chunks, read_whole_tensors
from plait.checkpoint.sharded import (
    MANIFEST,
    CheckpointError,
    canonical_name,
    checkpoint_dir,
    complete_steps,
    named_parameters,
    read_manifest,
    write_checkpoint,
)

__all__ = [
    "MANIFEST", "CheckpointError", "canonical_name", "checkpoint_dir", "iter_model_tensors", "latest_checkpoint",
    "load_model_weights", "named_parameters", "read_manifest", "save_model_tensors",
]

def refuse_checkpoints_without_resume(run_dir: Path, resume: bool) -> None:
    """`checkpoint.resume = false` guards a new run: raise ConfigError when `run_dir` already holds
    checkpoints, before anything is written into it (a plan, a measured cluster profile)."""
    if resume:
        return
    found = latest_checkpoint(run_dir)
    if found is not None:
        from plait.config import ConfigError

        raise ConfigError(
            f"run.dir = {str(run_dir)!r} already holds checkpoints ({found.name}) and "
            f"checkpoint.resume = false; pick a new --run.dir, or drop --checkpoint.resume=false to resume"
        )


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The directory `latest` names, or the newest complete one if the pointer is missing.
    (Cheap: it does not verify checksums; training resumes via `sharded.find_intact`, which does.)"""
    root = checkpoint_dir(run_dir)
    pointer = root / "latest"
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if (target / MANIFEST).is_file():
            return target
    steps = complete_steps(run_dir)
    return steps[-1][1] if steps else None


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def iter_model_tensors(path: Path) -> Any:
    """(name, whole tensor) of a checkpoint's model weights, one tensor in memory at a time."""
    read_manifest(path)  # refuses a directory that is not a (current) plait checkpoint
    return read_whole_tensors(Path(path), prefix="model/")


def load_model_weights(path: Path, model: nn.Module) -> None:
    """Copy the checkpoint's parameters into an unwrapped, single-process `model`."""
    from plait.checkpoint.sharded import check_model_shapes

    state = model.state_dict()
    check_model_shapes(Path(path), {name: t.shape for name, t in state.items()})
    with torch.no_grad():
        for name, tensor in iter_model_tensors(path):
            state[name].copy_(tensor)


def save_model_tensors(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> Path:
    """Write whole tensors (one process, e.g. an import) as a weights-only checkpoint."""
    chunks = {f"model/{name}": Chunks(t.shape, [((0,) * t.dim(), t.contiguous())]) for name, t in tensors.items()}
    return write_checkpoint(run_dir, step, chunks, {**manifest, "weights_only": True}, keep_last=1)
