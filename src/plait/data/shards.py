"""Pre-tokenized binary shards: what `plait prepare` writes and what every corpus is cached as.

A prepared directory holds `train_000000.bin, ...` and `val_000000.bin, ...` (raw little-endian
uint16, or uint32 for vocabularies above 65535; every document followed by the tokenizer's
`eos_id`), the tokenizer itself, and `meta.json` describing all of it. It appears under its final
name only once complete, so an interrupted prepare never leaves a directory that looks finished.
`open_split` memory-maps the shards of a split as one read-only token sequence.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from plait.config import ConfigError, DataSection
from plait.data.corpus import Corpus, Split, corpus_identity, is_prepared_dir, open_corpus, resolve_cache_dir
from plait.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, pack_batch, save_tokenizer, tokenizer_fingerprint

FORMAT = "plait-shards"
FORMAT_VERSION = 1
META = "meta.json"
SPLITS: tuple[Split, ...] = ("train", "val")
# 128M tokens: 256 MB per uint16 shard, few enough files for any corpus that fits on one disk.
DEFAULT_SHARD_TOKENS = 1 << 27


def shard_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


class _ShardWriter:
    """Appends tokens to `<split>_NNNNNN.bin` files of at most `shard_tokens` tokens each."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file: Any = None
        self._hash: Any = None
        self._count = 0

    def _open_next(self) -> None:
        name = f"{self.split}_{len(self.shards):06d}.bin"
        self._file = open(self.directory / name, "wb")
        self._hash = hashlib.blake2b(digest_size=16)
        self._count = 0
        self.shards.append({"file": name, "tokens": 0, "blake2b": ""})

    def _finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self.shards[-1].update(tokens=self._count, blake2b=self._hash.hexdigest())
            self._file = None

    def write(self, tokens: np.ndarray) -> None:
        data = tokens.astype(self.dtype, copy=False)
        while data.size:
            if self._file is None or self._count == self.shard_tokens:
                self._finish()
                self._open_next()
            take = min(self.shard_tokens - self._count, data.size)
            chunk = data[:take].tobytes()
            self._file.write(chunk)
            self._hash.update(chunk)
            self._count += take
            data = data[take:]

    def close(self) -> list[dict[str, Any]]:
        self._finish()
        return self.shards


def _write_split(corpus: Corpus, split: Split, tok: Tokenizer, directory: Path, dtype: np.dtype, shard_tokens: int) -> dict[str, Any]:
    writer = _ShardWriter(directory, split, dtype, shard_tokens)
    docs = 0
    try:
        for texts in corpus.iter_text_batches(split):
            tokens = pack_batch(tok, texts)
            if tokens.size and (tokens.min() < 0 or tokens.max() >= tok.vocab_size):
                raise ValueError(f"tokenizer {tok.name} produced ids outside [0, {tok.vocab_size})")
            writer.write(tokens)
            docs += len(texts)
    finally:
        shards = writer.close()
    return {"documents": docs, "tokens": sum(s["tokens"] for s in shards), "shards": shards}


def prepare_corpus(
    data_cfg: DataSection,
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike[str],
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    *,
    overwrite: bool = False,
    exist_ok: bool = False,
    corpus: Corpus | None = None,
) -> dict[str, Any]:
    """Tokenize both splits of `data.corpus` into `out_dir`; return the meta.json contents.

    A non-empty `out_dir` is an error unless `overwrite` (replace it) or, when it is already a
    complete prepared directory, `exist_ok` (keep it: another process of the same cache won).
    """
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    out = Path(out_dir).expanduser()
    if exist_ok and (out / META).is_file():
        return read_meta(out)
    if out.exists() and not overwrite and any(out.iterdir()):
        raise ConfigError(
            f"output directory {str(out)!r} exists and is not empty; choose a new directory or overwrite it"
        )
    corpus = corpus if corpus is not None else open_corpus(data_cfg)
    dtype = shard_dtype(tokenizer.vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        splits = {s: _write_split(corpus, s, tokenizer, tmp, dtype, shard_tokens) for s in SPLITS}
        meta: dict[str, Any] = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "tokenizer": {
                "name": tokenizer.name,
                "vocab_size": tokenizer.vocab_size,
                "eos_id": tokenizer.eos_id,
                "fingerprint": tokenizer_fingerprint(tokenizer),
            },
            "dtype": dtype.name,
            "corpus": corpus.description,
            "corpus_identity": corpus.identity,
            "val_fraction": data_cfg.val_fraction,
            "text_field": data_cfg.text_field,
            "splits": splits,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if isinstance(tokenizer, (ByteTokenizer, HFTokenizer)):
            # Self-contained: `data.corpus = <this dir>` with `data.tokenizer = "bpe"` loads it back.
            save_tokenizer(tokenizer, tmp)
        # meta.json last: its presence is what marks a directory as complete.
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _publish(tmp, out, overwrite, exist_ok)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return read_meta(out)


def _publish(tmp: Path, out: Path, overwrite: bool, exist_ok: bool) -> None:
    """Rename the finished temp dir to `out` (atomic on one filesystem)."""
    if out.exists():
        if exist_ok and (out / META).is_file():
            return  # a concurrent prepare of the same cache entry won; its result is equivalent
        if not overwrite and any(out.iterdir()):
            raise ConfigError(f"output directory {str(out)!r} appeared while preparing; choose a new directory")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, out)
    except OSError:
        if not (exist_ok and (out / META).is_file()):
            raise


def read_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(directory) / META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{str(path)!r} is missing or unreadable ({exc}); re-run `plait prepare`") from exc
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ConfigError(
            f"{str(path)!r} is format {meta.get('format')!r} v{meta.get('version')}, this plait reads "
            f"{FORMAT!r} v{FORMAT_VERSION}; re-run `plait prepare` with this version"
        )
    return meta


