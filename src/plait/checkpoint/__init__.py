"""Checkpoint files: write one atomically, find the newest, read it back.

A checkpoint holds whole tensors by name, whatever layout wrote it (`plait.checkpoint.state`
gathers them from, and scatters them to, any layout), so it resumes under any other.

Layout of `RUN_DIR/checkpoints/`:
    step_<N>/model.safetensors      whole parameters by name, whatever layout wrote them
    step_<N>/optimizer.safetensors  optimizer state by parameter name: "<param>::<key>"
    step_<N>/rng.safetensors        torch RNG states (CPU, and CUDA when present)
    step_<N>/state.json             step, tokens seen, loader position, optimizer hyperparameters,
                                    the resolved config, plait version
    latest                          text file naming the newest complete step directory

A checkpoint whose state.json says `weights_only` (an import, see `plait.checkpoint.hf`, which
converts to and from Hugging Face Llama directories) holds model weights only.

Nothing is unpickled when loading: tensors come from safetensors, the rest is JSON. A checkpoint is
written into a hidden temporary directory and renamed into place only when complete, and `latest`
is replaced atomically after that, so a crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT_VERSION = 1


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


# Wrappers that training applies (activation checkpointing, compile) insert these into names.
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.")


def canonical_name(name: str) -> str:
    """A parameter's name in the unmodified model, whatever wrappers training applied."""
    if name.startswith("module."):  # DistributedDataParallel
        name = name[len("module."):]
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {canonical_name(name): p for name, p in model.named_parameters()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(
    run_dir: Path,
    step: int,
    model_tensors: dict[str, torch.Tensor],
    optim_tensors: dict[str, torch.Tensor],
    optim_groups: list[dict[str, Any]],
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write step_<step> atomically, point `latest` at it, then prune older ones beyond keep_last.
    Takes whole tensors by name (see `plait.checkpoint.state` to gather them from any layout)."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    save_file(model_tensors, str(tmp / "model.safetensors"))
    save_file(optim_tensors, str(tmp / "optimizer.safetensors"))
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    save_file(rng, str(tmp / "rng.safetensors"))
    full_state = {"format": FORMAT_VERSION, "step": step, "optimizer_groups": optim_groups, **state}
    _write_json(tmp / "state.json", full_state)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)

    if final.exists():  # a re-run of the same step after a resume: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, root / "latest")
    _fsync_dir(root)
    _prune(root, keep_last)
    return final


def _complete_steps(root: Path) -> list[tuple[int, Path]]:
    found = []
    for entry in root.glob("step_*"):
        if entry.is_dir() and (entry / "state.json").is_file():
            try:
                found.append((int(entry.name.split("_", 1)[1]), entry))
            except ValueError:
                continue
    return sorted(found)


def _prune(root: Path, keep_last: int) -> None:
    steps = _complete_steps(root)
    for _, path in steps[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The directory `latest` names, or the newest complete one if the pointer is missing."""
    root = checkpoint_dir(run_dir)
    pointer = root / "latest"
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if (target / "state.json").is_file():
            return target
    steps = _complete_steps(root) if root.is_dir() else []
    return steps[-1][1] if steps else None


def read_state(path: Path) -> dict[str, Any]:
    state_file = Path(path) / "state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a plait checkpoint (no state.json)")
    return json.loads(state_file.read_text())


def read_tensors(path: Path, kind: str) -> dict[str, torch.Tensor]:
    """`kind` is "model", "optimizer" or "rng": that file of the checkpoint, tensors only."""
    return load_file(str(Path(path) / f"{kind}.safetensors"))


def check_model_tensors(path: Path, tensors: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> None:
    """Refuse, with names, a checkpoint whose parameters do not match the model's."""
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    wrong = [f"{n} {tuple(tensors[n].shape)} vs {tuple(shapes[n])}" for n in shapes if n in tensors and tensors[n].shape != shapes[n]]
    if missing or unexpected or wrong:
        raise ValueError(
            f"checkpoint {path} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"shapes {wrong[:3]}); was it saved with a different model.* config?"
        )


def load_model_weights(path: Path, model: nn.Module) -> None:
    """Copy the checkpoint's parameters into an unwrapped, single-process `model`."""
    tensors = read_tensors(path, "model")
    check_model_tensors(path, tensors, {name: t.shape for name, t in model.state_dict().items()})
    model.load_state_dict(tensors)


def restore_rng(path: Path) -> None:
    rng = read_tensors(path, "rng")
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda_states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
