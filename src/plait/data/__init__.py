"""Data: corpora, tokenizers, pre-tokenized shards and the packed-sequence loaders.

`build_data(cfg.data)` is the one call a trainer needs: it builds the tokenizer (training and
caching a BPE when asked), tokenizes the corpus once into the cache, and opens both splits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from plait.config import DataSection
from plait.data.corpus import Corpus, iter_documents, open_corpus, resolve_cache_dir
from plait.data.loader import TrainLoader, iter_eval_batches, num_windows
from plait.data.shards import TokenArray, cached_tokens, open_split, prepare_corpus, read_meta, verify_shards
from plait.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer_dir,
    load_tokenizer_file,
    save_tokenizer,
)

__all__ = [
    "ByteTokenizer",
    "Corpus",
    "DataBundle",
    "HFTokenizer",
    "TokenArray",
    "Tokenizer",
    "TrainLoader",
    "build_data",
    "build_tokenizer",
    "cached_tokens",
    "iter_documents",
    "iter_eval_batches",
    "load_tokenizer_dir",
    "load_tokenizer_file",
    "num_windows",
    "open_corpus",
    "open_split",
    "prepare_corpus",
    "read_meta",
    "resolve_cache_dir",
    "save_tokenizer",
    "verify_shards",
]


@dataclass
class DataBundle:
    """A tokenizer and the two opened splits of the prepared directory `source`."""

    tokenizer: Tokenizer
    train: TokenArray
    val: TokenArray
    source: Path


def build_data(data_cfg: DataSection) -> DataBundle:
    """Tokenizer plus the cached (prepared on first use) tokens of `data.corpus`, opened."""
    tokenizer = build_tokenizer(data_cfg)
    source = cached_tokens(data_cfg, tokenizer)
    return DataBundle(tokenizer, open_split(source, "train"), open_split(source, "val"), source)
