"""Validation: every rule a config must satisfy, checked once at the entry point (`plait train`,
`plait.train`) before any model, data or worker is built, and the resolved run the workers get.

`validate(cfg, world_size)` checks the fields one by one here, and the layout through
`plait.layout` (whose rules the planner shares); `resolve_run` returns the config with its
`Layout` resolved for the job's workers (`ResolvedRun`), which is what the trainer takes and what
`plait train --nproc-per-node` hands its workers, so that they check nothing again. Each failure
raises ConfigError naming the field, the value and the fix. `build_config` is parse + validate.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from plait.config import Config, ConfigError, ModelSection, _nearest, apply_dict, parse_config
from plait.layout import Layout, Workload, check_layout_rules, resolve_layout
from plait.layout.resolve import WORLD_DEGREES, check_parallel_values, fills_world
from plait.model.sizes import NAMED_SIZES
from plait.optim import OPTIMIZERS

if TYPE_CHECKING:
    from plait.model.sizes import ModelArgs


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def build_config(
    config_file: str | None = None, overrides: list[str] | None = None, world_size: int | None = None
) -> Config:
    """A validated Config from an optional TOML file and command-line overrides (later wins)."""
    cfg = parse_config(config_file, overrides)
    validate(cfg, world_size)
    return cfg


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Every check that needs no data: the fields, the model's shape, and the layout for a job of
    `world_size` workers. Without `world_size` (`plait config`, a saved run's config) the layout
    is checked for the world its degrees multiply to, or, when a degree is -1 (it fills the
    job's world), left to the start of the job. With `parallel.auto` the layout is planned at
    start-up (`plait.autoplan`) and only the ranges of the keys it keeps as pins are checked."""
    check_fields(cfg)
    if cfg.parallel.auto or (world_size is None and fills_world(cfg.parallel)):
        check_parallel_values(cfg.parallel)  # each key's range; the layout comes later
        return
    checked_layout(cfg, world_size)


