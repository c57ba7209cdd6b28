"""PyTorch Distributed Checkpoint (DCP) with plain-data metadata and any per-rank chunking.

Every rank hands DCP the pieces of each tensor it holds, as `Chunks`: the tensor's whole
(global) shape and a list of boxes (offsets, local tensor). DCP writes each box once (replicas
are de-duplicated), records where every box lives, and on loading reads, for each box a rank
asks for, the overlapping parts of whatever boxes were saved: that is the resharding. A DTensor
(FSDP, tensor or expert parallel) is one box; a plain tensor is one box at offset zero; ZeRO-1's
flat slices are several boxes (`flat_boxes`), which DTensor cannot describe.

Two things differ from DCP's defaults, both for safety and portability:
- The metadata is JSON (`.metadata.json`), not a pickle: loading a checkpoint unpickles nothing
  but tensors, which DCP reads with `torch.load(weights_only=True)`.
- The state is tensors only. Step, loader position, config and checksums go into plait's own
  `manifest.json` (see `plait.checkpoint.sharded`).

`read_whole_tensor` assembles one saved tensor from its boxes without any process group, for
export and single-process loading.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.distributed.tensor import DTensor

METADATA_FILE = ".metadata.json"

Box = tuple[tuple[int, ...], torch.Tensor]  # (global offsets, the local tensor of that box)


class Chunks:
    """The boxes of a tensor of `shape` that this rank holds (`parts`: offsets, local tensor).

    DCP's save and load planners ask an object for its write items, its chunk list and the
    tensor behind a chunk (the methods below, the protocol DTensor implements for DCP).
    Loading copies into the parts' tensors in place, so parts that are views of live
    parameters or optimizer state restore them directly."""

    def __init__(self, shape: Sequence[int], parts: list[Box]) -> None:
        self.shape = torch.Size(shape)
        self.parts = [(tuple(int(o) for o in off), t) for off, t in parts if t.numel() > 0]

    def size(self) -> torch.Size:
        return self.shape

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [
            WriteItem(
                index=MetadataIndex(fqn, off),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(off), sizes=t.shape),
                    properties=TensorProperties.create_from_tensor(t),
                    size=self.shape,
                ),
            )
            for off, t in self.parts
        ]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=torch.Size(off), sizes=t.shape) for off, t in self.parts]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        want = tuple(index.offset) if index.offset is not None else (0,) * len(self.shape)
        for off, t in self.parts:
            if off == want:
                return t
        raise ValueError(f"{index.fqn}: this rank holds no box at offset {want}")

    def staged(self) -> Chunks:
        """A copy in host memory (pinned when the source is on a GPU), for a background write."""
        copies = []
        for off, t in self.parts:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
            host.copy_(t.detach(), non_blocking=t.is_cuda)
            copies.append((off, host))
        return Chunks(self.shape, copies)


def chunks_of(t: torch.Tensor) -> Chunks:
    """A DTensor's local shard at its global offset, or a whole plain tensor at zero."""
    if isinstance(t, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return Chunks(t.shape, [(tuple(offsets), t.to_local())])
    return Chunks(t.shape, [((0,) * t.dim(), t)])


def flat_boxes(shape: Sequence[int], start: int, end: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Elements [start, end) of a row-major tensor of `shape` as boxes (offsets, sizes), in
    order; each box is itself a contiguous run of those elements, so consecutive slices of a
    flat buffer reshape into them."""
    shape = tuple(shape)
    if start >= end:
        return []
    if len(shape) <= 1:
        return [((start,), (end - start,))] if shape else [((), ())]
    inner = math.prod(shape[1:])

    def in_row(row: int, a: int, b: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        return [((row, *off), (1, *size)) for off, size in flat_boxes(shape[1:], a, b)]

    first, a = divmod(start, inner)
    last, b = divmod(end, inner)
    if first == last:
        return in_row(first, a, b)
    boxes = []
    if a:
        boxes += in_row(first, a, inner)
        first += 1
    if last > first:
        boxes.append(((first, *(0,) * (len(shape) - 1)), (last - first, *shape[1:])))
    if b:
        boxes += in_row(last, 0, b)
    return boxes


def _lookup(state_dict: dict[str, Any], index: MetadataIndex) -> torch.Tensor:
    obj = state_dict.get(index.fqn)
    if not isinstance(obj, Chunks):
        raise ValueError(f"checkpoint entry {index.fqn!r} is not plait Chunks ({type(obj).__name__})")
    return obj.__get_tensor_shard__(index)


class ChunkSavePlanner(DefaultSavePlanner):
    """DCP's save planner for a flat dict of `Chunks` (de-duplicating replicated boxes)."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def lookup_object(self, index: MetadataIndex) -> Any:
        return _lookup(self.state_dict, index)


class ChunkLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner for a flat dict of `Chunks`: reads overlaps into the parts in place."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict: dict[str, Any], metadata: Metadata | None = None, is_coordinator: bool = False) -> None:
        # The default one first walks the state for meta-device tensors and replaces every value
        # of a type it does not know (ours) with None; plait's state is never on the meta device.
        self.original_state_dict = self.state_dict = state_dict
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return _lookup(self.state_dict, index)


# --- metadata as JSON ------------------------------------------------------------------------

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in checkpoint metadata")
    return dtype


def metadata_to_json(md: Metadata) -> dict[str, Any]:
    tensors = {}
    for fqn, entry in md.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise TypeError(f"checkpoint entry {fqn!r} is not a tensor; plait checkpoints hold tensors only")
        tensors[fqn] = {
            "dtype": _dtype_name(entry.properties.dtype),
            "size": list(entry.size),
            "chunks": [[list(c.offsets), list(c.sizes)] for c in entry.chunks],
        }
    storage = [
        {"fqn": index.fqn, "offset": list(index.offset) if index.offset is not None else None,
         "file": info.relative_path, "start": info.offset, "length": info.length,
         "transforms": list(info.transform_descriptors or [])}
        for index, info in (md.storage_data or {}).items()
    ]
    return {"version": md.version, "tensors": tensors, "storage": storage}


def metadata_from_json(data: dict[str, Any]) -> Metadata:
    tensors = {
        fqn: TensorStorageMetadata(
            properties=TensorProperties(dtype=_dtype(entry["dtype"])),
            size=torch.Size(entry["size"]),
            chunks=[ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s)) for o, s in entry["chunks"]],
        )
        for fqn, entry in data["tensors"].items()
    }
    storage = {
        MetadataIndex(s["fqn"], s["offset"]): _StorageInfo(s["file"], s["start"], s["length"], s["transforms"] or None)
        for s in data["storage"]
    }
    return Metadata(state_dict_metadata=tensors, storage_data=storage, version=data.get("version"))


