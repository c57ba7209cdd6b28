"""Tests of plait.data: corpora and splits, tokenizers, shards and the packed-sequence loaders."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from plait.config import ConfigError, DataSection
from plait.data import (
    ByteTokenizer,
    TokenArray,
    TrainLoader,
    build_data,
    build_tokenizer,
    cached_tokens,
    iter_eval_batches,
    load_tokenizer_dir,
    open_corpus,
    open_split,
    prepare_corpus,
    save_tokenizer,
    verify_shards,
)
from plait.data import tokenizer as tokenizer_mod
from plait.data.corpus import split_documents, stdlib_root

SNIPPETS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i, 'héllo wörld')\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
    "# comment ✓ 日本語\nvalue = [1, 2, 3]\n",
]


def make_folder(root: Path, n: int = 24) -> Path:
    folder = root / "corpus"
    for i in range(n):
        sub = folder / f"pkg{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        text = "".join(SNIPPETS[(i + k) % len(SNIPPETS)] for k in range(4)) + f"x{i} = {i}\n"
        (sub / f"mod{i:02d}.py").write_text(text * 3, encoding="utf-8")
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "secret.txt").write_text("hidden")
    (folder / "blob.dat").write_bytes(b"\x00\x01\x02binary")
    return folder


def cfg(tmp_path: Path, **kw: object) -> DataSection:
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return DataSection(**kw)  # type: ignore[arg-type]


# --- corpora and splits -------------------------------------------------------------------


def test_stdlib_listing_and_split() -> None:
    corpus = open_corpus(DataSection(corpus="stdlib", val_fraction=0.02))
    assert len(corpus) > 500
    assert corpus.names == sorted(corpus.names)
    assert all(n.endswith(".py") for n in corpus.names)
    assert not any("site-packages" in n or "dist-packages" in n for n in corpus.names)
    assert all(p.is_relative_to(stdlib_root()) for p in corpus.paths[:5])
    val = corpus.split_names("val")
    assert 0 < len(val) < len(corpus) * 0.1
    assert val == open_corpus(DataSection(corpus="stdlib")).split_names("val")


def test_split_deterministic_and_nonempty() -> None:
    names = [f"doc{i}.txt" for i in range(200)]
    a = dict(zip(names, split_documents(names, 0.1)))
    shuffled = names[:]
    random.Random(0).shuffle(shuffled)
    b = dict(zip(shuffled, split_documents(shuffled, 0.1)))
    assert a == b  # by name, not by position
    assert 5 < sum(a.values()) < 40
    # A tiny fraction still holds out one document; a huge one still leaves one to train on.
    assert sum(split_documents(names[:3], 1e-9)) == 1
    assert sum(split_documents(names[:2], 0.999999)) == 1
    assert sum(split_documents(names[:1], 0.4)) == 0
    assert sum(split_documents(names, 0.0)) == 0


def test_folder_corpus_skips_binary_and_hidden(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    corpus = open_corpus(cfg(tmp_path, corpus=str(folder), val_fraction=0.1))
    assert len(corpus) == 24
    assert corpus.names[0] == "pkg0/mod00.py" and "blob.dat" not in corpus.names
    train = list(corpus.iter_documents("train"))
    val = list(corpus.iter_documents("val"))
    assert val and train and len(train) + len(val) == 24
    assert {n for n, _ in train}.isdisjoint(n for n, _ in val)
    assert train[0][1] == (folder / train[0][0]).read_text(encoding="utf-8")


def test_single_text_file_still_has_validation(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_text("".join(f"line {i}\n" for i in range(1000)), encoding="utf-8")
    corpus = open_corpus(cfg(tmp_path, corpus=str(path), val_fraction=0.1))
    (tn, train), = corpus.iter_documents("train")
    (vn, val), = corpus.iter_documents("val")
    assert train + val == path.read_text() and val.startswith("line ") and 0 < len(val) < len(train) / 5


def test_bad_corpus_path_names_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.corpus"):
        open_corpus(cfg(tmp_path, corpus=str(tmp_path / "nope.txt")))
    with pytest.raises(ConfigError, match="data.corpus"):
        build_data(cfg(tmp_path, corpus=str(tmp_path / "missing_dir")))


def test_jsonl_and_json_corpus(tmp_path: Path) -> None:
    path = tmp_path / "recs.jsonl"
    path.write_text("".join(json.dumps({"text": f"record {i} ü", "id": i}) + "\n" for i in range(30)))
    corpus = open_corpus(cfg(tmp_path, corpus=str(path), val_fraction=0.2))
    docs = dict(corpus.iter_documents("train")) | dict(corpus.iter_documents("val"))
    assert docs["recs.jsonl:7"] == "record 7 ü" and len(docs) == 30
    assert corpus.split_names("val")
    with pytest.raises(ConfigError, match=r"data.text_field.*\['text', 'id'\]"):
        open_corpus(cfg(tmp_path, corpus=str(path), text_field="content"))
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([{"body": "one"}, {"body": "two"}]))
    corpus = open_corpus(cfg(tmp_path, corpus=str(arr), text_field="body"))
    texts = [t for split in ("train", "val") for _, t in corpus.iter_documents(split)]  # type: ignore[arg-type]
    assert sorted(texts) == ["one", "two"] and corpus.names == ["arr.json:0", "arr.json:1"]


def test_parquet_corpus(tmp_path: Path) -> None:
    import datasets

    path = tmp_path / "recs.parquet"
    datasets.Dataset.from_dict({"content": [f"doc {i}" for i in range(12)], "n": list(range(12))}).to_parquet(str(path))
    corpus = open_corpus(cfg(tmp_path, corpus=str(path), text_field="content", val_fraction=0.1))
    texts = [t for _, t in corpus.iter_documents("train")] + [t for _, t in corpus.iter_documents("val")]
    assert sorted(texts) == sorted(f"doc {i}" for i in range(12))
    with pytest.raises(ConfigError, match="data.text_field"):
        open_corpus(cfg(tmp_path, corpus=str(path)))  # default field "text" is absent
    with pytest.raises(ConfigError, match="data.text_field"):
        open_corpus(cfg(tmp_path, corpus=str(path), text_field="n"))  # not strings


# --- tokenizers -------------------------------------------------------------------------


def test_byte_roundtrip() -> None:
    tok = ByteTokenizer()
    text = "héllo wörld ✓ 日本語 🎉\n\tdef f(): pass"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode()) and max(ids) < 256 and tok.decode(ids) == text
    assert tok.encode("a\0b") == [97, 98]  # NUL is the separator, never text
    assert tok.encode_batch(["ab", "ü"]) == [[97, 98], [195, 188]]
    assert tok.pack_batch(["ab", "c"]).tolist() == [97, 98, 0, 99, 0]
    assert tok.decode([104, 105, 300]) == "hi"  # ids past the vocabulary are dropped


def test_bpe_trains_roundtrips_and_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_folder(tmp_path)
    data = cfg(tmp_path, corpus=str(folder), tokenizer="bpe", bpe_vocab=320)
    tok = build_tokenizer(data)
    assert tok.name.startswith("bpe-320-") and 256 < tok.vocab_size <= 320
    assert tok.eos_id == 0
    text = "def add(a, b):\n    return a + b  # ✓ 日本\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < len(text.encode())
    assert tok.encode("<|endoftext|>") != [tok.eos_id]  # literal text stays text
    assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]
    cached = tokenizer_mod.bpe_cache_path(data)
    assert cached.is_file() and cached.is_relative_to(tmp_path / "cache")
    mtime = cached.stat().st_mtime_ns

    def no_training(*a: object, **k: object) -> None:
        raise AssertionError("BPE retrained despite the cache")

    monkeypatch.setattr(tokenizer_mod, "train_bpe", no_training)
    again = build_tokenizer(data)
    assert again.fingerprint == tok.fingerprint and again.name == tok.name  # type: ignore[attr-defined]
    assert cached.stat().st_mtime_ns == mtime
    # A changed corpus gets its own BPE.
    (folder / "pkg0" / "mod00.py").write_text("changed = True\n")
    assert tokenizer_mod.bpe_cache_path(data) != cached


def test_tokenizer_json_path(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers

    hf = tokenizer_mod.train_bpe(iter(SNIPPETS * 5), 300)
    path = tmp_path / "my_tok.json"
    hf.save(str(path))
    tok = build_tokenizer(cfg(tmp_path, tokenizer=str(path)))
    assert tok.name == f"file:{path.resolve()}" and tok.eos_id == hf.token_to_id("<|endoftext|>")
    assert tok.decode(tok.encode("print('hi')")) == "print('hi')"
    # No end-of-text token: the error says which field to fix.
    bare = HFTok(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    bare.pre_tokenizer = pre_tokenizers.Whitespace()
    bare.save(str(tmp_path / "bare.json"))
    with pytest.raises(ConfigError, match="data.tokenizer"):
        build_tokenizer(cfg(tmp_path, tokenizer=str(tmp_path / "bare.json")))
    with pytest.raises(ConfigError, match="data.tokenizer"):
        build_tokenizer(cfg(tmp_path, tokenizer=str(tmp_path / "absent.json")))


def test_save_and_load_tokenizer_dir(tmp_path: Path) -> None:
    save_tokenizer(ByteTokenizer(), tmp_path / "run_a")
    assert isinstance(load_tokenizer_dir(tmp_path / "run_a"), ByteTokenizer)
    assert json.loads((tmp_path / "run_a" / "tokenizer_meta.json").read_text())["plait_tokenizer"] == "byte"
    hf = tokenizer_mod.HFTokenizer(tokenizer_mod.train_bpe(iter(SNIPPETS * 5), 300), "bpe-300-test")
    save_tokenizer(hf, tmp_path / "run_b")
    back = load_tokenizer_dir(tmp_path / "run_b")
    assert (back.name, back.vocab_size, back.eos_id) == (hf.name, hf.vocab_size, hf.eos_id)
    assert back.fingerprint == hf.fingerprint  # type: ignore[attr-defined]
    assert back.encode(SNIPPETS[1]) == hf.encode(SNIPPETS[1])


# --- shards -------------------------------------------------------------------------------


def expected_stream(data: DataSection, split: str) -> list[int]:
    tok = ByteTokenizer()
    out: list[int] = []
    for _, text in open_corpus(data).iter_documents(split):  # type: ignore[arg-type]
        out += tok.encode(text) + [tok.eos_id]
    return out


def test_prepare_and_open_split_across_shards(tmp_path: Path) -> None:
    data = cfg(tmp_path, corpus=str(make_folder(tmp_path)), val_fraction=0.15)
    out = tmp_path / "prepared"
    meta = prepare_corpus(data, ByteTokenizer(), out, shard_tokens=1000)
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["name"] == "byte"
    assert json.loads((out / "meta.json").read_text()) == meta
    assert len(meta["splits"]["train"]["shards"]) > 3 and (out / "train_000000.bin").stat().st_size == 2000
    assert all(len(s["blake2b"]) == 32 for s in meta["splits"]["train"]["shards"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left
    verify_shards(out)
    for split in ("train", "val"):
        want = expected_stream(data, split)
        arr = open_split(out, split)
        assert len(arr) == len(want) == meta["splits"][split]["tokens"] > 0
        got = arr[:]
        assert got.dtype == np.int64 and got.tolist() == want
    train = open_split(out, "train")
    want = np.array(expected_stream(data, "train"))
    assert train.num_shards > 3
    assert train[990:2010].tolist() == want[990:2010].tolist()  # crosses two boundaries
    assert train[-1] == 0 and train[1000] == want[1000]
    starts = np.array([0, 995, 1500, len(want) - 11])
    assert train.windows(starts, 11).tolist() == [want[s : s + 11].tolist() for s in starts]
    with pytest.raises(ConfigError, match="not empty"):
        prepare_corpus(data, ByteTokenizer(), out)
    assert isinstance(load_tokenizer_dir(out), ByteTokenizer)


class WideTokenizer:
    """A protocol-only tokenizer with a vocabulary past uint16 (no fast path)."""

    name, vocab_size, eos_id = "wide", 70_000, 69_999

    def encode(self, text: str) -> list[int]:
        return [60_000 + ord(c) % 1000 for c in text]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return ""


def test_prepare_uint32_generic_tokenizer(tmp_path: Path) -> None:
    src = tmp_path / "a.txt"
    src.write_text("abc\n" * 40)
    meta = prepare_corpus(cfg(tmp_path, corpus=str(src), val_fraction=0.1), WideTokenizer(), tmp_path / "out")
    assert meta["dtype"] == "uint32"
    arr = open_split(tmp_path / "out", "train")
    assert arr[-1] == 69_999 and arr[0] == 60_000 + ord("a")


def test_bpe_prepared_dir_is_self_contained(tmp_path: Path) -> None:
    data = cfg(tmp_path, corpus=str(make_folder(tmp_path)), tokenizer="bpe", bpe_vocab=300)
    tok = build_tokenizer(data)
    prepare_corpus(data, tok, tmp_path / "prep")
    bundle = build_data(cfg(tmp_path / "elsewhere", corpus=str(tmp_path / "prep"), tokenizer="bpe"))
    assert bundle.tokenizer.name == tok.name and bundle.source == tmp_path / "prep"
    assert bundle.tokenizer.decode(bundle.val[:].tolist()).count("<|endoftext|>") >= 1


def test_cached_tokens_reuse_invalidation_and_prepared_dir(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    data = cfg(tmp_path, corpus=str(folder))
    tok = ByteTokenizer()
    first = cached_tokens(data, tok)
    assert first.is_relative_to(tmp_path / "cache") and (first / "meta.json").is_file()
    mtime = (first / "meta.json").stat().st_mtime_ns
    assert cached_tokens(data, tok) == first and (first / "meta.json").stat().st_mtime_ns == mtime
    target = folder / "pkg1" / "mod01.py"
    target.write_text(target.read_text() + "more = 1\n")
    second = cached_tokens(data, tok)
    assert second != first
    # A prepared directory is used as is, with a matching tokenizer only.
    prepared = cfg(tmp_path, corpus=str(second))
    assert cached_tokens(prepared, tok) == second
    bundle = build_data(prepared)
    assert bundle.source == second and len(bundle.train) > 0
    other = tokenizer_mod.HFTokenizer(tokenizer_mod.train_bpe(iter(SNIPPETS * 5), 300), "bpe-300-x")
    with pytest.raises(ConfigError, match="data.corpus.*data.tokenizer"):
        cached_tokens(prepared, other)


def test_env_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLAIT_CACHE", str(tmp_path / "envcache"))
    src = tmp_path / "one.txt"
    src.write_text("hello world\n" * 50)
    path = cached_tokens(DataSection(corpus=str(src)), ByteTokenizer())
    assert path.is_relative_to(tmp_path / "envcache")


def test_build_data_stdlib_byte(tmp_path: Path) -> None:
    bundle = build_data(cfg(tmp_path))
    assert bundle.tokenizer.name == "byte"
    assert len(bundle.train) > 1_000_000 and len(bundle.val) > 1000
    first = stdlib_root() / open_corpus(DataSection()).split_names("train")[0]
    head = first.read_bytes().replace(b"\0", b"")[:100]
    assert bytes(bundle.train[: len(head)].astype(np.uint8)) == head


# --- loaders ------------------------------------------------------------------------------


def tokens(n: int = 1003) -> np.ndarray:
    return np.arange(n, dtype=np.int64) % 50_000


def test_loader_windows_and_determinism() -> None:
    data = tokens()
    a = TrainLoader(data, seq_len=10, global_batch_sequences=8, seed=3)
    b = TrainLoader(data, seq_len=10, global_batch_sequences=8, seed=3)
    c = TrainLoader(data, seq_len=10, global_batch_sequences=8, seed=4)
    assert a.num_windows == 100
    batches = [a.next_batch() for _ in range(5)]
    assert all(torch.equal(x, b.next_batch()) for x in batches)
    assert not torch.equal(batches[0], c.next_batch())
    x = batches[0]
    assert x.dtype == torch.int64 and x.shape == (8, 11)
    for row in x:  # every row is a window at a multiple of seq_len
        start = int(row[0])
        assert start % 10 == 0 and row.tolist() == data[start : start + 11].tolist()


def test_loader_dp_slices() -> None:
    data = tokens()
    single = TrainLoader(data, 10, 12, seed=1)
    ranks = [TrainLoader(data, 10, 12, dp_rank=r, dp_degree=3, seed=1) for r in range(3)]
    for _ in range(12):  # crosses an epoch boundary (100 windows, 12 per step)
        whole = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert all(p.shape == (4, 11) for p in parts)
        assert torch.equal(torch.cat(parts), whole)
        starts = [set(p[:, 0].tolist()) for p in parts]
        assert not (starts[0] & starts[1] or starts[1] & starts[2] or starts[0] & starts[2])
    with pytest.raises(ValueError, match="divisible"):
        TrainLoader(data, 10, 10, dp_rank=0, dp_degree=3)


def test_loader_resume_same_and_other_dp_degree() -> None:
    data = tokens()
    ref = TrainLoader(data, 10, 8, seed=7)
    for _ in range(5):
        ref.next_batch()
    state = ref.state_dict()
    assert set(state) == {"sequences_consumed", "seed", "seq_len", "num_windows"}
    assert all(type(v) is int for v in state.values())
    upcoming = [ref.next_batch() for _ in range(20)]  # runs over the epoch boundary
    same = TrainLoader(data, 10, 8, seed=999)
    same.load_state_dict(json.loads(json.dumps(state)))
    assert all(torch.equal(u, same.next_batch()) for u in upcoming)
    ranks = [TrainLoader(data, 10, 8, dp_rank=r, dp_degree=4) for r in range(4)]
    for r in ranks:
        r.load_state_dict(state)
    for u in upcoming:
        assert torch.equal(torch.cat([r.next_batch() for r in ranks]), u)
    wrong = TrainLoader(data, 20, 8)
    with pytest.raises(ConfigError, match="train.seq_len"):
        wrong.load_state_dict(state)
    with pytest.raises(ConfigError, match="windows"):
        TrainLoader(data[:500], 10, 8).load_state_dict(state)


def test_loader_epoch_wraparound() -> None:
    data = tokens(10 * 7 + 1)  # exactly 7 windows
    loader = TrainLoader(data, 10, 4, seed=0)
    starts = torch.cat([loader.next_batch()[:, 0] for _ in range(7)]).tolist()  # 28 = 4 epochs
    epochs = [sorted(starts[i : i + 7]) for i in range(0, 28, 7)]
    assert all(e == list(range(0, 70, 10)) for e in epochs)  # each epoch visits every window once
    assert starts[:7] != starts[7:14]  # and reshuffles
    assert loader.epoch == 4
    big = TrainLoader(data, 10, 16, seed=0)  # a batch larger than an epoch
    assert sorted(big.next_batch()[:14, 0].tolist()) == sorted(list(range(0, 70, 10)) * 2)
    with pytest.raises(ConfigError, match="train.seq_len"):
        TrainLoader(tokens(5), 10, 4)


def test_loader_on_sharded_tokens() -> None:
    flat = tokens(2000)
    arr = TokenArray([flat[:333], flat[333:1000], flat[1000:]])
    a = TrainLoader(arr, 16, 8, seed=5)
    b = TrainLoader(flat, 16, 8, seed=5)
    for _ in range(30):
        assert torch.equal(a.next_batch(), b.next_batch())


def test_eval_batches() -> None:
    data = tokens(10 * 25 + 1)  # 25 windows
    batches = list(iter_eval_batches(data, 10, 4, 3))
    assert [b.shape[0] for b in batches] == [4, 4, 4]
    assert torch.cat(batches)[:, 0].tolist() == list(range(0, 120, 10))
    again = list(iter_eval_batches(data, 10, 4, 3))
    assert all(torch.equal(x, y) for x, y in zip(batches, again))
    short = list(iter_eval_batches(data, 10, 4, 100))
    assert [b.shape[0] for b in short] == [4] * 6 + [1]
    with pytest.raises(ConfigError, match="data.val_fraction.*train.seq_len"):
        list(iter_eval_batches(tokens(8), 10, 4, 1))


def test_loader_step_cost_is_small() -> None:
    import time

    loader = TrainLoader(tokens(200_000), 256, 32, seed=0)
    loader.next_batch()
    t = time.perf_counter()
    for _ in range(200):
        loader.next_batch()
    assert (time.perf_counter() - t) / 200 < 0.005