class TokenArray:
    """Several 1-D token arrays (memory-mapped shards) seen as one sequence of int64 tokens."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self._arrays = [a for a in arrays if len(a)]
        self._starts = [0]
        for a in self._arrays:
            self._starts.append(self._starts[-1] + len(a))

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def num_shards(self) -> int:
        return len(self._arrays)

    def __getitem__(self, key: int | slice) -> Any:
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                raise ValueError("TokenArray slices must have step 1")
            return self._range(start, max(start, stop))
        i = int(key)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"token index {key} out of range for {n} tokens")
        s = bisect.bisect_right(self._starts, i) - 1
        return int(self._arrays[s][i - self._starts[s]])

    def _range(self, start: int, stop: int) -> np.ndarray:
        out = np.empty(stop - start, dtype=np.int64)
        s = max(bisect.bisect_right(self._starts, start) - 1, 0)
        pos = start
        while pos < stop:
            a0 = self._starts[s]
            take = min(stop, self._starts[s + 1]) - pos
            out[pos - start : pos - start + take] = self._arrays[s][pos - a0 : pos - a0 + take]
            pos += take
            s += 1
        return out

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Rows `self[s : s + length]` for each `s` in `starts`, as an int64 (n, length) array."""
        starts = np.asarray(starts, dtype=np.int64)
        out = np.empty((len(starts), length), dtype=np.int64)
        if len(starts) == 0:
            return out
        if len(starts) and (starts.min() < 0 or starts.max() + length > len(self)):
            raise IndexError("window out of range")
        offsets = np.arange(length, dtype=np.int64)
        shard = np.searchsorted(np.asarray(self._starts), starts, side="right") - 1
        done = np.zeros(len(starts), dtype=bool)
        for s, arr in enumerate(self._arrays):
            # One fancy-index gather for all windows lying inside shard s.
            inside = (shard == s) & (starts + length <= self._starts[s + 1])
            if inside.any():
                out[inside] = arr[(starts[inside] - self._starts[s])[:, None] + offsets]
                done |= inside
        for row in np.flatnonzero(~done):  # the rare windows that cross a shard boundary
            out[row] = self._range(int(starts[row]), int(starts[row]) + length)
        return out


def open_split(directory: str | os.PathLike[str], split: Split) -> TokenArray:
    """Memory-map the shards of `split` ("train" or "val") of a prepared directory."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    d = Path(directory)
    meta = read_meta(d)
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    arrays: list[np.ndarray] = []
    for shard in meta["splits"][split]["shards"]:
        path = d / shard["file"]
        expected = shard["tokens"] * dtype.itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise ConfigError(
                f"shard {str(path)!r} is missing or not {expected} bytes; the prepared directory is "
                "damaged, re-run `plait prepare` (or delete it from the cache)"
            )
        if shard["tokens"]:
            arrays.append(np.memmap(path, dtype=dtype, mode="r"))
    return TokenArray(arrays)


def verify_shards(directory: str | os.PathLike[str]) -> None:
    """Re-hash every shard against meta.json (reads all data; for `plait prepare --verify` etc.)."""
    d = Path(directory)
    for split in read_meta(d)["splits"].values():
        for shard in split["shards"]:
            h = hashlib.blake2b(digest_size=16)
            with open(d / shard["file"], "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
            if h.hexdigest() != shard["blake2b"]:
                raise ConfigError(f"shard {str(d / shard['file'])!r} fails its checksum; re-run `plait prepare`")


def check_tokenizer_matches(meta: dict[str, Any], tokenizer: Tokenizer, where: str) -> None:
    """A prepared directory is only usable with the tokenizer that made it."""
    want = meta["tokenizer"]
    same = want["name"] == tokenizer.name or want.get("fingerprint") == tokenizer_fingerprint(tokenizer)
    if not same or want["vocab_size"] != tokenizer.vocab_size or want["eos_id"] != tokenizer.eos_id:
        raise ConfigError(
            f"data.corpus = {where!r} was prepared with tokenizer {want['name']!r} (vocab "
            f"{want['vocab_size']}), but data.tokenizer gives {tokenizer.name!r} (vocab "
            f"{tokenizer.vocab_size}); set data.tokenizer to match, or prepare the corpus again"
        )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:40] or "corpus"


def cached_tokens(data_cfg: DataSection, tokenizer: Tokenizer) -> Path:
    """The prepared directory for this corpus and tokenizer, tokenizing on first use."""
    if is_prepared_dir(data_cfg.corpus):
        path = Path(data_cfg.corpus).expanduser()
        check_tokenizer_matches(read_meta(path), tokenizer, data_cfg.corpus)
        return path
    identity = corpus_identity(data_cfg)
    key_src = "|".join(
        [
            f"v{FORMAT_VERSION}",
            identity,
            tokenizer.name,
            str(tokenizer.vocab_size),
            str(tokenizer.eos_id),
            tokenizer_fingerprint(tokenizer),
            repr(data_cfg.val_fraction),
            data_cfg.text_field,
        ]
    )
    key = hashlib.blake2b(key_src.encode(), digest_size=8).hexdigest()
    name = "stdlib" if data_cfg.corpus == "stdlib" else Path(data_cfg.corpus).name
    cache = resolve_cache_dir(data_cfg)
    out = cache / "tokens" / f"{_slug(name)}-{_slug(tokenizer.name.split(':')[0])}-{key}"
    if (out / META).is_file():
        return out
    prepare_corpus(data_cfg, tokenizer, out, corpus=open_corpus(data_cfg, cache), exist_ok=True)
    return out
