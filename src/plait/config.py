"""The config tree: one dataclass per section, TOML files, `--section.key=value` overrides.

Plain data and parsing: a wrong key or a value of the wrong type is refused here, naming the
nearest valid key or the expected type. Every other rule is checked by `plait.validation` (the
fields' ranges, the model's shape, and the layout through `plait.layout`), once, before any
model, data or worker is built; `plait.validation.build_config` is parse + validate.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from plait.errors import ConfigError
from plait.layout.pipeline import Schedule
from plait.layout.types import CpMethod

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib


@dataclass
class ModelSection:
    """The network. `name` picks a named size; every other field set here overrides it."""

    name: str = "tiny"
    layers: int | None = None
    hidden: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    mlp: Literal["swiglu", "gelu"] | None = None
    ffn_hidden: int | None = None
    # Embedding rows. Unset: the tokenizer's vocabulary padded up to `vocab_multiple`.
    # Set: used as is, and must be at least the tokenizer's vocabulary.
    vocab: int | None = None
    vocab_multiple: int = 64
    tie_embeddings: bool | None = None
    rope_theta: float | None = None
    # Llama-3 frequency scaling of the rotary embedding; 0 switches it off.
    rope_scaling_factor: float | None = None
    norm_eps: float | None = None
    init_std: float = 0.02
    # "hf:DIR": start from a Hugging Face Llama's weights instead of random ones (the shape above
    # must match it). A run that already has a checkpoint resumes from that instead.
    init_from: str = ""
    # Mixture of experts (docs/model.md): experts per block (0: dense MLP), experts per token,
    # expert SwiGLU width (unset: ffn_hidden), capacity factor (0: dropless) and the weight of
    # the load-balancing loss. Unset: the named size's (debug-moe, tiny-moe, mixtral-8x7b).
    moe_experts: int | None = None
    moe_top_k: int | None = None
    moe_ffn_hidden: int | None = None
    moe_capacity_factor: float | None = None
    moe_aux_loss_coef: float | None = None


@dataclass
class DataSection:
    """Where tokens come from."""

    # "stdlib" (the running Python's standard library source), a text file, a folder of text
    # files, a .jsonl/.json/.parquet file, or a directory written by `plait prepare`.
    corpus: str = "stdlib"
    # "byte" (vocab 256), "bpe" (trained on the corpus and cached), or a path to a tokenizer.json.
    tokenizer: str = "byte"
    bpe_vocab: int = 4096
    # Field holding the text in JSONL/parquet records.
    text_field: str = "text"
    # Share of documents (files, records) held out for validation, chosen by a hash of their name.
    val_fraction: float = 0.02
    # Where tokenized corpora are cached; empty means ~/.cache/plait (or $PLAIT_CACHE).
    cache_dir: str = ""


@dataclass
class TrainSection:
    """The step: batch, length, precision, and how often to evaluate."""

    # The defaults are the out-of-the-box run: ~1M byte tokens, about 3 minutes on a 2-core CPU.
    steps: int = 120
    seq_len: int = 256
    # Tokens per optimizer step across all ranks. Must be a multiple of seq_len * micro_batch_size.
    global_batch_tokens: int = 8192
    # Sequences per forward pass on one rank; gradient accumulation makes up the rest.
    micro_batch_size: int = 32
    # "auto": bf16 autocast on a GPU, fp32 on a CPU (where bf16 matmuls are usually slower).
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    activation_checkpointing: bool = False
    compile: bool = False
    eval_every: int = 40
    eval_batches: int = 8
    log_every: int = 10
    device: str = "auto"
    # Tokens to sample at the end of the run (0: no sample).
    sample_tokens: int = 200
    sample_prompt: str = "def "
    # Seconds a step (and, separately, the log, evaluation and save after it) may take before
    # every rank dumps its Python stacks, the log names the rank that did not arrive, and the job
    # exits with code 124. The first step gets three times as long (compilation). 0: off.
    watchdog_timeout: float = 600.0
    # A NaN or infinite loss (or gradient norm): "stop" naming the step and the rank, "skip" the
    # step (no update), or "rollback" to the newest checkpoint, passing over that batch.
    nan_policy: Literal["stop", "skip", "rollback"] = "stop"


@dataclass
class OptimSection:
    """Optimizer and learning-rate schedule."""

    # A name of the optimizer table, plait.optim.OPTIMIZERS.
    name: str = "adamw"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 20
    # Warmup-stable-decay: the share of all steps spent in the final decay.
    decay_fraction: float = 0.2


@dataclass
class CheckpointSection:
    """When to save and what to resume from."""

    every: int = 40
    keep_last: int = 2
    # Resume from the run directory's `latest` checkpoint when there is one; false refuses to
    # start in a run directory that already holds checkpoints (nothing is overwritten).
    resume: bool = True
    # Always save once at the last step.
    save_final: bool = True
    # Copy the state to host memory and write it in the background while training goes on
    # (`checkpoint.async = true` is accepted too). The training waits only for the copy.
    async_save: bool = False


@dataclass
class RunSection:
    """Where the run lives and how it is seeded."""

    dir: str = ""
    name: str = "default"
    seed: int = 1234
    tensorboard: bool = True
    # "auto": a live progress bar on a terminal, plain log lines otherwise.
    progress: Literal["auto", "rich", "plain", "none"] = "auto"


@dataclass
class ParallelSection:
    """Parallel layout: the product of the degrees is the number of workers.

    Data parallelism has two axes: replicas (`dp_replicate_degree`) and shards
    (`dp_shard_degree`, with `zero_stage` saying what is sharded). Both > 1 is hybrid sharding
    (HSDP). Pipeline stages (`pp_degree`) and context shards (`cp_degree`) multiply the world
    too; experts (`ep_degree`) are spread over ranks that the data/context axes already hold."""

    # Data-parallel replicas; -1 fills the world.
    dp_replicate_degree: int = 1
    # Data-parallel shards (ZeRO); -1 fills the rest of the world.
    dp_shard_degree: int = 1
    # 0: plain data parallel (DDP, no sharding). Over the shard axis: 1 shards optimizer state,
    # 2 also gradients (FSDP2 without resharding after forward), 3 also parameters (FSDP2).
    # -1 (auto): 3 when dp_shard_degree is > 1 (or -1), else 0, so a shard degree alone runs FSDP.
    zero_stage: int = -1
    tp_degree: int = 1
    # Megatron sequence parallelism in the norm regions (needs tp_degree > 1).
    sequence_parallel: bool = False
    # Sharded layouts (ZeRO-2/3): bf16 parameters in forward/backward, fp32 gradient reduction.
    mixed_precision: bool = False
    # ZeRO-3: keep sharded parameters and optimizer state in CPU memory.
    cpu_offload: bool = False
    # Pipeline stages: the layers are split into stages that run on different ranks.
    pp_degree: int = 1
    # "gpipe", "1f1b", "interleaved-1f1b" (needs pp_virtual_stages > 1) or "zero-bubble"
    # (plait.layout.pipeline.Schedule).
    pp_schedule: Schedule = "1f1b"
    # Micro-batches per step through the pipeline (per data-parallel rank); 0: derived from
    # train.micro_batch_size (each pipeline micro-batch is one train micro-batch).
    pp_microbatches: int = 0
    # Model chunks (stages) per pipeline rank; > 1 for the interleaved and zero-bubble schedules.
    pp_virtual_stages: int = 1
    # Context parallelism: each sequence is split over this many ranks (long inputs).
    cp_degree: int = 1
    # "ring" (key/value shards travel around the ring) or "ulysses" (all-to-all to head shards).
    cp_method: CpMethod = "ring"
    # Expert parallelism (mixture-of-experts models): experts spread over this many ranks, taken
    # from the data-parallel shard and context axes (it must divide dp_shard_degree x cp_degree).
    ep_degree: int = 1
    # Plan the layout at start-up (docs/planner.md, "parallel.auto"): plait train runs the
    # planner for the job's workers and trains its best layout that fits. Every key of this
    # section set to a non-default value (a -1 data-parallel degree fills, it pins nothing), and
    # train.micro_batch_size / train.activation_checkpointing when not default, is kept as a pin.
    # The run records the chosen layout with auto = false.
    auto: bool = False
    # With `auto`: the cluster profile to plan on (written by `plait plan --calibrate`); its
    # worker counts are replaced by the job's. Empty: measure this machine at start-up with the
    # job's workers (a few seconds) into RUN_DIR/cluster.toml, reused while the count matches.
    cluster_profile: str = ""


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    run: RunSection = field(default_factory=RunSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) if self.run.dir else Path("runs") / self.run.name

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict; unset (None) fields are left out so it writes as TOML."""
        out: dict[str, dict[str, Any]] = {}
        for sec in dataclasses.fields(self):
            values = dataclasses.asdict(getattr(self, sec.name))
            out[sec.name] = {k: v for k, v in values.items() if v is not None}
        return out


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _section_class(name: str) -> type:
    return type(getattr(Config(), name))


