"""Sharded checkpoints in one process: boxes, metadata, integrity, fallback, async saves.

The multi-process side (every rank writing its own part, resuming under other layouts) is
tests/dist/test_reshard.py; killed jobs are tests/dist/test_crash.py.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import plait
from plait.checkpoint import latest_checkpoint, load_model_weights, save_model_tensors
from plait.checkpoint.dcp_io import flat_boxes, read_whole_tensors
from plait.checkpoint.sharded import CheckpointError, find_intact, read_manifest, verify
from plait.config import ConfigError
from plait.model import ModelArgs, build_model, materialize

from plait.validation import build_config

SMALL = [
    "--model.name=debug", "--train.seq_len=64", "--train.global_batch_tokens=1024", "--train.micro_batch_size=8",
    "--train.log_every=1", "--optim.lr=3e-3", "--optim.warmup_steps=5", "--run.progress=none",
]


def small_config(run_dir: Path, *extra: str):
    return build_config(None, SMALL + [f"--run.dir={run_dir}", *extra])


def train_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line["kind"] == "train"]


@pytest.mark.parametrize("shape", [(7,), (3, 5), (4, 3, 5), (2, 1, 3, 4)])
def test_flat_boxes_cover_a_flat_range_in_order(shape):
    """ZeRO-1 slices cut parameters anywhere: the boxes of a flat range hold exactly its
    elements, in order, each a contiguous run (so a flat buffer reshapes into them)."""
    numel = math.prod(shape)
    whole = torch.arange(numel).reshape(shape)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        a, b = sorted(torch.randint(0, numel + 1, (2,), generator=gen).tolist())
        pieces = []
        for offsets, sizes in flat_boxes(shape, a, b):
            view = whole
            for dim, (o, n) in enumerate(zip(offsets, sizes)):
                view = view.narrow(dim, o, n)
            pieces.append(view.reshape(-1))
        got = torch.cat(pieces) if pieces else torch.empty(0, dtype=whole.dtype)
        assert torch.equal(got, torch.arange(a, b)), (shape, a, b)
        assert len(pieces) <= 2 * len(shape) - 1  # a partial row, whole rows, a partial row per level


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    plait.train(small_config(run_dir, "--train.steps=8", "--checkpoint.every=4", "--checkpoint.keep_last=3",
                             "--train.sample_tokens=0", "--train.eval_every=0"))
    return run_dir


def test_manifest_describes_and_protects_every_file(saved_run):
    step = saved_run / "checkpoints" / "step_8"
    manifest = read_manifest(step)
    assert manifest["step"] == 8 and manifest["world_size"] == 1 and manifest["layout"]["dp_shard"] == 1
    on_disk = {p.name for p in step.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert all(len(info["sha256"]) == 64 and info["bytes"] > 0 for info in manifest["files"].values())
    assert verify(step) is None
    # No pickle anywhere in the metadata: it is JSON, and DCP's own pickled `.metadata` is absent.
    assert not (step / ".metadata").exists()
    meta = json.loads((step / ".metadata.json").read_text())
    assert "model/embed.weight" in meta["tensors"] and "optim/embed.weight/exp_avg" in meta["tensors"]


def test_loading_unpickles_tensors_only(saved_run, monkeypatch):
    """Every torch.load on the way in is weights_only (tensors and plain data, nothing else)."""
    calls = []
    real_load = torch.load

    def guarded(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", guarded)
    plait.load(saved_run)  # one process reading the weights whole
    resumed = shutil.copytree(saved_run, saved_run.parent / "resumed")
    plait.train(small_config(resumed, "--train.steps=9", "--train.sample_tokens=0", "--train.eval_every=0"))
    assert calls and all(flag is True for flag in calls), calls


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "metrics.jsonl").unlink()
    return dst


def test_truncated_checkpoint_falls_back_to_the_previous(saved_run, tmp_path, capsys):
    run = _copy(saved_run, tmp_path / "run")
    data = run / "checkpoints" / "step_8" / "__0_0.distcp"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    said = []
    assert find_intact(run, said.append) == run / "checkpoints" / "step_4"
    assert "truncated" in said[0] and "step_8" in said[0]
    plait.train(small_config(run, "--train.steps=8", "--checkpoint.every=4", "--train.sample_tokens=0",
                             "--train.eval_every=0", "--run.progress=plain"))
    out = capsys.readouterr().out
    assert "is damaged" in out and "resumed from" in out and "step_4" in out
    # Steps 5..8 were trained again, on the same curve as the uninterrupted run.
    again = {line["step"]: line["loss"] for line in train_lines(run)}
    first = {line["step"]: line["loss"] for line in train_lines(saved_run)}
    assert sorted(again) == [5, 6, 7, 8] and all(again[s] == first[s] for s in again)
    assert verify(run / "checkpoints" / "step_8") is None  # the damaged one was rewritten


def test_flipped_byte_is_caught_by_the_checksum(saved_run, tmp_path):
    run = _copy(saved_run, tmp_path / "run")
    data = run / "checkpoints" / "step_8" / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))  # same size: only the checksum can tell
    problem = verify(run / "checkpoints" / "step_8")
    assert problem is not None and "SHA-256" in problem


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(saved_run, tmp_path):
    run = _copy(saved_run, tmp_path / "run")
    for step in (run / "checkpoints").glob("step_*"):
        (step / "manifest.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        find_intact(run, print)
    with pytest.raises(ConfigError, match="no intact checkpoint"):
        plait.train(small_config(run, "--train.steps=9"))


def test_unfinished_save_is_removed_and_never_resumed(saved_run, tmp_path, capsys):
    """A save killed midway leaves `.tmp_step_N`: never a checkpoint, cleaned at the next start."""
    run = _copy(saved_run, tmp_path / "run")
    shutil.copytree(run / "checkpoints" / "step_8", run / "checkpoints" / ".tmp_step_12")
    assert latest_checkpoint(run).name == "step_8"
    plait.train(small_config(run, "--train.steps=9", "--train.sample_tokens=0", "--train.eval_every=0",
                             "--run.progress=plain", "--checkpoint.every=0"))
    out = capsys.readouterr().out
    assert "removed .tmp_step_12" in out and "resumed from" in out
    assert not (run / "checkpoints" / ".tmp_step_12").exists()


def test_async_save_writes_the_same_checkpoint(saved_run, tmp_path):
    """`checkpoint.async = true` copies to host memory and writes in the background: the files
    hold the same tensors as a synchronous save of the same run."""
    run = tmp_path / "async"
    plait.train(small_config(run, "--train.steps=8", "--checkpoint.every=4", "--checkpoint.keep_last=3",
                             "--train.sample_tokens=0", "--train.eval_every=0", "--checkpoint.async=true"))
    for step in ("step_4", "step_8"):
        a = dict(read_whole_tensors(saved_run / "checkpoints" / step))
        b = dict(read_whole_tensors(run / "checkpoints" / step))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng/")), step
    assert [line["loss"] for line in train_lines(run)] == [line["loss"] for line in train_lines(saved_run)]


def test_weights_only_checkpoint_round_trip(tmp_path):
    model = materialize(build_model(ModelArgs(layers=2, hidden=32, heads=4, kv_heads=2, vocab=64, ffn_hidden=48)), "cpu", 3)
    path = save_model_tensors(tmp_path, 0, model.state_dict(), {"config": {}})
    assert read_manifest(path)["weights_only"] is True
    other = materialize(build_model(ModelArgs(layers=2, hidden=32, heads=4, kv_heads=2, vocab=64, ffn_hidden=48)), "cpu", 4)
    load_model_weights(path, other)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    wrong = materialize(build_model(ModelArgs(layers=1, hidden=32, heads=4, kv_heads=2, vocab=64, ffn_hidden=48)), "cpu", 4)
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_model_weights(path, wrong)


def test_older_format_is_refused_by_name(tmp_path):
    old = tmp_path / "checkpoints" / "step_3"
    old.mkdir(parents=True)
    (old / "state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="older plait"):
        read_manifest(old)
