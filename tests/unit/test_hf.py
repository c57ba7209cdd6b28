"""Hugging Face import and export: plait's logits equal `transformers`' LlamaForCausalLM on the same
random weights (fp32, within 1e-5) in both directions and for several shapes; sharded export;
the training hooks (`model.init_from`, training on from an imported run); the refusals.

`transformers` is a test dependency (the `dev` extra); no model is downloaded: every model here
is built from a config with random weights.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

import plait
from plait.checkpoint import save_model_tensors
from plait.checkpoint.hf import export_to_hf
from plait.parallel.gather import gather_model
from plait.cli import main
from plait.config import Config, ConfigError
from plait.validation import build_config
from plait.model import ModelArgs, build_model, materialize
from plait.trainer.record import resolved_config

TOL = 1e-5
# name -> plait shape. Weights are drawn wider than the usual 0.02 (and norm gains away from 1) so
# that logits are of order one (|logit| up to about 3) and a wrong name, a swapped norm or a permuted head shows up.
SHAPES = {
    "gqa": ModelArgs(layers=2, hidden=64, heads=4, kv_heads=2, vocab=96, ffn_hidden=96, init_std=0.1),
    "mha_tied": ModelArgs(layers=2, hidden=64, heads=4, kv_heads=4, vocab=128, ffn_hidden=128,
                          tie_embeddings=True, init_std=0.1),
    "rope_scaling": ModelArgs(layers=2, hidden=64, heads=8, kv_heads=1, vocab=64, ffn_hidden=160, rope_theta=10000.0,
                              rope_scaling_factor=8.0, norm_eps=1e-6, init_std=0.1),
    "odd_vocab": ModelArgs(layers=3, hidden=48, heads=6, kv_heads=3, vocab=257, ffn_hidden=72,
                           rope_theta=500000.0, init_std=0.1),
}
SEQ_LEN = 96


def random_tokens(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


def plait_run(tmp_path: Path, args: ModelArgs, seed: int = 0) -> tuple[torch.nn.Module, Path]:
    """A random plait model saved as a checkpoint the way the trainer saves one."""
    model = materialize(build_model(args), "cpu", seed).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
    state = {"config": resolved_config(Config(), args).to_dict(), "tokens_seen": 0, "loader": None}
    path = save_model_tensors(tmp_path / "run", 7, gather_model(model, False), state)
    return model, path


def hf_model(tmp_path: Path, seed: int = 0, **config) -> tuple[LlamaForCausalLM, Path]:
    """A random transformers Llama saved with save_pretrained (safetensors)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    out = tmp_path / "hf_model"
    model.save_pretrained(out)
    return model, out


HF_SHAPES = {
    "gqa": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300, rms_norm_eps=1e-5, max_position_embeddings=256),
    "tied_rope_scaling": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                              num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True, rope_theta=10000.0,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                              max_position_embeddings=65536),
}


def max_diff(ours: torch.nn.Module, theirs: LlamaForCausalLM, vocab: int) -> float:
    tokens = random_tokens(vocab)
    with torch.no_grad():
        reference = theirs(tokens).logits
        assert reference.abs().max() > 1.0  # logits of order one: the comparison means something
        return (ours(tokens) - reference).abs().max().item()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_export_logits_match_transformers(tmp_path, shape):
    args = SHAPES[shape]
    model, step = plait_run(tmp_path, args)
    out = tmp_path / "hf"
    assert main(["convert", "--to-hf", str(step), str(out)]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] == args.tie_embeddings
    theirs = LlamaForCausalLM.from_pretrained(out).eval()
    diff = max_diff(model, theirs, args.vocab)
    print(f"export {shape}: max |logit difference| = {diff:.3g}")
    assert diff <= TOL


def test_rope_scaling_is_what_matches(tmp_path):
    """The test above could fail: the same weights without the Llama-3 scaling in config.json
    give logits far outside the tolerance."""
    args = SHAPES["rope_scaling"]
    model, step = plait_run(tmp_path, args)
    export_to_hf(step, tmp_path / "hf")
    config = LlamaConfig.from_pretrained(tmp_path / "hf")
    unscaled = LlamaConfig(**{**config.to_dict(), "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
                              "rope_scaling": None})
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "hf", config=unscaled).eval()
    assert max_diff(model, theirs, args.vocab) > 100 * TOL


def test_sharded_export_loads(tmp_path):
    args = SHAPES["gqa"]
    model, step = plait_run(tmp_path, args)
    out = tmp_path / "hf"
    # The run directory works as SRC too (its latest checkpoint).
    assert main(["convert", "--to-hf", str(step.parent.parent), str(out), "--shard-size=40KB", "--dtype=float32"]) == 0
    files = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(files) > 3 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    for f in files:  # within the limit (plus the header), unless one tensor alone is larger
        with safe_open(str(f), framework="pt") as opened:
            assert f.stat().st_size <= 40_000 + 4_096 or len(list(opened.keys())) == 1, f
    theirs = LlamaForCausalLM.from_pretrained(out).eval()
    diff = max_diff(model, theirs, args.vocab)
    print(f"export sharded: max |logit difference| = {diff:.3g}")
    assert diff <= TOL


