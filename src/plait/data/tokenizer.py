"""Tokenizers behind one small interface: bytes, a BPE trained on the corpus, or a tokenizer.json.

`build_tokenizer` turns `data.tokenizer` into a `Tokenizer`; `save_tokenizer` / `load_tokenizer_dir`
store one in a run (or prepared) directory so generation later decodes with the exact same one.
Every tokenizer also has a `fingerprint` (a hash of its full definition) that caches key on, and a
`pack_batch` fast path that `plait.data.shards` uses to tokenize many documents at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from plait.config import ConfigError, DataSection
from plait.data.corpus import corpus_identity, is_prepared_dir, open_corpus, resolve_cache_dir

if TYPE_CHECKING:
    import tokenizers

EOT = "<|endoftext|>"
EOS_CANDIDATES = (EOT, "</s>", "<|end_of_text|>", "<eos>")
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "tokenizer_meta.json"


@runtime_checkable
class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int  # document separator used when packing

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """What caches key on: the full definition when known, else the name."""
    return str(getattr(tok, "fingerprint", tok.name))


def pack_batch(tok: Tokenizer, texts: list[str]) -> np.ndarray:
    """Tokens of every text, each followed by `eos_id`, as one int64 array."""
    fast = getattr(tok, "pack_batch", None)
    if fast is not None:
        return fast(texts)
    parts: list[int] = []
    for ids in tok.encode_batch(texts):
        parts.extend(ids)
        parts.append(tok.eos_id)
    return np.asarray(parts, dtype=np.int64)


class ByteTokenizer:
    """UTF-8 bytes as tokens. NUL (id 0) separates documents and is stripped from the input."""

    name = "byte"
    vocab_size = 256
    eos_id = 0
    fingerprint = "byte-v1"

    @staticmethod
    def _bytes(text: str) -> bytes:
        # NUL never occurs in source code; removing it keeps the separator unambiguous.
        return text.encode("utf-8", errors="replace").replace(b"\0", b"")

    def encode(self, text: str) -> list[int]:
        return list(self._bytes(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(self._bytes(t)) for t in texts]

    def pack_batch(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0, dtype=np.int64)
        joined = b"\0".join(self._bytes(t) for t in texts) + b"\0"
        return np.frombuffer(joined, dtype=np.uint8).astype(np.int64)

    def decode(self, ids: list[int]) -> str:
        # A model with a padded vocabulary can sample ids >= 256; they carry no bytes.
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` (trained BPE or a tokenizer.json file)."""

    def __init__(self, tok: "tokenizers.Tokenizer", name: str, eos_token: str | None = None, source: str = "") -> None:
        self.fingerprint = "hf-" + hashlib.blake2b(tok.to_str().encode(), digest_size=16).hexdigest()
        # Corpus text that happens to contain "<|endoftext|>" must stay text, not become a separator.
        tok.encode_special_tokens = True
        self._tok = tok
        self.name = name
        vocab = tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        where = source or name
        if eos_token is None:
            eos_token = next((t for t in EOS_CANDIDATES if t in vocab), None)
            if eos_token is None:
                raise ConfigError(
                    f"data.tokenizer = {where!r} has none of the end-of-text tokens {list(EOS_CANDIDATES)}; "
                    "add one as a special token or use data.tokenizer = 'bpe'"
                )
        elif eos_token not in vocab:
            raise ConfigError(f"data.tokenizer = {where!r} lacks its end-of-text token {eos_token!r}")
        self.eos_token = eos_token
        self.eos_id = int(vocab[eos_token])
        self._batch = getattr(tok, "encode_batch_fast", tok.encode_batch)

    @property
    def hf(self) -> "tokenizers.Tokenizer":
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._batch(texts, add_special_tokens=False)]

    def pack_batch(self, texts: list[str]) -> np.ndarray:
        encodings = self._batch(texts, add_special_tokens=False)
        sizes = np.fromiter((len(e.ids) + 1 for e in encodings), dtype=np.int64, count=len(encodings))
        out = np.full(int(sizes.sum()), self.eos_id, dtype=np.int64)
        pos = 0
        for e, n in zip(encodings, sizes.tolist()):
            out[pos : pos + n - 1] = e.ids
            pos += n
        return out

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer(name={self.name!r}, vocab_size={self.vocab_size})"


