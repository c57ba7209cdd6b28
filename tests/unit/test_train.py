"""End-to-end training on the embedded corpus: loss falls, the run directory is complete,
resume is bit-identical, the trained run loads and generates, the CLI works."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import plait
from plait.checkpoint.dcp_io import read_whole_tensors
from plait.validation import build_config

SMALL = [
    "--model.name=debug", "--train.seq_len=64", "--train.global_batch_tokens=1024",
    "--train.micro_batch_size=8", "--train.eval_every=10", "--train.eval_batches=2",
    "--train.log_every=1", "--optim.lr=3e-3", "--optim.warmup_steps=5", "--run.progress=none",
    "--train.sample_tokens=20",
]


def small_config(run_dir: Path, *extra: str):
    return build_config(None, SMALL + [f"--run.dir={run_dir}", *extra])


def train_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line["kind"] == "train"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    plait.train(small_config(run_dir, "--train.steps=30", "--checkpoint.every=10"))
    return run_dir


def test_loss_falls_and_run_dir_complete(trained):
    lines = train_lines(trained)
    assert [line["step"] for line in lines] == list(range(1, 31))
    for line in lines:
        assert {"loss", "lr", "tokens_per_s", "tokens"} <= set(line)
    first, last = lines[0]["loss"], sum(line["loss"] for line in lines[-5:]) / 5
    assert first == pytest.approx(5.55, abs=0.15)  # ln 256: an untrained byte model
    assert last < first - 1.0, (first, last)
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in records if r["kind"] == "val"]
    assert [v["step"] for v in vals] == [10, 20, 30]
    assert vals[-1]["val_loss"] < vals[0]["val_loss"]
    assert vals[-1]["val_ppl"] == pytest.approx(2.718281828 ** vals[-1]["val_loss"], rel=1e-6)
    assert any(r["kind"] == "sample" and r["text"].startswith("def ") for r in records)
    assert (trained / "config.toml").is_file()
    assert any((trained / "tensorboard").iterdir())
    ckpts = trained / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_30"
    # keep_last = 2 prunes step_10 once step_30 is complete
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_")) == ["step_20", "step_30"]
    for name in ("__0_0.distcp", ".metadata.json", "manifest.json"):
        assert (ckpts / "step_30" / name).is_file()
    state = json.loads((ckpts / "step_30" / "manifest.json").read_text())
    assert state["step"] == 30 and state["tokens_seen"] == 30 * 1024
    assert state["loader"]["sequences_consumed"] == 30 * 16


def test_saved_config_rebuilds_same_run(trained):
    cfg = build_config(str(trained / "config.toml"))
    assert cfg.model.layers == 2 and cfg.model.vocab == 256 and cfg.train.steps == 30


def test_resume_is_bit_identical(tmp_path):
    full, broken = tmp_path / "full", tmp_path / "broken"
    extra = ("--train.steps=12", "--checkpoint.every=6", "--train.sample_tokens=0")
    plait.train(small_config(full, *extra))
    plait.train(small_config(broken, *extra))
    # Pretend the run died after step 9: drop the step-12 checkpoint, point latest at step 6.
    shutil.rmtree(broken / "checkpoints" / "step_12")
    (broken / "checkpoints" / "latest").write_text("step_6\n")
    result = plait.train(small_config(broken, *extra))
    assert result.step == 12
    # Every saved tensor (model, optimizer state, RNG) equal, bit for bit.
    a = dict(read_whole_tensors(full / "checkpoints" / "step_12"))
    b = dict(read_whole_tensors(broken / "checkpoints" / "step_12"))
    assert a.keys() == b.keys() and any(k.startswith("optim/") for k in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    losses_full = {line["step"]: line["loss"] for line in train_lines(full)}
    resumed = train_lines(broken)[-6:]  # the lines the resumed process wrote
    assert [line["step"] for line in resumed] == list(range(7, 13))
    assert all(line["loss"] == losses_full[line["step"]] for line in resumed)


def test_load_and_generate(trained):
    run = plait.load(trained)
    assert run.step == 30
    text = run.generate("def ", max_new_tokens=30, temperature=0)
    assert text.startswith("def ") and len(text) > 4
    assert text == run.generate("def ", max_new_tokens=30, temperature=0)


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(plait.__file__).parents[1])}
    return subprocess.run([sys.executable, "-m", "plait", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def test_cli_generate_report_and_errors(trained, tmp_path):
    out = _cli("generate", str(trained), "--prompt", "import ", "--max-new-tokens", "20")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("import ")
    out = _cli("report", str(trained))
    assert out.returncode == 0, out.stderr
    assert (trained / "report" / "loss.png").is_file()
    out = _cli("train", "--train.stesp=3")
    assert out.returncode == 2
    assert "did you mean 'train.steps'" in out.stderr
    out = _cli("generate", str(tmp_path / "nothing"))
    assert out.returncode == 2 and "nothing" in out.stderr


@pytest.mark.parametrize(
    "options",
    [("--train.dtype=bf16",), ("--train.activation_checkpointing=true",), ("--optim.schedule=wsd", "--model.mlp=gelu")],
)
def test_options_train(tmp_path, options):
    result = plait.train(small_config(tmp_path, "--train.steps=8", "--train.sample_tokens=0", *options))
    lines = train_lines(tmp_path)
    assert result.step == 8 and lines[-1]["loss"] < lines[0]["loss"]


def test_activation_checkpointing_matches_plain(tmp_path):
    base = ("--train.steps=4", "--train.sample_tokens=0", "--checkpoint.save_final=false", "--train.eval_every=0")
    plait.train(small_config(tmp_path / "a", *base))
    plait.train(small_config(tmp_path / "b", *base, "--train.activation_checkpointing=true"))
    la, lb = train_lines(tmp_path / "a"), train_lines(tmp_path / "b")
    for x, y in zip(la, lb):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6)


@pytest.mark.slow
def test_compile_trains(tmp_path):
    result = plait.train(small_config(tmp_path, "--train.steps=4", "--train.compile=true", "--train.sample_tokens=10"))
    assert result.step == 4 and result.sample is not None


def test_prepare_cli_then_train_on_shards(tmp_path):
    corpus = tmp_path / "notes.jsonl"
    lines = [json.dumps({"text": f"note {i}: " + "the quick brown fox jumps over the lazy dog. " * 8}) for i in range(60)]
    corpus.write_text("\n".join(lines) + "\n")
    out = _cli("prepare", f"--data.corpus={corpus}", "--data.tokenizer=bpe", "--data.bpe_vocab=300",
               "--data.val_fraction=0.1", "--out", str(tmp_path / "shards"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "shards" / "meta.json").is_file()
    result = plait.train(small_config(
        tmp_path / "run", f"--data.corpus={tmp_path / 'shards'}", "--data.tokenizer=bpe",
        "--data.bpe_vocab=300", "--data.val_fraction=0.1", "--train.steps=6", "--train.seq_len=32",
        "--train.global_batch_tokens=256", "--train.eval_every=3",
    ))
    assert result.model.args.vocab == 320  # 300 padded to a multiple of 64
    assert result.val_loss is not None and result.val_loss < 6.0
    run = plait.load(tmp_path / "run")
    assert run.tokenizer.vocab_size == 300
    assert run.generate("note", max_new_tokens=5, temperature=0).startswith("note")


def test_refused_resume_leaves_run_dir_untouched(trained):
    before = {p: p.read_bytes() for p in [trained / "config.toml", trained / "checkpoints" / "latest"]}
    with pytest.raises(plait.ConfigError, match="cannot resume run.dir = .* Use a new --run.dir"):
        plait.train(small_config(trained, "--train.steps=30", "--model.hidden=32"))
    with pytest.raises(plait.ConfigError, match="already holds checkpoints .* checkpoint.resume = false"):
        plait.train(small_config(trained, "--train.steps=30", "--checkpoint.resume=false"))
    assert {p: p.read_bytes() for p in before} == before
    assert plait.load(trained).step == 30