@pytest.mark.parametrize("shape", list(HF_SHAPES))
def test_import_logits_match_transformers(tmp_path, shape):
    theirs, hf_dir = hf_model(tmp_path, **HF_SHAPES[shape])
    out = tmp_path / "imported"
    assert main(["convert", "--from-hf", str(hf_dir), str(out)]) == 0
    run = plait.load(out)
    assert run.step == 0
    diff = max_diff(run.model, theirs, HF_SHAPES[shape]["vocab_size"])
    print(f"import {shape}: max |logit difference| = {diff:.3g}")
    assert diff <= TOL
    # ... and back out again: the round trip gives the same transformers model.
    assert main(["convert", "--to-hf", str(out / "checkpoints" / "step_0"), str(tmp_path / "again")]) == 0
    again = LlamaForCausalLM.from_pretrained(tmp_path / "again").eval()
    assert max_diff(run.model, again, HF_SHAPES[shape]["vocab_size"]) <= TOL


def test_tokenizer_goes_both_ways(tmp_path):
    from transformers import AutoTokenizer

    from plait.data import HFTokenizer, save_tokenizer
    from plait.data.tokenizer import train_bpe

    text = "def add(a, b):\n    return a + b  # sums\n"
    ours = HFTokenizer(train_bpe(iter([text * 50]), 300), "bpe")
    args = SHAPES["gqa"].replace(vocab=320)
    model, step = plait_run(tmp_path, args)
    save_tokenizer(ours, step.parent.parent)
    out = tmp_path / "hf"
    assert main(["convert", "--to-hf", str(step), str(out)]) == 0
    theirs = AutoTokenizer.from_pretrained(out)
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == ours.eos_id
    # Back into plait: the run samples with the same tokenizer.
    assert main(["convert", "--from-hf", str(out), str(tmp_path / "back")]) == 0
    run = plait.load(tmp_path / "back")
    assert run.tokenizer.encode(text) == ours.encode(text) and run.tokenizer.eos_id == ours.eos_id
    assert run.generate("def ", max_new_tokens=5, temperature=0).startswith("def ")


def _corpus(tmp_path: Path) -> str:
    path = tmp_path / "corpus.txt"
    path.write_text("def add(a, b):\n    return a + b\n\n" * 400)
    return str(path)


TRAIN = ["--train.device=cpu", "--train.seq_len=32", "--train.global_batch_tokens=256", "--train.micro_batch_size=8",
         "--train.eval_every=0", "--train.sample_tokens=0", "--run.progress=none", "--run.tensorboard=false",
         "--optim.weight_decay=0", "--optim.warmup_steps=0"]


def test_init_from_hf_in_training(tmp_path):
    theirs, hf_dir = hf_model(tmp_path, **HF_SHAPES["gqa"])
    shape = ["--model.layers=2", "--model.hidden=64", "--model.heads=4", "--model.kv_heads=2",
             "--model.ffn_hidden=96", "--model.vocab=300", "--model.norm_eps=1e-5", "--model.rope_theta=10000"]
    # One step at a negligible learning rate: the trained model is still the imported one.
    cfg = build_config(None, TRAIN + shape + [
        f"--model.init_from=hf:{hf_dir}", f"--data.corpus={_corpus(tmp_path)}", "--train.steps=1",
        "--optim.lr=1e-12", f"--run.dir={tmp_path / 'run'}",
    ])
    result = plait.train(cfg)
    diff = max_diff(result.model.eval(), theirs, 300)
    print(f"init_from gqa: max |logit difference| = {diff:.3g}")
    assert diff <= TOL
    # A config of another shape is refused before anything is built, naming the field and the fix.
    with pytest.raises(ConfigError, match=r"model.layers = 3 but the model has 2.*--model.layers=2"):
        build_config(None, [*shape, "--model.layers=3", f"--model.init_from=hf:{hf_dir}"])
    with pytest.raises(ConfigError, match="must be of the form"):
        build_config(None, [*shape, f"--model.init_from={hf_dir}"])
    with pytest.raises(ConfigError, match="no config.json"):
        build_config(None, [*shape, f"--model.init_from=hf:{tmp_path}"])
    # The run's checkpoint holds the weights: loading it needs the Hugging Face directory no more.
    shutil.rmtree(hf_dir)
    assert plait.load(tmp_path / "run").step == 1


def test_train_on_from_imported_run(tmp_path):
    _, hf_dir = hf_model(tmp_path, **HF_SHAPES["gqa"])
    out = tmp_path / "imported"
    assert main(["convert", "--from-hf", str(hf_dir), str(out)]) == 0
    before = plait.load(out).model.state_dict()
    # The imported step_0 has weights only: training starts at step 0 with a fresh optimizer.
    cfg = build_config(str(out / "config.toml"), TRAIN + [f"--data.corpus={_corpus(tmp_path)}", "--train.steps=2",
                                                          "--optim.lr=1e-3"])
    result = plait.train(cfg)
    assert result.step == 2 and result.run_dir == out
    after = plait.load(out)
    assert after.step == 2
    change = max((after.model.state_dict()[k] - v).abs().max().item() for k, v in before.items())
    assert 0 < change < 0.01  # trained on from the imported weights, not from a random init