def check_fields(cfg: Config) -> None:
    """Each field's range and the model's shape: everything but the layout."""
    m, d, t, o, c, r = cfg.model, cfg.data, cfg.train, cfg.optim, cfg.checkpoint, cfg.run
    _require(
        m.name in NAMED_SIZES,
        f"model.name = {m.name!r} is not a named size{_nearest(m.name, list(NAMED_SIZES))}",
    )
    for key in ("layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab"):
        value = getattr(m, key)
        _require(value is None or value >= 1, f"model.{key} = {value} must be at least 1")
    resolve_model_args(m)  # shape rules (heads, kv heads, head dim) with the overrides applied
    _require(m.vocab_multiple >= 1, f"model.vocab_multiple = {m.vocab_multiple} must be at least 1")
    _require(m.init_std > 0, f"model.init_std = {m.init_std} must be positive")
    if m.init_from:
        check_init_from(m)
    _require(
        0.0 <= d.val_fraction < 0.5,
        f"data.val_fraction = {d.val_fraction} must be in [0, 0.5); 0.02 holds out 2% of documents",
    )
    _require(d.bpe_vocab >= 260, f"data.bpe_vocab = {d.bpe_vocab} must be at least 260 (256 bytes + specials)")
    for key in ("steps", "seq_len", "global_batch_tokens", "micro_batch_size", "eval_batches", "log_every"):
        value = getattr(t, key)
        _require(value >= 1, f"train.{key} = {value} must be at least 1")
    _require(t.eval_every >= 0, f"train.eval_every = {t.eval_every} must be >= 0 (0: never)")
    _require(t.sample_tokens >= 0, f"train.sample_tokens = {t.sample_tokens} must be >= 0")
    _require(
        t.watchdog_timeout == 0 or 1 <= t.watchdog_timeout < math.inf,
        f"train.watchdog_timeout = {t.watchdog_timeout} must be 0 (off) or a number of seconds of at least 1; "
        f"the default 600 allows for slow steps",
    )
    _require(
        t.nan_policy != "rollback" or c.every > 0,
        "train.nan_policy = \"rollback\" returns to the newest checkpoint, but checkpoint.every = 0 saves only at "
        "the end; set checkpoint.every (e.g. 100) or train.nan_policy = \"stop\" or \"skip\"",
    )
    if t.global_batch_tokens % t.seq_len:
        lower = max(t.seq_len, t.global_batch_tokens // t.seq_len * t.seq_len)
        raise ConfigError(
            f"train.global_batch_tokens = {t.global_batch_tokens} is not a multiple of "
            f"train.seq_len = {t.seq_len}; use {lower}"
        )
    _require(o.name in OPTIMIZERS, f"optim.name = {o.name!r} is not an optimizer of plait{_nearest(o.name, list(OPTIMIZERS))}")
    _require(o.lr > 0, f"optim.lr = {o.lr} must be positive")
    _require(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio = {o.min_lr_ratio} must be in [0, 1]")
    _require(o.weight_decay >= 0, f"optim.weight_decay = {o.weight_decay} must be >= 0")
    _require(0 <= o.beta1 < 1, f"optim.beta1 = {o.beta1} must be in [0, 1)")
    _require(0 <= o.beta2 < 1, f"optim.beta2 = {o.beta2} must be in [0, 1)")
    _require(o.eps > 0, f"optim.eps = {o.eps} must be positive")
    _require(o.grad_clip >= 0, f"optim.grad_clip = {o.grad_clip} must be >= 0 (0: no clipping)")
    _require(o.warmup_steps >= 0, f"optim.warmup_steps = {o.warmup_steps} must be >= 0")
    _require(0 < o.decay_fraction <= 1, f"optim.decay_fraction = {o.decay_fraction} must be in (0, 1]")
    _require(c.every >= 0, f"checkpoint.every = {c.every} must be >= 0 (0: only the final save)")
    _require(c.keep_last >= 1, f"checkpoint.keep_last = {c.keep_last} must be at least 1")
    _require(r.name != "" and "/" not in r.name, f"run.name = {r.name!r} must be a plain non-empty name")


def workload_of(cfg: Config) -> Workload:
    """What `cfg` trains, as the layout rules see it before the tokenizer is loaded (the
    vocabulary may still be unset: it will be padded to model.vocab_multiple)."""
    t = cfg.train
    return Workload(model=resolve_model_args(cfg.model), seq_len=t.seq_len,
                    global_batch_sequences=t.global_batch_tokens // t.seq_len,
                    optimizer=cfg.optim.name, vocab_multiple=cfg.model.vocab_multiple)


def checked_layout(cfg: Config, world_size: int | None) -> Layout:
    """The layout `cfg` runs on `world_size` workers (default: the product of its degrees),
    resolved and checked against every rule of `plait.layout.rules`."""
    p = cfg.parallel
    if world_size is None:
        world_size = math.prod(getattr(p, key) for key in WORLD_DEGREES)
    workload = workload_of(cfg)
    layout = resolve_layout(p, cfg.train, world_size, workload)
    check_layout_rules(layout, workload)
    return layout


@dataclass(frozen=True)
class ResolvedRun:
    """A validated config and the layout its job runs: what the trainer takes. `config` has
    `parallel.zero_stage` decided (never -1) and `parallel.auto` off; `layout` is for
    `world_size` workers."""

    config: Config
    layout: Layout
    world_size: int

    def replace_config(self, config: Config) -> "ResolvedRun":
        return dataclasses.replace(self, config=config)

    def to_json(self) -> str:
        """For the workers of `plait train --nproc-per-node` (an environment variable)."""
        return json.dumps({"config": self.config.to_dict(), "layout": dataclasses.asdict(self.layout),
                           "world_size": self.world_size})

    @classmethod
    def from_json(cls, text: str) -> "ResolvedRun":
        """The run `to_json` wrote: typed as the config reads it, and checked by nothing else
        (the launcher validated it)."""
        data = json.loads(text)
        return cls(config=apply_dict(Config(), data["config"], source="the launcher's resolved config"),
                   layout=Layout(**data["layout"]), world_size=int(data["world_size"]))


def resolve_run(cfg: Config, world_size: int, fields_checked: bool = False) -> ResolvedRun:
    """Validate `cfg` for a job of `world_size` workers and resolve its layout: the one place an
    entry point turns a config into what the trainer runs (`fields_checked`: the caller ran
    `check_fields` already, as `plait.autoplan` does before it plans)."""
    if cfg.parallel.auto:
        raise ConfigError("parallel.auto = true is planned by plait.train (or plait train) before the layout is "
                          "resolved; call plait.train(cfg)")
    if not fields_checked:
        check_fields(cfg)
    layout = checked_layout(cfg, world_size)
    parallel = dataclasses.replace(cfg.parallel, zero_stage=layout.zero_stage)
    return ResolvedRun(config=dataclasses.replace(cfg, parallel=parallel), layout=layout, world_size=world_size)


def check_moe_args(args: "ModelArgs") -> None:
    """Mixture-of-experts fields of the resolved shape (model.moe_*)."""
    _require(args.moe_experts >= 0, f"model.moe_experts = {args.moe_experts} must be >= 0 (0: dense MLP)")
    if args.moe_experts == 0:
        return
    _require(
        1 <= args.moe_top_k <= args.moe_experts,
        f"model.moe_top_k = {args.moe_top_k} must be between 1 and model.moe_experts = {args.moe_experts}",
    )
    _require(args.moe_ffn >= 1, f"model.moe_ffn_hidden = {args.moe_ffn_hidden} must be at least 1")
    _require(
        args.moe_capacity_factor >= 0,
        f"model.moe_capacity_factor = {args.moe_capacity_factor} must be >= 0 (0: dropless; 1.25 is common)",
    )
    _require(args.moe_aux_loss_coef >= 0, f"model.moe_aux_loss_coef = {args.moe_aux_loss_coef} must be >= 0 (0: off; 0.01 is common)")
    _require(
        args.mlp == "swiglu",
        f"model.mlp = {args.mlp!r} with model.moe_experts = {args.moe_experts}: experts are SwiGLU; "
        f"set model.mlp = \"swiglu\" or model.moe_experts = 0",
    )


def check_init_from(m: ModelSection) -> None:
    """model.init_from names a Hugging Face Llama directory whose model is this config's (the
    vocabulary is compared too when the config fixes it; otherwise once the tokenizer is known)."""
    from plait.checkpoint.hf_config import HF_PREFIX, HFConfigError, args_from_hf_config, mismatch_message, read_hf_config

    spec = m.init_from
    _require(spec.startswith(HF_PREFIX), f"model.init_from = {spec!r} must be of the form \"hf:DIR\" (a Hugging Face Llama directory)")
    try:
        theirs = args_from_hf_config(read_hf_config(spec[len(HF_PREFIX):]))
    except (HFConfigError, FileNotFoundError) as err:
        raise ConfigError(f"model.init_from = {spec!r}: {err}") from None
    ours = resolve_model_args(m)
    problem = mismatch_message(spec, ours, theirs, check_vocab=ours.vocab is not None)
    _require(problem is None, problem or "")


def resolve_model_args(m: ModelSection, tokenizer_vocab: int | None = None) -> "ModelArgs":
    """The named size with this section's overrides applied, shape rules checked.

    `tokenizer_vocab` is the tokenizer's vocabulary when known: the embedding then has at least
    that many rows (padded up to `vocab_multiple` when the size does not fix the vocabulary).
    """
    if m.name not in NAMED_SIZES:
        raise ConfigError(f"model.name = {m.name!r} is not a named size{_nearest(m.name, list(NAMED_SIZES))}")
    base = NAMED_SIZES[m.name]
    changes: dict[str, Any] = {}
    for key, arg in (
        ("layers", "layers"), ("hidden", "hidden"), ("heads", "heads"), ("kv_heads", "kv_heads"),
        ("mlp", "mlp"), ("ffn_hidden", "ffn_hidden"), ("tie_embeddings", "tie_embeddings"),
        ("rope_theta", "rope_theta"), ("rope_scaling_factor", "rope_scaling_factor"), ("norm_eps", "norm_eps"),
        ("moe_experts", "moe_experts"), ("moe_top_k", "moe_top_k"), ("moe_ffn_hidden", "moe_ffn_hidden"),
        ("moe_capacity_factor", "moe_capacity_factor"), ("moe_aux_loss_coef", "moe_aux_loss_coef"),
    ):
        value = getattr(m, key)
        if value is not None:
            changes[arg] = value
    if m.heads is not None and m.kv_heads is None and base.kv_heads > m.heads:
        changes["kv_heads"] = m.heads  # shrinking heads alone keeps the model valid
    if m.mlp is not None and m.mlp != base.mlp and m.ffn_hidden is None:
        changes["ffn_hidden"] = None  # the named width was for the other MLP: use the new default
    changes["init_std"] = m.init_std
    args = base.replace(**changes)

    if args.hidden % args.heads:
        raise ConfigError(
            f"model.hidden = {args.hidden} is not divisible by model.heads = {args.heads}; "
            f"pick heads among {[h for h in range(1, min(args.hidden, 128) + 1) if args.hidden % h == 0][-6:]}"
        )
    if args.head_dim % 2:
        raise ConfigError(
            f"model.hidden / model.heads = {args.head_dim} must be even for rotary embeddings; "
            f"change model.heads or model.hidden"
        )
    if args.kv_heads > args.heads or args.heads % args.kv_heads:
        options = [k for k in range(1, args.heads + 1) if args.heads % k == 0]
        raise ConfigError(
            f"model.kv_heads = {args.kv_heads} must divide model.heads = {args.heads} "
            f"(grouped-query attention); valid: {options}"
        )
    check_moe_args(args)

    if m.vocab is not None:
        vocab = m.vocab
        if tokenizer_vocab is not None and vocab < tokenizer_vocab:
            raise ConfigError(
                f"model.vocab = {vocab} is smaller than the tokenizer's vocabulary ({tokenizer_vocab}); "
                f"set model.vocab >= {tokenizer_vocab} or leave it unset"
            )
    elif base.vocab is not None and (tokenizer_vocab is None or base.vocab >= tokenizer_vocab):
        vocab = base.vocab
    elif tokenizer_vocab is not None:
        vocab = -(-tokenizer_vocab // m.vocab_multiple) * m.vocab_multiple
    else:
        vocab = None
    return args.replace(vocab=vocab)
