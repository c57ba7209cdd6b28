"""Checkpoints of a single process: save, find the newest, load.

Layout of `RUN_DIR/checkpoints/`:
    step_<N>/model.safetensors      parameters by name (a tied weight once, under its first name)
    step_<N>/optimizer.safetensors  optimizer state by parameter name: "<param>::<key>"
    step_<N>/rng.safetensors        torch RNG states (CPU, and CUDA when present)
    step_<N>/state.json             step, tokens seen, loader position, optimizer hyperparameters,
                                    the resolved config, plait version
    latest                          text file naming the newest complete step directory

Nothing is unpickled when loading: tensors come from safetensors, the rest is JSON. A checkpoint is
written into a hidden temporary directory and renamed into place only when complete, and `latest`
is replaced atomically after that, so a crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]


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


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in named_parameters(model).items()}


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
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write step_<step> atomically, point `latest` at it, then prune older ones beyond keep_last."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    # .contiguous().clone(): safetensors refuses views and shared storage (the tied weight).
    model_tensors = {name: p.detach().contiguous().clone() for name, p in named_parameters(model).items()}
    save_file(model_tensors, str(tmp / "model.safetensors"))

    names = _param_names(model)
    opt_tensors: dict[str, torch.Tensor] = {}
    for param, param_state in optimizer.state.items():
        for key, value in param_state.items():
            opt_tensors[f"{names[id(param)]}::{key}"] = value.detach().contiguous().clone()
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))

    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    save_file(rng, str(tmp / "rng.safetensors"))

    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    full_state = {"format": FORMAT_VERSION, "step": step, "optimizer_groups": groups, **state}
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


def load_model_weights(path: Path, model: nn.Module) -> None:
    """Copy the checkpoint's parameters into `model` (matching names and shapes exactly)."""
    tensors = load_file(str(Path(path) / "model.safetensors"))
    params = named_parameters(model)
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the model: missing {missing[:4]}, unexpected {unexpected[:4]}; "
            f"was it saved with a different model.* config?"
        )
    with torch.no_grad():
        for name, param in params.items():
            if param.shape != tensors[name].shape:
                raise ValueError(
                    f"checkpoint {path}: {name} has shape {tuple(tensors[name].shape)}, "
                    f"the model expects {tuple(param.shape)}"
                )
            param.copy_(tensors[name])


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> Checkpoint:
    """Restore model, optimizer and RNG in place; return the JSON state (step, loader, ...)."""
    path = Path(path)
    state = read_state(path)
    load_model_weights(path, model)
    if optimizer is not None:
        saved = load_file(str(path / "optimizer.safetensors"))
        params = named_parameters(model)
        optimizer.state.clear()
        for key, value in saved.items():
            name, field = key.split("::", 1)
            param = params[name]
            optimizer.state[param][field] = value.to(param.device) if field != "step" else value
        for group, saved_group in zip(optimizer.param_groups, state["optimizer_groups"]):
            group.update(saved_group)
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda_states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    return Checkpoint(path=path, step=int(state["step"]), state=state)