def test_refusals(tmp_path, capsys):
    gelu = ModelArgs(layers=1, hidden=32, heads=2, kv_heads=2, vocab=64, mlp="gelu")
    _, step = plait_run(tmp_path, gelu)
    assert main(["convert", "--to-hf", str(step), str(tmp_path / "out")]) == 2
    assert "model.mlp = 'gelu'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before writing anything

    _, step = plait_run(tmp_path / "ok", SHAPES["gqa"])
    assert main(["convert", "--to-hf", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["convert", "--to-hf", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "not a plait checkpoint" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep")
    assert main(["convert", "--to-hf", str(step), str(busy)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["convert", "--to-hf", str(step), str(busy), "--force"]) == 0
    assert main(["convert", "--to-hf", str(step), str(step), "--force"]) == 2  # never over its own source
    assert "is the source" in capsys.readouterr().err and (step / "manifest.json").is_file()
    assert main(["convert", "--to-hf", str(step), str(tmp_path / "o2"), "--shard-size=lots"]) == 2
    assert "--shard-size" in capsys.readouterr().err

    base = HF_SHAPES["gqa"]
    cases = {
        "attention_bias": dict(attention_bias=True),
        "mlp_bias": dict(mlp_bias=True),
        "head_dim": dict(head_dim=32),
        "rope_type": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
        "hidden_act": dict(hidden_act="gelu"),
        "low_freq_factor": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    }
    for field, change in cases.items():
        hf_dir = tmp_path / f"hf_{field}"
        hf_dir.mkdir()
        config = {**LlamaConfig(**base).to_dict(), **change}
        if "rope_scaling" in change:  # written the way transformers < 5 writes it
            config.pop("rope_parameters", None)
        (hf_dir / "config.json").write_text(json.dumps(config))
        assert main(["convert", "--from-hf", str(hf_dir), str(tmp_path / f"o_{field}")]) == 2
        err = capsys.readouterr().err
        assert field in err, (field, err)
        assert not (tmp_path / f"o_{field}").exists()

    pickled = tmp_path / "hf_bin"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(LlamaConfig(**base).to_dict()))
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    assert main(["convert", "--from-hf", str(pickled), str(tmp_path / "o_bin")]) == 2
    assert "never unpickles" in capsys.readouterr().err


def test_plait_never_imports_transformers():
    code = ("import sys, plait, plait.cli, plait.checkpoint.hf, plait.trainer, plait.api; "
            "sys.exit('transformers' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    src = Path(plait.__file__).parent
    assert not [p for p in src.rglob("*.py") if "import transformers" in p.read_text() or "from transformers" in p.read_text()]


def test_names_round_trip_and_sizes():
    from plait.checkpoint.hf_config import from_hf_name, to_hf_name
    from plait.cli import parse_size

    names = list(build_model(SHAPES["gqa"]).state_dict())
    theirs = LlamaForCausalLM(LlamaConfig(**HF_SHAPES["gqa"])).state_dict()
    assert {to_hf_name(n) for n in names} == set(theirs)  # the same parameters, by name
    assert [from_hf_name(to_hf_name(n)) for n in names] == names
    assert from_hf_name("model.rotary_emb.inv_freq") is None
    assert from_hf_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    assert (parse_size("5GB"), parse_size("500MB"), parse_size("2GiB"), parse_size("1234")) == (5 * 10**9, 5 * 10**8, 2 * 2**30, 1234)
    with pytest.raises(ConfigError, match="--shard-size"):
        parse_size("0")


# The published config.json of Llama 3.2 1B (as transformers 4.45 wrote it).
LLAMA_32_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256,
}


def test_llama_32_1b_config_is_the_1b_size(tmp_path):
    from plait.checkpoint.hf_config import args_from_hf_config, hf_config_from_args, model_mismatches
    from plait.model import NAMED_SIZES

    ours = NAMED_SIZES["1b"]
    assert model_mismatches(ours, args_from_hf_config(LLAMA_32_1B), check_vocab=True) == []
    written = hf_config_from_args(ours, seq_len=2048, dtype="bfloat16", eos_token_id=128001)
    for key, value in written.items():
        if key in LLAMA_32_1B and key not in ("bos_token_id",):
            assert value == LLAMA_32_1B[key], key
    # So `--model.name=1b --model.init_from=hf:DIR` passes the config check as it stands.
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_32_1B))
    assert build_config(None, ["--model.name=1b", f"--model.init_from=hf:{tmp_path}"]).model.init_from
    # The same config as transformers >= 5 writes it (rope_parameters) reads the same.
    v5 = LlamaConfig(**LLAMA_32_1B).to_dict()
    assert "rope_parameters" in v5 and model_mismatches(ours, args_from_hf_config(v5), check_vocab=True) == []
