"""Documents: where text comes from, and which documents are held out for validation.

A corpus is an ordered list of named documents: the running Python's standard library source
(`stdlib`), one text file, a folder of text files, or the records of a JSONL/JSON/parquet file.
Each document goes to the train or the validation split by a stable hash of its name, so the
split never depends on the order files are listed in, the machine, or the Python hash seed.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from plait.config import ConfigError, DataSection

Split = Literal["train", "val"]

RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
# Skipped in folders without reading them; anything else is sniffed for NUL bytes.
_BINARY_SUFFIXES = frozenset(
    ".gz .bz2 .xz .zst .zip .tar .7z .png .jpg .jpeg .gif .bmp .ico .webp .pdf .bin .npy .npz "
    ".pt .pth .safetensors .parquet .arrow .pyc .pyo .so .dll .dylib .exe .o .a .whl .db "
    ".sqlite .mp3 .mp4 .wav .ogg .woff .woff2 .ttf .otf".split()
)
_SNIFF_BYTES = 8192
_EXCLUDED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stable_unit_hash(name: str) -> float:
    """Map a document name to [0, 1), the same on every machine and Python version."""
    digest = hashlib.blake2b(name.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def split_documents(names: list[str], val_fraction: float) -> list[bool]:
    """Return, per document, whether it belongs to the validation split.

    A document is held out when its hash is below `val_fraction`. With a positive fraction and at
    least two documents the validation split is never empty (the lowest-hash document moves
    there) and the train split is never empty (the highest-hash held-out document moves back).
    """
    hashes = [stable_unit_hash(n) for n in names]
    is_val = [h < val_fraction for h in hashes]
    if val_fraction > 0 and len(names) >= 2 and not any(is_val):
        is_val[min(range(len(names)), key=hashes.__getitem__)] = True
    if is_val and all(is_val):
        is_val[max(range(len(names)), key=hashes.__getitem__)] = False
    return is_val


def resolve_cache_dir(data_cfg: DataSection) -> Path:
    """`data.cache_dir`, else $PLAIT_CACHE, else ~/.cache/plait."""
    raw = data_cfg.cache_dir or os.environ.get("PLAIT_CACHE", "") or "~/.cache/plait"
    return Path(raw).expanduser()


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _hash_lines(lines: list[str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for line in lines:
        h.update(line.encode("utf-8", errors="surrogatepass") + b"\n")
    return h.hexdigest()


def _list_stdlib(root: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Installed third-party packages are not the standard library and differ per machine.
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_STDLIB_DIRS]
        found.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _list_folder(root: Path) -> list[Path]:
    """Every non-hidden file under `root`, sorted by relative path (not yet sniffed for binary)."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        for f in filenames:
            if not f.startswith(".") and Path(f).suffix.lower() not in _BINARY_SUFFIXES:
                found.append(Path(dirpath, f))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _looks_like_text(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError:
        return False
    return b"\0" not in head


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def _corpus_path(data_cfg: DataSection) -> Path:
    path = Path(data_cfg.corpus).expanduser()
    if not path.exists():
        raise ConfigError(
            f"data.corpus = {data_cfg.corpus!r} does not exist; give 'stdlib', a text file, a folder "
            "of text files, a .jsonl/.json/.parquet file, or a directory written by `plait prepare`"
        )
    return path


def is_prepared_dir(corpus: str) -> bool:
    """Whether `corpus` names a directory written by `plait prepare`."""
    if corpus == "stdlib":
        return False
    path = Path(corpus).expanduser()
    return path.is_dir() and (path / "meta.json").is_file()


def _stat_line(path: Path, root: Path) -> str:
    st = path.stat()
    return f"{path.relative_to(root).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}"


def corpus_identity(data_cfg: DataSection) -> str:
    """A string that changes whenever the corpus's documents may have changed.

    Cheap: it lists and stats files but reads none, so a cache hit costs milliseconds.
    """
    if data_cfg.corpus == "stdlib":
        root = stdlib_root()
        files = _list_stdlib(root)
        # Sizes, not mtimes: two installs of the same Python share the cache; a patched one does not.
        lines = [f"{p.relative_to(root).as_posix()}\t{p.stat().st_size}" for p in files]
        impl = sys.implementation.name
        return f"stdlib|{impl}-{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}|{_hash_lines(lines)}"
    path = _corpus_path(data_cfg).resolve()
    if path.is_file():
        kind = "records" if path.suffix.lower() in RECORD_SUFFIXES else "file"
        extra = f"|field={data_cfg.text_field}" if kind == "records" else ""
        return f"{kind}|{path}|{_hash_lines([_stat_line(path, path.parent)])}{extra}"
    lines = [_stat_line(p, path) for p in _list_folder(path)]
    return f"folder|{path}|{_hash_lines(lines)}"


@dataclass
class Corpus:
    """An ordered list of named documents and their train/validation assignment."""

    kind: Literal["stdlib", "file", "folder", "records"]
    description: str
    identity: str
    names: list[str]
    is_val: list[bool]
    # stdlib/file/folder: one path per document. records: an Arrow column of texts.
    paths: list[Path] = field(default_factory=list)
    column: Any = None
    # A single-document corpus is cut in two so that it still has a validation split.
    val_fraction: float = 0.0

    def __len__(self) -> int:
        return len(self.names)

    def split_names(self, split: Split) -> list[str]:
        want = split == "val"
        if self._single_cut():
            return [f"{self.names[0]}#{split}"]
        return [n for n, v in zip(self.names, self.is_val) if v == want]

    def _single_cut(self) -> bool:
        return len(self.names) == 1 and self.val_fraction > 0

    def _text(self, index: int) -> str:
        if self.column is not None:
            value = self.column[index].as_py()
            return "" if value is None else value
        return _read_text(self.paths[index])

    def iter_documents(self, split: Split) -> Iterator[tuple[str, str]]:
        """Yield `(name, text)` for every document of `split`, in corpus order."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        if self._single_cut():
            yield from self._iter_single_cut(split)
            return
        want = split == "val"
        if self.column is not None:
            # Chunk by chunk: indexing an Arrow column one row at a time is slow on big files.
            i = 0
            for chunk in self.column.chunks:
                for value in chunk.to_pylist():
                    if self.is_val[i] == want:
                        yield self.names[i], "" if value is None else value
                    i += 1
            return
        for i, (name, v) in enumerate(zip(self.names, self.is_val)):
            if v == want:
                yield name, self._text(i)

    def iter_text_batches(self, split: Split, max_chars: int = 4 << 20, max_docs: int = 1024) -> Iterator[list[str]]:
        """Documents of `split` grouped into batches bounded by characters and count."""
        batch: list[str] = []
        chars = 0
        for _, text in self.iter_documents(split):
            batch.append(text)
            chars += len(text)
            if chars >= max_chars or len(batch) >= max_docs:
                yield batch
                batch, chars = [], 0
        if batch:
            yield batch

    def _iter_single_cut(self, split: Split) -> Iterator[tuple[str, str]]:
        # The tail `val_fraction` of the text, cut at a line start, is the validation document.
        text = self._text(0)
        cut = int(len(text) * (1.0 - self.val_fraction))
        newline = text.rfind("\n", 0, cut)
        if newline > 0:
            cut = newline + 1
        part = text[cut:] if split == "val" else text[:cut]
        if part:
            yield f"{self.names[0]}#{split}", part


def _load_records(path: Path, text_field: str, cache_dir: Path) -> tuple[Any, int]:
    """Read a JSONL/JSON/parquet file with Hugging Face `datasets`; return (text column, rows)."""
    import datasets  # slow to import; only record corpora need it
    import pyarrow as pa

    builder = "parquet" if path.suffix.lower() == ".parquet" else "json"
    bars_were_on = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        ds = datasets.load_dataset(
            builder, data_files=str(path), split="train", cache_dir=str(cache_dir / "hf-datasets")
        )
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad input file
        raise ConfigError(
            f"data.corpus = {str(path)!r} could not be read as {builder} records: {exc}; "
            f"give one record per line (JSONL) or a parquet file with a text field"
        ) from exc
    finally:
        if bars_were_on:
            datasets.utils.logging.enable_progress_bar()
    if text_field not in ds.column_names:
        raise ConfigError(
            f"data.text_field = {text_field!r} is not a field of the records in {path}; they have "
            f"{ds.column_names}; set data.text_field to the one holding the text"
        )
    column = ds.data.column(text_field)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise ConfigError(
            f"data.text_field = {text_field!r} holds {column.type} values in {path}, not text; "
            f"set data.text_field to a field of strings (fields: {ds.column_names})"
        )
    return column, len(ds)


def open_corpus(data_cfg: DataSection, cache_dir: Path | None = None) -> Corpus:
    """List the documents of `data.corpus` and assign each to a split."""
    if is_prepared_dir(data_cfg.corpus):
        raise ConfigError(
            f"data.corpus = {data_cfg.corpus!r} is a directory written by `plait prepare`; it holds "
            "tokens, not documents. Point data.corpus at the original text to re-tokenize it"
        )
    identity = corpus_identity(data_cfg)
    vf = data_cfg.val_fraction
    if data_cfg.corpus == "stdlib":
        root = stdlib_root()
        paths = _list_stdlib(root)
        names = [p.relative_to(root).as_posix() for p in paths]
        desc = f"stdlib: Python {sys.version.split()[0]} standard library, {len(paths)} .py files"
        return Corpus("stdlib", desc, identity, names, split_documents(names, vf), paths=paths, val_fraction=vf)
    path = _corpus_path(data_cfg).resolve()
    if path.is_file() and path.suffix.lower() in RECORD_SUFFIXES:
        cache = cache_dir if cache_dir is not None else resolve_cache_dir(data_cfg)
        column, rows = _load_records(path, data_cfg.text_field, cache)
        if rows == 0:
            raise ConfigError(f"data.corpus = {str(path)!r} has no records; give a file with at least one")
        names = [f"{path.name}:{i}" for i in range(rows)]
        desc = f"records: {path} ({rows} records, field {data_cfg.text_field!r})"
        return Corpus("records", desc, identity, names, split_documents(names, vf), column=column, val_fraction=vf)
    if path.is_file():
        return Corpus("file", f"file: {path}", identity, [path.name], [False], paths=[path], val_fraction=vf)
    paths = [p for p in _list_folder(path) if _looks_like_text(p)]
    if not paths:
        raise ConfigError(
            f"data.corpus = {data_cfg.corpus!r} is a folder without text files; put text files in it "
            "(binary and hidden files are skipped)"
        )
    names = [p.relative_to(path).as_posix() for p in paths]
    desc = f"folder: {path} ({len(paths)} files)"
    return Corpus("folder", desc, identity, names, split_documents(names, vf), paths=paths, val_fraction=vf)


def iter_documents(data_cfg: DataSection, split: Split) -> Iterator[tuple[str, str]]:
    """Yield `(name, text)` for each document of `split` of `data.corpus`."""
    yield from open_corpus(data_cfg).iter_documents(split)