def read_metadata_json(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / METADATA_FILE).read_text())


class JsonMetadataWriter(FileSystemWriter):
    """DCP's file writer (one file per rank, fsynced), with the metadata written as JSON."""

    def finish(self, metadata: Metadata, results: list[list[Any]]) -> None:
        metadata.storage_data = {wr.index: wr.storage_data for wr_list in results for wr in wr_list}
        path = Path(self.path) / METADATA_FILE
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(metadata_to_json(metadata), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


class JsonMetadataReader(FileSystemReader):
    """DCP's file reader, taking the metadata from JSON (tensors are read weights-only)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        md = metadata_from_json(read_metadata_json(Path(self.path)))
        md.storage_meta = StorageMeta(load_id=getattr(self, "load_id", None))
        return md


def _load_box(path: Path, entry: dict[str, Any]) -> torch.Tensor:
    if entry["transforms"]:
        raise ValueError(f"{entry['fqn']}: stored with transforms {entry['transforms']}, which plait does not write")
    with open(Path(path) / entry["file"], "rb") as f:
        # Read straight from the file (no copy of the box's bytes in memory first).
        return torch.load(_FileSlice(f, entry["start"], entry["length"]), map_location="cpu", weights_only=True)


class _FileSlice(io.RawIOBase):
    """Bytes [start, start + length) of an open binary file, as a seekable file of their own."""

    def __init__(self, f: Any, start: int, length: int) -> None:
        self._f, self._start, self._length, self._pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self._length - self._pos))
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(buffer)[:n])
        self._pos += got
        return got


def read_whole_tensors(path: Path, keys: list[str] | None = None, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(key without prefix, whole tensor) for the saved entries under `prefix` (or `keys`), one
    tensor assembled in memory at a time from its boxes; no process group needed."""
    md = read_metadata_json(path)
    by_key: dict[str, list[dict[str, Any]]] = {}
    for s in md["storage"]:
        by_key.setdefault(s["fqn"], []).append(s)
    wanted = keys if keys is not None else [k for k in md["tensors"] if k.startswith(prefix)]
    for key in wanted:
        info = md["tensors"][key]
        boxes = by_key.get(key, [])
        if len(boxes) == 1:  # saved whole (one rank, or replicated): no second copy
            box = _load_box(path, boxes[0])
            if list(box.shape) == list(info["size"]):
                yield key[len(prefix):], box
                continue
            del box
        whole = torch.empty(info["size"], dtype=_dtype(info["dtype"]))
        covered = 0
        for s in boxes:
            box = _load_box(path, s)
            offset = s["offset"] or [0] * whole.dim()
            view = whole
            for dim, (o, n) in enumerate(zip(offset, box.shape)):
                view = view.narrow(dim, o, n)
            view.copy_(box)
            covered += box.numel()
        if covered != whole.numel():
            raise ValueError(f"{path}: {key} has {covered} of {whole.numel()} elements saved")
        yield key[len(prefix):], whole