def _nearest(word: str, options: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; valid: {', '.join(prefix + o for o in sorted(options))}"


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(where: str, value: Any, annotation: Any) -> Any:
    """Turn a TOML value or a command-line string into the field's type, or raise ConfigError."""
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(where, value, options[0])
    if origin is Literal:
        allowed = list(get_args(annotation))
        if value not in allowed:
            raise ConfigError(
                f"{where} = {value!r} is not one of {allowed}{_nearest(str(value), [str(a) for a in allowed])}"
            )
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where} = {value!r} is not a boolean; use true or false")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r} is not an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                number = math.nan
            if number.is_integer():
                return int(number)
        raise ConfigError(f"{where} = {value!r} is not an integer")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} = {value!r} is not a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} = {value!r} is not a string; quote it")
    raise AssertionError(f"unsupported config annotation {annotation} for {where}")


# Names that are not Python identifiers, accepted in configs for their field.
ALIASES = {"checkpoint.async": "checkpoint.async_save"}


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    """Set `section.key` from a TOML value or a string, checking the name and the type."""
    dotted = ALIASES.get(dotted, dotted)
    if "." not in dotted:
        raise ConfigError(
            f"'{dotted}' is not of the form section.key{_nearest(dotted, list(SECTIONS))}"
        )
    section, key = dotted.split(".", 1)
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section '{section}'{_nearest(section, list(SECTIONS))}")
    types_ = _field_types(_section_class(section))
    if key not in types_:
        raise ConfigError(f"unknown key '{section}.{key}'{_nearest(key, list(types_), section + '.')}")
    setattr(getattr(cfg, section), key, _coerce(f"{section}.{key}", value, types_[key]))