def load_tokenizer_file(path: str | os.PathLike[str], name: str | None = None) -> HFTokenizer:
    """Load a Hugging Face tokenizer.json (or a folder holding one)."""
    import tokenizers

    p = Path(path).expanduser()
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise ConfigError(
            f"data.tokenizer = {str(path)!r} is not 'byte', 'bpe' or an existing tokenizer.json; "
            "give one of those"
        )
    try:
        tok = tokenizers.Tokenizer.from_file(str(p))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad user file
        raise ConfigError(f"data.tokenizer = {str(path)!r} is not a valid tokenizer.json: {exc}") from exc
    return HFTokenizer(tok, name or f"file:{p.resolve()}", source=str(path))


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def bpe_cache_path(data_cfg: DataSection, cache_dir: Path | None = None) -> Path:
    """Where the BPE for this corpus, vocabulary and split is (or will be) cached."""
    cache = cache_dir if cache_dir is not None else resolve_cache_dir(data_cfg)
    key_src = f"bpe-v1|{corpus_identity(data_cfg)}|{data_cfg.bpe_vocab}|{data_cfg.val_fraction!r}"
    key = hashlib.blake2b(key_src.encode(), digest_size=8).hexdigest()
    return cache / "tokenizers" / f"bpe-{data_cfg.bpe_vocab}-{key}" / TOKENIZER_FILE


def train_bpe(texts: Iterator[str], vocab_size: int) -> "tokenizers.Tokenizer":
    """Train a byte-level BPE with `<|endoftext|>` as its only special token (id 0)."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        # All 256 byte symbols, so any text encodes even if the corpus never shows some bytes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _build_bpe(data_cfg: DataSection, cache_dir: Path | None) -> HFTokenizer:
    path = bpe_cache_path(data_cfg, cache_dir)
    name = path.parent.name
    if path.is_file():
        return load_tokenizer_file(path, name=name)
    corpus = open_corpus(data_cfg, cache_dir)
    # Train only on the train split, so validation loss measures text the tokenizer never saw.
    texts = (text for _, text in corpus.iter_documents("train"))
    tok = train_bpe(texts, data_cfg.bpe_vocab)
    _atomic_write_text(path, tok.to_str())
    return HFTokenizer(tok, name)


def build_tokenizer(data_cfg: DataSection, cache_dir: Path | None = None) -> Tokenizer:
    """The tokenizer `data.tokenizer` names; a BPE is trained once per corpus and then loaded."""
    spec = data_cfg.tokenizer
    if is_prepared_dir(data_cfg.corpus) and spec == "bpe":
        # A prepared directory holds tokens only; its BPE was saved next to them by `prepare`.
        tok = load_tokenizer_dir(Path(data_cfg.corpus).expanduser())
        if not tok.name.startswith("bpe-"):
            raise ConfigError(
                f"data.tokenizer = 'bpe' but data.corpus = {data_cfg.corpus!r} was prepared with "
                f"tokenizer {tok.name!r}; set data.tokenizer to match it"
            )
        return tok
    if spec == "byte":
        return ByteTokenizer()
    if spec == "bpe":
        return _build_bpe(data_cfg, cache_dir)
    return load_tokenizer_file(spec)


def save_tokenizer(tok: Tokenizer, directory: str | os.PathLike[str]) -> None:
    """Store `tok` in `directory` (tokenizer_meta.json, plus tokenizer.json unless it is bytes)."""
    d = Path(directory)
    meta: dict[str, object] = {"name": tok.name, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id}
    if isinstance(tok, ByteTokenizer):
        meta["plait_tokenizer"] = "byte"
    elif isinstance(tok, HFTokenizer):
        meta["plait_tokenizer"] = "hf"
        meta["eos_token"] = tok.eos_token
        _atomic_write_text(d / TOKENIZER_FILE, tok.hf.to_str(pretty=True))
    else:
        raise TypeError(f"cannot save a tokenizer of type {type(tok).__name__}")
    _atomic_write_text(d / META_FILE, json.dumps(meta, indent=2) + "\n")


def load_tokenizer_dir(directory: str | os.PathLike[str]) -> Tokenizer:
    """Read back what `save_tokenizer` wrote (a bare tokenizer.json also works)."""
    d = Path(directory)
    meta_path = d / META_FILE
    if not meta_path.is_file():
        if (d / TOKENIZER_FILE).is_file():
            return load_tokenizer_file(d / TOKENIZER_FILE)
        raise FileNotFoundError(f"{d} holds no {META_FILE} or {TOKENIZER_FILE}; was the tokenizer saved there?")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    kind = meta.get("plait_tokenizer")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        import tokenizers

        hf = tokenizers.Tokenizer.from_file(str(d / TOKENIZER_FILE))
        return HFTokenizer(hf, meta["name"], eos_token=meta.get("eos_token"), source=str(d))
    raise ValueError(f"{meta_path} names an unknown tokenizer kind {kind!r}")
