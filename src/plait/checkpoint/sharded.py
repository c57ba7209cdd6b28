"""Sharded checkpoints: every rank writes its own part, any layout reads them back.

A checkpoint `RUN_DIR/checkpoints/step_<N>/` holds
    __<rank>_<i>.distcp   each rank's tensors (PyTorch Distributed Checkpoint files)
    .metadata.json        where every box of every tensor is (see `plait.checkpoint.dcp_io`)
    manifest.json         step, tokens seen, data position, layout, config, plait version, and
                          the size and SHA-256 of every file above
Tensor entries: `model/<param>`, `optim/<param>/<key>` (each entry of the optimizer's state
under torch's key: `exp_avg`, `exp_avg_sq` and `step` for AdamW), and `rng/<rank>/<cpu|cuda>`.
Parameter names are the unmodified model's, whatever the layout, and each entry is described by
its whole shape, so a checkpoint saved under one layout loads under any other: DCP reads, for
the part each rank holds now, the overlapping parts that were saved. An optimizer keeps its
state in the parameters' layout (torch's `get_optimizer_state_dict` hands it over) or lists it
in pieces of its own layout (`plait.optim.sharded_state`, ZeRO-1's flat slices): either way the
entries are the same.

Saving (`Checkpointer.save`, every rank): the boxes go to DCP, which writes each once (replicas
are de-duplicated). Everything lands in `.tmp_step_<N>/`; when every rank is done, rank 0
hashes the files into the manifest, fsyncs, renames the directory to `step_<N>`, points `latest`
at it and prunes beyond `keep_last`. A crash at any moment leaves either the previous complete
checkpoints or the new one, never a half-written `step_<N>`. With `async_save` the tensors are
first copied to host memory (the training stall), and the writing runs in a background thread
over a process group of its own, while training goes on; one save is in flight at a time.

Resuming (`find_intact` then `restore`): the newest `step_<N>` whose files match its manifest
(sizes and checksums, verified by all ranks in parallel) is loaded; a damaged one is reported
and the previous one tried.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from plait.checkpoint.dcp_io import (
    METADATA_FILE,
    ChunkLoadPlanner,
    Chunks,
    ChunkSavePlanner,
    JsonMetadataReader,
    JsonMetadataWriter,
    chunks_of,
    flat_boxes,
    read_metadata_json,
)
from plait.optim.sharded_state import ShardedState

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp_step_"
StateChunks = dict[str, Chunks]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: damaged, of another model, or of an older format."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


# --- what goes in ----------------------------------------------------------------------------

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


def model_chunks(model: nn.Module) -> StateChunks:
    """This rank's boxes of every parameter, keyed by the unmodified model's names. The boxes
    are views of the live parameters: loading writes into them."""
    with torch.no_grad():
        state = get_model_state_dict(model)
        return {f"model/{name}": chunks_of(t) for name, t in state.items()}


def _piece_chunks(model: nn.Module, optimizer: ShardedState) -> StateChunks:
    """The boxes of an optimizer that lists its state in pieces: each piece, a run of elements
    of a parameter's local tensor in row-major order, becomes boxes of the whole tensor."""
    names = {id(p): name for name, p in named_parameters(model).items()}
    parts: dict[str, list[tuple[tuple[int, ...], torch.Tensor]]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for piece in optimizer.state_pieces():
        key = f"optim/{names[id(piece.param)]}/{piece.key}"
        shapes[key] = piece.shape
        pos = 0
        for off, size in flat_boxes(piece.local_shape, piece.start, piece.start + piece.flat.numel()):
            n = math.prod(size)
            box_offset = tuple(g + o for g, o in zip(piece.global_offset, off))
            parts.setdefault(key, []).append((box_offset, piece.flat[pos : pos + n].view(size)))
            pos += n
    return {key: Chunks(shapes[key], boxes) for key, boxes in parts.items()}


def optimizer_chunks(model: nn.Module, optimizer: torch.optim.Optimizer) -> StateChunks:
    """This rank's boxes of the optimizer state ("optim/<param>/<key>"), views of the live
    state; a fresh optimizer gets zero state first, so a checkpoint can be loaded into it."""
    if isinstance(optimizer, ShardedState):  # state in a layout of its own (plait.optim.sharded_state)
        return _piece_chunks(model, optimizer)
    with torch.no_grad():
        state = get_optimizer_state_dict(model, optimizer)  # initialises empty state
        return {
            f"optim/{name}/{key}": chunks_of(value)
            for name, param_state in state["state"].items() for key, value in param_state.items()
        }


def rng_chunks(rank: int) -> StateChunks:
    state = torch.get_rng_state()
    out = {f"rng/{rank}/cpu": Chunks(tuple(state.shape), [((0,), state)])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state = torch.cuda.get_rng_state()
        out[f"rng/{rank}/cuda"] = Chunks(tuple(state.shape), [((0,), state)])
    return out


def optimizer_groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The groups' hyperparameters (for the record: a resumed run takes them from its config)."""
    keep = ("lr", "betas", "eps", "weight_decay")
    return [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k in keep} for g in optimizer.param_groups]


# --- files -----------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def _single_process_quiet(distributed: bool) -> Iterator[None]:
    """DCP warns that it assumes one process whenever it runs without a process group; in a
    single-process run that is the intent."""
    with warnings.catch_warnings():
        if not distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _gather(obj: Any, group: dist.ProcessGroup | None, distributed: bool) -> list[Any]:
    if not distributed:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def complete_steps(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every renamed-into-place checkpoint, oldest first."""
    root = checkpoint_dir(run_dir)
    found = []
    for entry in root.glob("step_*") if root.is_dir() else []:
        if entry.is_dir() and ((entry / MANIFEST).is_file() or (entry / "state.json").is_file()):
            try:
                found.append((int(entry.name.split("_", 1)[1]), entry))
            except ValueError:
                continue
    return sorted(found)


def remove_unfinished(run_dir: Path) -> list[str]:
    """Delete the temporary directories of saves that never finished (call before any save
    starts); returns what was said about them."""
    root = checkpoint_dir(run_dir)
    said = []
    for tmp in sorted(root.glob(f"{TMP_PREFIX}*")) if root.is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)
        said.append(f"removed {tmp.name}: a checkpoint whose save did not finish (it was never used)")
    return said


def write_checkpoint(
    run_dir: Path, step: int, chunks: StateChunks, manifest: dict[str, Any], keep_last: int,
    group: dist.ProcessGroup | None = None, distributed: bool = False,
) -> Path:
    """Write `chunks` (every rank's own) and `manifest` (rank 0's) as `step_<step>`, atomically.
    A collective over `group` when `distributed`; returns the final directory."""
    rank = dist.get_rank(group) if distributed else 0
    root = checkpoint_dir(run_dir)
    final, tmp = root / f"step_{step}", root / f"{TMP_PREFIX}{step}"
    if rank == 0:
        if tmp.exists():  # left by a save that did not finish
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    if distributed:
        dist.barrier(group=group)
    with _single_process_quiet(distributed):
        dcp.save(chunks, storage_writer=JsonMetadataWriter(str(tmp), sync_files=True), planner=ChunkSavePlanner(),
                 process_group=group, no_dist=not distributed)
    # Each rank hashes the files it wrote; rank 0 also the metadata DCP's coordinator wrote.
    mine = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.glob(f"__{rank}_*"))}
    files = {name: info for part in _gather(mine, group, distributed) for name, info in part.items()}
    if rank == 0:
        meta = tmp / METADATA_FILE
        files[METADATA_FILE] = {"bytes": meta.stat().st_size, "sha256": _sha256(meta)}
        _write_json(tmp / MANIFEST, {"format": FORMAT_VERSION, "step": step, **manifest, "files": files})
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again after a resume: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / ".latest.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / "latest")
        _fsync_dir(root)
        # Only now, with a newer complete checkpoint on disk, may older ones go.
        for _, old in complete_steps(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    if distributed:
        dist.barrier(group=group)
    return final


class Checkpointer:
    """Saves during training, synchronously or in the background (`async_save`).

    Asynchronous saves copy the state to host memory on the caller's thread (the stall),
    then write from a thread over `group`, a process group used for nothing else, so the
    training's own collectives never interleave with the checkpoint's."""

    def __init__(self, run_dir: Path, keep_last: int, async_save: bool, distributed: bool, log: Callable[[str], None]) -> None:
        self.run_dir, self.keep_last, self.async_save = Path(run_dir), keep_last, async_save
        self.distributed = distributed
        # gloo: DCP's planning collectives exchange Python objects; a separate group also keeps
        # a background save off the training's NCCL communicator.
        self.group = dist.new_group(backend="gloo") if distributed else None
        self.log = log
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.stalls: list[float] = []  # seconds the training waited, per save

    def save(self, step: int, chunks: StateChunks, manifest: dict[str, Any]) -> None:
        start = time.perf_counter()
        self.wait()  # one save in flight
        if not self.async_save:
            write_checkpoint(self.run_dir, step, chunks, manifest, self.keep_last, self.group, self.distributed)
            self.stalls.append(time.perf_counter() - start)
            return
        staged = {key: c.staged() for key, c in chunks.items()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the pinned copies are complete before training changes the source

        def run() -> None:
            try:
                write_checkpoint(self.run_dir, step, staged, manifest, self.keep_last, self.group, self.distributed)
            except BaseException as err:  # reported by the next wait()
                self._error = err

        self._thread = threading.Thread(target=run, name=f"plait-save-{step}", daemon=True)
        self._thread.start()
        self.stalls.append(time.perf_counter() - start)

    def wait(self) -> None:
        """Block until the save in flight (if any) is on disk; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"saving a checkpoint failed: {err}") from err


# --- reading back ----------------------------------------------------------------------------

def read_manifest(path: Path) -> dict[str, Any]:
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.is_file():
        if (path / "state.json").is_file():
            raise CheckpointError(
                f"{path} was written by an older plait (whole-tensor safetensors, format 1), which this "
                "version does not read; resume it with the plait version that wrote it, or start a new run"
            )
        raise CheckpointError(f"{path} is not a plait checkpoint (no {MANIFEST})")
    try:
        data = json.loads(manifest.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{manifest} is not valid JSON ({err})") from None
    if data.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {data.get('format')!r}; this plait reads {FORMAT_VERSION}")
    return data


def check_files(path: Path, names: list[str], files: dict[str, dict[str, Any]], checksums: bool = True) -> str | None:
    """The first problem with `names` of a checkpoint's files (missing, wrong size or checksum)."""
    for name in names:
        f = Path(path) / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != files[name]["bytes"]:
            return f"{name} has {size} bytes, the manifest says {files[name]['bytes']} (truncated?)"
        if checksums and _sha256(f) != files[name]["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest (corrupted)"
    return None


def verify(path: Path, rank: int = 0, world_size: int = 1, group: dist.ProcessGroup | None = None) -> str | None:
    """Why the checkpoint at `path` is not intact, or None. Ranks share the hashing (a collective
    when world_size > 1: every rank gets the same answer)."""
    try:
        files = read_manifest(path)["files"]
        problem = None
    except CheckpointError as err:
        files, problem = {}, str(err)
    if problem is None:
        names = sorted(files)[rank::world_size]
        problem = check_files(path, names, files)
    problems = _gather(problem, group, world_size > 1)
    return next((p for p in problems if p is not None), None)


def find_intact(
    run_dir: Path, log: Callable[[str], None], rank: int = 0, world_size: int = 1, group: dist.ProcessGroup | None = None
) -> Path | None:
    """The newest checkpoint of `run_dir` that is intact; damaged newer ones are reported and
    skipped. Raises CheckpointError when there are checkpoints but none is intact."""
    damaged = []
    for step, path in reversed(complete_steps(run_dir)):
        problem = verify(path, rank, world_size, group)
        if problem is None:
            if damaged:
                log(f"resuming from {path.name}, the newest intact checkpoint (skipped: {'; '.join(damaged)})")
            return path
        damaged.append(f"{path.name}: {problem}")
        log(f"checkpoint {path} is damaged: {problem}; trying the previous one")
    if damaged:
        raise CheckpointError(
            f"no intact checkpoint in {checkpoint_dir(run_dir)} ({'; '.join(damaged)}); move the damaged "
            "ones away to start from scratch, or use a new --run.dir"
        )
    return None


def check_shapes(source: str, saved: dict[str, torch.Size], shapes: dict[str, torch.Size]) -> None:
    """Refuse, naming the parameters, weights from `source` whose names or shapes differ from the
    model's `shapes` (a checkpoint, or an imported Hugging Face directory)."""
    missing = sorted(set(shapes) - set(saved))
    unexpected = sorted(set(saved) - set(shapes))
    wrong = [f"{n} {tuple(saved[n])} vs {tuple(shapes[n])}" for n in shapes if n in saved and saved[n] != shapes[n]]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{source} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"shapes {wrong[:3]}); was it saved with a different model.* config?"
        )


def check_model_shapes(path: Path, shapes: dict[str, torch.Size]) -> None:
    """Refuse, with names, a checkpoint whose parameters do not match the model's."""
    saved = {k[len("model/"):]: torch.Size(v["size"]) for k, v in read_metadata_json(path)["tensors"].items() if k.startswith("model/")}
    check_shapes(f"checkpoint {path}", saved, shapes)


def load_chunks(path: Path, chunks: StateChunks, group: dist.ProcessGroup | None, distributed: bool) -> None:
    with _single_process_quiet(distributed):
        dcp.load(chunks, storage_reader=JsonMetadataReader(str(path)), planner=ChunkLoadPlanner(),
                 process_group=group, no_dist=not distributed)


def restore(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, shapes: dict[str, torch.Size],
    rank: int, group: dist.ProcessGroup | None, distributed: bool,
) -> dict[str, Any]:
    """Load the checkpoint at `path` into this layout's model and optimizer (in place) and the
    RNG; return its manifest. `shapes` are the unsharded model's."""
    manifest = read_manifest(path)
    check_model_shapes(path, shapes)
    chunks = model_chunks(model)
    if manifest.get("weights_only"):
        # An imported model (`plait convert --from-hf`): optimizer, RNG and data start fresh.
        load_chunks(path, chunks, group, distributed)
        return manifest
    chunks.update(optimizer_chunks(model, optimizer))
    saved = read_metadata_json(path)["tensors"]
    saved_world = int(manifest.get("world_size", 1))
    source = rank if rank < saved_world else 0  # another world size: every rank takes rank 0's stream
    rng = {key.replace(f"rng/{rank}/", f"rng/{source}/"): c for key, c in rng_chunks(rank).items()}
    chunks.update({k: c for k, c in rng.items() if k in saved})
    load_chunks(path, chunks, group, distributed)
    if f"rng/{source}/cpu" in chunks:
        torch.set_rng_state(chunks[f"rng/{source}/cpu"].parts[0][1])
    if f"rng/{source}/cuda" in chunks:
        torch.cuda.set_rng_state(chunks[f"rng/{source}/cuda"].parts[0][1])
    return manifest