def apply_dict(cfg: Config, data: dict[str, Any], source: str = "config") -> Config:
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(
                f"{source}: unknown section [{section}]{_nearest(section, list(SECTIONS))}"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table of key = value")
        for key, value in values.items():
            try:
                set_value(cfg, f"{section}.{key}", value)
            except ConfigError as err:
                raise ConfigError(f"{source}: {err}") from None
    return cfg


def read_toml(path: Path, flag: str, missing: str = "no such file") -> dict[str, Any]:
    """A TOML file's tables; a missing file or bad TOML is a ConfigError naming `flag` and the path."""
    if not path.is_file():
        raise ConfigError(f"{flag} {path}: {missing}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None


def load_toml(path: str | Path, cfg: Config | None = None) -> Config:
    path = Path(path)
    return apply_dict(cfg or Config(), read_toml(path, "--config"), source=str(path))


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """`--section.key=value` or `--section.key value` pairs from the command line."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument '{arg}'; overrides look like --train.steps=100")
        body = arg[2:]
        if "=" in body:
            key, value = body.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"--{body} needs a value, e.g. --{body}=VALUE")
            key, value = body, args[i + 1]
            i += 1
        pairs.append((key, value))
        i += 1
    return pairs


def override_args(values: dict[str, Any]) -> list[str]:
    """The inverse of `parse_overrides`: `{"train.steps": 100}` -> ["--train.steps=100"]
    (booleans as true/false, as the config reads them)."""
    return [f"--{key}={('true' if value else 'false') if isinstance(value, bool) else value}"
            for key, value in values.items()]


def parse_config(config_file: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """A Config from an optional TOML file and command-line overrides (later wins), parsed and
    typed but not validated (`plait.validation.build_config` validates too)."""
    cfg = load_toml(config_file) if config_file else Config()
    for key, value in parse_overrides(overrides or []):
        set_value(cfg, key, value)
    return cfg


def to_toml(data: dict[str, dict[str, Any]]) -> str:
    """Write the two-level dict of `Config.to_dict()` as TOML (strings, numbers, booleans)."""

    def fmt(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return repr(value)
        if isinstance(value, str):
            escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            return f'"{escaped}"'
        raise TypeError(f"cannot write {value!r} as TOML")

    lines: list[str] = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {fmt(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)
