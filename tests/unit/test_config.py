"""Config parsing, overrides, and every user-error path: each names the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from plait.config import Config, ConfigError, load_toml, parse_overrides, to_toml
from plait.validation import build_config, resolve_model_args, resolve_run

REPO = Path(__file__).resolve().parents[2]


def test_defaults_validate_and_keep_documented_keys():
    cfg = build_config()
    for dotted in ("model.name", "data.corpus", "data.tokenizer", "train.steps", "train.seq_len",
                   "train.global_batch_tokens", "train.eval_every", "optim.name", "optim.lr",
                   "checkpoint.every", "run.dir", "run.seed"):
        section, key = dotted.split(".")
        assert hasattr(getattr(cfg, section), key), dotted


def test_overrides_both_forms_and_types():
    cfg = build_config(None, ["--train.steps=12", "--optim.lr", "1e-3", "--train.compile=true", "--model.name=debug"])
    assert cfg.train.steps == 12 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.train.compile is True
    assert cfg.model.name == "debug"
    assert parse_overrides(["--a.b=c=d"]) == [("a.b", "c=d")]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--trian.steps=3", "unknown config section 'trian'; did you mean 'train'"),
        ("--train.stpes=3", "unknown key 'train.stpes'; did you mean 'train.steps'"),
        ("--train.steps=abc", "train.steps = 'abc' is not an integer"),
        ("--train.steps=0", "train.steps = 0 must be at least 1"),
        ("--optim.lr=-1", "optim.lr = -1.0 must be positive"),
        ("--optim.schedule=cosin", "did you mean 'cosine'"),
        ("--train.compile=maybe", "train.compile = 'maybe' is not a boolean"),
        ("--model.name=7b", "model.name = '7b' is not a named size"),
        ("--model.kv_heads=3", "model.kv_heads = 3 must divide model.heads = 4"),
        ("--model.heads=3", "model.hidden = 256 is not divisible by model.heads = 3"),
        ("--train.global_batch_tokens=1000", "is not a multiple of train.seq_len = 256; use 768"),
        ("--train.micro_batch_size=5", "set train.micro_batch_size = 4"),
        ("--data.val_fraction=0.9", "data.val_fraction = 0.9 must be in [0, 0.5)"),
        ("--parallel.zero_stage=3", "parallel.zero_stage = 3 shards over the data-parallel shard axis, but parallel.dp_shard_degree = 1"),
        ("--parallel.dp_shard_degree=2 --parallel.zero_stage=0", "parallel.dp_shard_degree = 2 needs a ZeRO stage"),
        ("--parallel.zero_stage=5", "parallel.zero_stage = 5 must be -1 (auto), 0, 1, 2 or 3"),
        ("--parallel.mixed_precision=true", "needs parallel.zero_stage = 2 or 3 (with parallel.dp_shard_degree > 1), not 0"),
        ("--parallel.sequence_parallel=true", "parallel.sequence_parallel = true needs parallel.tp_degree > 1"),
        ("--parallel.tp_degree=3", "parallel.tp_degree = 3 does not divide model.heads = 4 (each rank computes whole query heads); set parallel.tp_degree to one of [1, 2]"),
        ("--parallel.tp_degree=4", "parallel.tp_degree = 4 is more than model.kv_heads = 2"),
        ("--parallel.tp_degree=2 --train.compile=true", "train.compile = true with parallel.tp_degree > 1"),
        ("--checkpoint.keep_last=0", "checkpoint.keep_last = 0 must be at least 1"),
        ("--train.watchdog_timeout=0.5", "train.watchdog_timeout = 0.5 must be 0 (off) or a number of seconds of at least 1"),
        ("--train.nan_policy=skp", "train.nan_policy = 'skp' is not one of ['stop', 'skip', 'rollback']; did you mean 'skip'"),
        ("--train.nan_policy=rollback --checkpoint.every=0",
         'train.nan_policy = "rollback" returns to the newest checkpoint, but checkpoint.every = 0 saves only at the end'),
        ("steps=3", "unexpected argument 'steps=3'"),
    ],
)
def test_errors_name_field_and_fix(override, expected):
    with pytest.raises(ConfigError) as info:
        build_config(None, override.split(" "))
    assert expected in str(info.value)


def test_toml_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[trainn]\nsteps = 3\n")
    with pytest.raises(ConfigError, match=r"unknown section \[trainn\]; did you mean 'train'"):
        load_toml(bad)
    bad.write_text("[train]\nsteps = 'many'\n")
    with pytest.raises(ConfigError, match="train.steps = 'many' is not an integer"):
        load_toml(bad)
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_toml(tmp_path / "missing.toml")


def test_round_trip_through_toml(tmp_path):
    cfg = build_config(None, ["--model.name=debug", "--train.sample_prompt=a \"quoted\"\\ line", "--optim.eps=1e-8"])
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg.to_dict()))
    again = build_config(str(path))
    assert again == cfg


def test_shipped_configs_parse():
    files = sorted((REPO / "configs").glob("*.toml"))
    assert files, "configs/ ships at least one example"
    for path in files:
        build_config(str(path))


def test_vocab_rules():
    cfg = Config()
    assert resolve_model_args(cfg.model, 256).vocab == 256
    assert resolve_model_args(cfg.model, 300).vocab == 320  # padded to a multiple of 64
    cfg.model.vocab = 512
    assert resolve_model_args(cfg.model, 300).vocab == 512
    cfg.model.vocab = 200
    with pytest.raises(ConfigError, match="model.vocab = 200 is smaller than the tokenizer's vocabulary"):
        resolve_model_args(cfg.model, 256)
    cfg = Config()
    cfg.model.name = "8b"
    assert resolve_model_args(cfg.model, 256).vocab == 128256


def test_mlp_override_changes_default_width():
    cfg = Config()
    cfg.model.name = "125m"
    cfg.model.mlp = "gelu"
    args = resolve_model_args(cfg.model)
    assert args.mlp == "gelu" and args.ffn == 4 * 768


def test_layout_against_world_size():

    cfg = build_config(None, ["--parallel.dp_shard_degree=-1", "--parallel.zero_stage=3"], world_size=4)
    assert resolve_run(cfg, 4).layout.dp_shard == 4
    cfg = build_config(None, ["--parallel.dp_replicate_degree=2", "--parallel.dp_shard_degree=2", "--parallel.zero_stage=2"], world_size=4)
    assert resolve_run(cfg, 4).layout.dp == 4
    with pytest.raises(ConfigError, match="multiply to dp_replicate 2 = 2, but the job has 4 worker"):
        build_config(None, ["--parallel.dp_replicate_degree=2"], world_size=4)
    with pytest.raises(ConfigError, match="only one degree may be -1"):
        build_config(None, ["--parallel.dp_replicate_degree=-1", "--parallel.dp_shard_degree=-1", "--parallel.zero_stage=3"], world_size=4)
    with pytest.raises(ConfigError, match="cpu_offload = true needs parallel.zero_stage = 3"):
        build_config(None, ["--parallel.dp_shard_degree=2", "--parallel.zero_stage=2", "--parallel.cpu_offload=true"], world_size=2)
    # 32 sequences cannot split into 3 ranks
    with pytest.raises(ConfigError, match=r"do not split into 3 data-parallel ranks .*; set train.global_batch_tokens = 8448"):
        build_config(None, ["--parallel.dp_replicate_degree=3"], world_size=3)
    with pytest.raises(ConfigError, match=r"train.micro_batch_size = 16 does not divide a data-parallel rank's 24 sequences "
                                          r"per step .*; set train.micro_batch_size = 12 or train.global_batch_tokens = 16384"):
        build_config(None, ["--parallel.dp_replicate_degree=2", "--train.micro_batch_size=16", "--train.global_batch_tokens=12288"], world_size=2)
    # A micro-batch larger than a rank's share shrinks to it: the default config runs on 4 ranks.
    cfg = build_config(None, ["--parallel.dp_replicate_degree=4"], world_size=4)
    assert resolve_run(cfg, 4).layout.micro_batch_size == 8
    # Without the job's size, the world is what the degrees multiply to; with a -1 fill it is
    # known only when the job starts, and the layout is checked then.
    with pytest.raises(ConfigError, match="do not split into 3 data-parallel ranks"):
        build_config(None, ["--parallel.dp_replicate_degree=3"])
    build_config(None, ["--parallel.dp_shard_degree=-1", "--parallel.tp_degree=3"])


def test_tensor_parallel_composes_with_every_data_parallel_stage():
    for layout in (["--parallel.dp_replicate_degree=2"], ["--parallel.dp_shard_degree=2", "--parallel.zero_stage=1"],
                   ["--parallel.dp_shard_degree=-1", "--parallel.zero_stage=2"], ["--parallel.dp_shard_degree=2"]):
        build_config(None, ["--parallel.tp_degree=2", *layout], world_size=4)


def test_zero_stage_auto():
    from plait.validation import resolve_run

    def stage(overrides: list[str], world: int) -> int:
        return resolve_run(build_config(None, overrides, world_size=world), world).layout.zero_stage

    assert Config().parallel.zero_stage == -1
    assert stage([], 1) == 0
    assert stage(["--parallel.dp_replicate_degree=2"], 2) == 0
    # `--parallel.dp_shard_degree=2 --parallel.tp_degree=2` with no stage runs FSDP x TP.
    assert stage(["--parallel.dp_shard_degree=2", "--parallel.tp_degree=2"], 4) == 3
    assert stage(["--parallel.dp_shard_degree=-1"], 4) == 3
    assert stage(["--parallel.dp_shard_degree=-1", "--parallel.tp_degree=2"], 2) == 0  # the fill leaves 1
    assert stage(["--parallel.dp_shard_degree=2", "--parallel.zero_stage=1"], 2) == 1  # explicit wins
    cfg = build_config(None, ["--parallel.dp_shard_degree=2", "--parallel.tp_degree=2"], world_size=4)
    run = resolve_run(cfg, 4)  # the config the trainer takes records the stage that runs
    assert run.config.parallel.zero_stage == 3 and cfg.parallel.zero_stage == -1


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--parallel.cp_method=zigzag", "parallel.cp_method = 'zigzag' is not one of"),
        ("--parallel.cp_degree=0", "parallel.cp_degree = 0 must be at least 1"),
        ("--parallel.cp_degree=2 --train.seq_len=250 --train.global_batch_tokens=8000",
         "train.seq_len = 250 is not divisible by 2 x parallel.cp_degree = 4 (ring attention"),
        ("--parallel.cp_degree=4 --parallel.cp_method=ulysses",
         "model.kv_heads = 2 is not divisible by parallel.cp_degree = 4: Ulysses"),
        ("--parallel.cp_degree=2 --parallel.tp_degree=2", "parallel.cp_degree = 2 with parallel.tp_degree = 2 is not supported"),
        ("--parallel.cp_degree=2 --parallel.dp_shard_degree=2 --parallel.zero_stage=1",
         "parallel.cp_degree = 2 with parallel.zero_stage = 1 is not supported"),
        ("--parallel.cp_degree=2 --parallel.dp_replicate_degree=2 --parallel.dp_shard_degree=2 --parallel.zero_stage=3",
         "with parallel.dp_replicate_degree = 2 and parallel.zero_stage = 3 (HSDP) is not supported"),
    ],
)
def test_context_parallel_errors_name_field_and_fix(override, expected):
    with pytest.raises(ConfigError) as info:
        build_config(None, override.split(" "))
    assert expected in str(info.value)


def test_context_parallel_layouts_accepted():
    from plait.validation import resolve_run

    cfg = build_config(None, ["--parallel.cp_degree=2", "--parallel.dp_shard_degree=2", "--parallel.zero_stage=3"], world_size=4)
    layout = resolve_run(cfg, 4).layout
    assert (layout.cp, layout.dp) == (2, 2)
    build_config(None, ["--parallel.cp_degree=2", "--parallel.cp_method=ulysses", "--parallel.dp_replicate_degree=-1"], world_size=4)
    build_config(None, ["--parallel.cp_degree=2", "--train.compile=true"], world_size=2)
    with pytest.raises(ConfigError, match="multiply to cp 2 = 2, but the job has 4"):
        build_config(None, ["--parallel.cp_degree=2"], world_size=4)
