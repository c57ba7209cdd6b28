"""Every rule a config must satisfy, checked before any model, data or worker is built.

Split from `plait.config` (the tree and its parsing) to keep both readable; import these from
`plait.config`. Each failure raises ConfigError naming the field, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from plait.config import Config, ConfigError, ModelSection, ParallelSection, TrainSection, _nearest

if TYPE_CHECKING:
    from plait.model.sizes import ModelArgs


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Range and consistency checks that need no model or data; raise ConfigError on the first.
    `world_size` (workers of the job) is checked against the parallel degrees when given."""
    from plait.model.sizes import NAMED_SIZES  # model configs only: cheap, no torch work

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
    per_forward = t.seq_len * t.micro_batch_size
    if t.global_batch_tokens % t.seq_len:
        lower = max(t.seq_len, t.global_batch_tokens // t.seq_len * t.seq_len)
        raise ConfigError(
            f"train.global_batch_tokens = {t.global_batch_tokens} is not a multiple of "
            f"train.seq_len = {t.seq_len}; use {lower}"
        )
    sequences = t.global_batch_tokens // t.seq_len
    if sequences % min(t.micro_batch_size, sequences):
        divisors = [b for b in range(1, sequences + 1) if sequences % b == 0 and b <= t.micro_batch_size]
        raise ConfigError(
            f"train.global_batch_tokens = {t.global_batch_tokens} is {sequences} sequences of "
            f"{t.seq_len}, not a multiple of train.micro_batch_size = {t.micro_batch_size} "
            f"({per_forward} tokens per forward); set train.micro_batch_size = {divisors[-1]} "
            f"or train.global_batch_tokens = {math.ceil(sequences / t.micro_batch_size) * per_forward}"
        )
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
    if cfg.parallel.auto:
        # The layout is planned at start-up (plait.autoplan) and that plan is validated
        # against the job's workers then; here only the keys the plan keeps as pins are checked.
        _check_auto_pins(cfg.parallel)
        return
    validate_layout(cfg, world_size)


def _check_auto_pins(p: ParallelSection) -> None:
    """With parallel.auto: the ranges of the [parallel] keys the plan keeps (each rule that
    relates them to one another is the planner's to satisfy)."""
    for key in WORLD_DEGREES:
        value = getattr(p, key)
        _require(value >= 1 or (value == -1 and key in FILLABLE),
                 f"parallel.{key} = {value} must be at least 1" + (", or -1 to fill the world" if key in FILLABLE else ""))
    _require(p.ep_degree >= 1, f"parallel.ep_degree = {p.ep_degree} must be at least 1")
    _require(p.zero_stage in (-1, 0, 1, 2, 3), f"parallel.zero_stage = {p.zero_stage} must be -1 (auto), 0, 1, 2 or 3")
    _require(p.pp_virtual_stages >= 1, f"parallel.pp_virtual_stages = {p.pp_virtual_stages} must be at least 1")


@dataclass(frozen=True)
class Degrees:
    """The parallel degrees with -1 resolved against the number of workers.

    The world is pp x dp_replicate x dp_shard x cp x tp ranks. `ep` does not multiply it: expert
    parallelism reuses ranks of the dp_shard x cp axes (MoE parallel folding)."""

    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int = 1
    cp: int = 1
    ep: int = 1

    @property
    def dp(self) -> int:
        """Data-parallel ranks: how many ways the global batch is split."""
        return self.dp_replicate * self.dp_shard

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.cp * self.tp


# The degrees that multiply to the world, in mesh order (outermost first).
WORLD_DEGREES = ("pp_degree", "dp_replicate_degree", "dp_shard_degree", "cp_degree", "tp_degree")
FILLABLE = ("dp_replicate_degree", "dp_shard_degree")


def resolve_degrees(p: "ParallelSection", world_size: int) -> Degrees:
    """Fill a -1 degree with what is left of the world; raise ConfigError if they do not fit."""
    fixed = {key: getattr(p, key) for key in WORLD_DEGREES}
    for key, value in fixed.items():
        _require(value >= 1 or (value == -1 and key in FILLABLE),
                 f"parallel.{key} = {value} must be at least 1" + (", or -1 to fill the world" if key in FILLABLE else ""))
    _require(p.ep_degree >= 1, f"parallel.ep_degree = {p.ep_degree} must be at least 1")
    fills = [k for k, v in fixed.items() if v == -1]
    _require(len(fills) <= 1, f"only one degree may be -1, not {' and '.join('parallel.' + k for k in fills)}")
    known = math.prod(v for v in fixed.values() if v != -1)
    if fills:
        if world_size % known:
            raise ConfigError(
                f"parallel.{fills[0]} = -1 cannot fill {world_size} worker(s): the other degrees multiply to "
                f"{known}, which does not divide {world_size}"
            )
        fixed[fills[0]] = world_size // known
    degrees = Degrees(
        dp_replicate=fixed["dp_replicate_degree"], dp_shard=fixed["dp_shard_degree"], tp=fixed["tp_degree"],
        pp=fixed["pp_degree"], cp=fixed["cp_degree"], ep=p.ep_degree,
    )
    if degrees.world != world_size:
        product = " x ".join(f"{k.removesuffix('_degree')} {fixed[k]}" for k in WORLD_DEGREES if fixed[k] != 1) or "1"
        others = degrees.world // degrees.dp_replicate
        raise ConfigError(
            f"the parallel degrees multiply to {product} = {degrees.world}, but the job has {world_size} "
            f"worker(s) (--nproc-per-node x --nnodes); they must be equal: for example "
            + (f"parallel.dp_shard_degree = -1 fills the world, or set parallel.dp_replicate_degree = {world_size // others}"
               if world_size % others == 0 else f"make pp x dp_replicate x dp_shard x cp x tp = {world_size}")
        )
    return degrees


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


def validate_moe_layout(cfg: Config) -> None:
    """Mixture of experts and expert parallelism against the rest of the layout."""
    p, t = cfg.parallel, cfg.train
    _require(p.ep_degree >= 1, f"parallel.ep_degree = {p.ep_degree} must be at least 1")
    experts = resolve_model_args(cfg.model).moe_experts
    if experts == 0:
        _require(p.ep_degree == 1, f"parallel.ep_degree = {p.ep_degree} spreads experts, but model.name = "
                 f"{cfg.model.name!r} is dense; use a mixture-of-experts model (model.name = \"debug-moe\", "
                 f"\"tiny-moe\" or model.moe_experts > 0) or parallel.ep_degree = 1")
        return
    # Combinations not built (or not tested) in this version: refused, not silently wrong.
    _require(p.tp_degree == 1, f"parallel.tp_degree = {p.tp_degree} with a mixture-of-experts model is not in this "
             f"version of plait (the tensor-parallel plan covers dense MLPs only); set parallel.tp_degree = 1")
    _require(p.pp_degree == 1, f"parallel.pp_degree = {p.pp_degree} with a mixture-of-experts model is not in this "
             f"version of plait (the balance loss is collected outside the pipeline); set parallel.pp_degree = 1")
    _require(not t.compile, "train.compile = true with a mixture-of-experts model is not in this version of plait "
             "(data-dependent token counts per expert); set train.compile = false")
    if p.ep_degree == 1:
        return
    _require(experts % p.ep_degree == 0, f"parallel.ep_degree = {p.ep_degree} must divide model.moe_experts = "
             f"{experts} (each rank holds the same number of experts); valid: "
             f"{[e for e in range(1, experts + 1) if experts % e == 0]}")
    _require(p.cp_degree == 1, f"parallel.ep_degree = {p.ep_degree} with parallel.cp_degree = {p.cp_degree} is not in "
             f"this version of plait (experts spread over context-parallel ranks is untested); set parallel.cp_degree = 1")
    stage = _zero_stage_for(p.zero_stage, p.dp_shard_degree)
    _require(stage in (2, 3), f"parallel.ep_degree = {p.ep_degree} needs parallel.zero_stage = 2 or 3, not "
             f"{stage}: expert weights are sharded over the ep axis and FSDP averages the dense gradients "
             f"(DDP and ZeRO-1 would average the expert shards too); set parallel.zero_stage = 3")
    _require(not p.cpu_offload, "parallel.cpu_offload = true with parallel.ep_degree > 1 is not in this version of "
             "plait; set parallel.cpu_offload = false")


def validate_layout(cfg: Config, world_size: int | None) -> None:
    """Degrees against each other, the model, the batch and (when known) the number of workers."""
    p, t = cfg.parallel, cfg.train
    if p.cp_degree != 1:
        _validate_context_parallel(cfg)
    if p.ep_degree > 1 and p.dp_shard_degree != -1 and (p.dp_shard_degree * p.cp_degree) % p.ep_degree:
        raise ConfigError(
            f"parallel.ep_degree = {p.ep_degree} must divide parallel.dp_shard_degree x cp_degree = "
            f"{p.dp_shard_degree} x {p.cp_degree} (experts are spread over those ranks); set "
            f"parallel.dp_shard_degree to a multiple of {p.ep_degree}"
        )
    _require(p.zero_stage in (-1, 0, 1, 2, 3), f"parallel.zero_stage = {p.zero_stage} must be -1 (auto), 0, 1, 2 or 3")
    validate_moe_layout(cfg)
    degrees = resolve_degrees(p, world_size or 1) if world_size else None
    if degrees is not None and (degrees.dp_shard * degrees.cp) % degrees.ep:
        raise ConfigError(
            f"parallel.ep_degree = {degrees.ep} must divide the data-parallel shard x context degrees, here "
            f"{degrees.dp_shard} x {degrees.cp} with {world_size} worker(s); set parallel.dp_shard_degree to a "
            f"multiple of {degrees.ep}, or run a multiple of {degrees.ep} workers"
        )
    shard = degrees.dp_shard if degrees else p.dp_shard_degree
    stage = _zero_stage_for(p.zero_stage, shard)
    said = f"{p.zero_stage}" if p.zero_stage != -1 else f"-1 (auto: {stage})"
    if stage and shard == 1:
        raise ConfigError(
            f"parallel.zero_stage = {p.zero_stage} shards over the data-parallel shard axis, but "
            f"parallel.dp_shard_degree = 1; set parallel.dp_shard_degree > 1 (or -1), or parallel.zero_stage = 0"
        )
    if not stage and shard != 1:
        raise ConfigError(
            f"parallel.dp_shard_degree = {p.dp_shard_degree} needs a ZeRO stage to say what is sharded; "
            f"set parallel.zero_stage = 1, 2 or 3 (3 = FSDP), or -1 (auto, the default: 3), or use "
            f"parallel.dp_replicate_degree for plain replicas"
        )
    _require(not p.mixed_precision or stage >= 2,
             f"parallel.mixed_precision = true applies to sharded parameters: it needs parallel.zero_stage = 2 or 3 "
             f"(with parallel.dp_shard_degree > 1), not {said}; for unsharded layouts use train.dtype = \"bf16\"")
    _require(not p.cpu_offload or stage == 3,
             f"parallel.cpu_offload = true needs parallel.zero_stage = 3 (with parallel.dp_shard_degree > 1), not {said}")
    _require(not p.sequence_parallel or p.tp_degree != 1,
             "parallel.sequence_parallel = true needs parallel.tp_degree > 1 (it shards the tensor-parallel norm regions)")
    _require(
        not (p.tp_degree > 1 and t.compile),
        "train.compile = true with parallel.tp_degree > 1 fails inside PyTorch in this version "
        "(compiled DTensor redistribute in backward); set train.compile = false for tensor-parallel runs",
    )
    if p.tp_degree > 1:
        from plait.parallel.tensor_parallel import tensor_parallel_problems

        problems = tensor_parallel_problems(
            resolve_model_args(cfg.model), p.tp_degree, p.sequence_parallel, t.seq_len, cfg.model.vocab_multiple
        )
        if problems:
            raise ConfigError("; ".join(problems))
    if p.pp_degree > 1:
        _check_pipeline(cfg, degrees)
    if degrees is None:
        return
    sequences = t.global_batch_tokens // t.seq_len
    dp = degrees.dp
    if sequences % dp:
        raise ConfigError(
            f"train.global_batch_tokens = {t.global_batch_tokens} is {sequences} sequences, which do not "
            f"split into {dp} data-parallel ranks; set train.global_batch_tokens = "
            f"{math.ceil(sequences / dp) * dp * t.seq_len}"
        )
    per_rank = sequences // dp
    micro = micro_batch_size(t, dp)
    if per_rank % micro:
        options = [b for b in range(1, micro + 1) if per_rank % b == 0]
        raise ConfigError(
            f"train.global_batch_tokens = {t.global_batch_tokens} gives each of {dp} data-parallel ranks "
            f"{per_rank} sequences, not a multiple of train.micro_batch_size = {micro}; set "
            f"train.micro_batch_size = {options[-1]} or train.global_batch_tokens = "
            f"{math.ceil(per_rank / micro) * micro * dp * t.seq_len}"
        )


def _zero_stage_for(zero_stage: int, shard: int) -> int:
    """-1 ("auto") is FSDP (3) over a shard axis (> 1, or -1 before the world is known), else 0."""
    if zero_stage != -1:
        return zero_stage
    return 3 if shard > 1 or shard == -1 else 0


def resolve_zero_stage(p: ParallelSection, world_size: int | None = None) -> int:
    """parallel.zero_stage with -1 ("auto") decided for a job of `world_size` workers."""
    shard = resolve_degrees(p, world_size).dp_shard if world_size else p.dp_shard_degree
    return _zero_stage_for(p.zero_stage, shard)


def with_resolved_zero_stage(cfg: Config, world_size: int) -> Config:
    """A copy of `cfg` whose parallel.zero_stage is the stage that runs (never -1), so the layout
    code, the printout and the saved config.toml all see the same number."""
    parallel = dataclasses.replace(cfg.parallel, zero_stage=resolve_zero_stage(cfg.parallel, world_size))
    return dataclasses.replace(cfg, parallel=parallel)


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


def _validate_context_parallel(cfg: Config) -> None:
    """Context parallelism: shapes it can split, and the layouts it is tested with."""
    from plait.parallel.context_parallel import context_parallel_problems

    p, t = cfg.parallel, cfg.train
    _require(p.cp_degree >= 1, f"parallel.cp_degree = {p.cp_degree} must be at least 1 (1: no context parallelism)")
    problems = context_parallel_problems(resolve_model_args(cfg.model).kv_heads, p.cp_degree, p.cp_method, t.seq_len)
    if problems:
        raise ConfigError("; ".join(problems))
    stage = _zero_stage_for(p.zero_stage, p.dp_shard_degree)
    refused = (
        (p.tp_degree > 1, f"parallel.tp_degree = {p.tp_degree}",
         "tensor parallelism splits the heads that context parallelism's attention exchanges; set parallel.tp_degree = 1"),
        (p.pp_degree > 1, f"parallel.pp_degree = {p.pp_degree}",
         "pipeline stages do not pass the tokens' global positions on; set parallel.pp_degree = 1"),
        (stage == 1, "parallel.zero_stage = 1",
         "use parallel.zero_stage = 0 (DDP over data x context ranks) or 2/3 (FSDP over dp_shard x cp)"),
        (stage >= 2 and p.dp_replicate_degree != 1, f"parallel.dp_replicate_degree = {p.dp_replicate_degree} "
         f"and parallel.zero_stage = {stage} (HSDP)", "use parallel.dp_shard_degree alone for FSDP with context parallelism"),
    )
    for bad, what, fix in refused:
        _require(not bad, f"parallel.cp_degree = {p.cp_degree} with {what} is not supported in this version: {fix}")


def _check_pipeline(cfg: Config, degrees: Degrees | None) -> None:
    """Pipeline rules (the stage split, the schedule's micro-batch needs) and what it composes with."""
    from plait.parallel.pipeline_plan import pipeline_problems

    p, t = cfg.parallel, cfg.train
    dp_total = degrees.dp if degrees else max(p.dp_replicate_degree, 1) * max(p.dp_shard_degree, 1)
    stage = _zero_stage_for(p.zero_stage, degrees.dp_shard if degrees else p.dp_shard_degree)
    if (dp_total > 1 or -1 in (p.dp_shard_degree, p.dp_replicate_degree)) and stage < 2:
        raise ConfigError(
            f"parallel.pp_degree = {p.pp_degree} with data parallelism needs parallel.zero_stage = 2 or 3 "
            f"(FSDP on each stage over the data-parallel axes): DDP and ZeRO-1 are not wired into pipeline "
            f"stages in plait; set parallel.zero_stage = 3 and parallel.dp_shard_degree > 1"
        )
    _require(
        not (t.compile and p.pp_schedule == "zero-bubble"),
        "train.compile = true with parallel.pp_schedule = \"zero-bubble\": PyTorch's zero-bubble schedules split "
        "the backward into input and weight parts, which compiled blocks do not support; set train.compile = false "
        "or another parallel.pp_schedule",
    )
    per_rank = None
    if degrees is not None:
        sequences = t.global_batch_tokens // t.seq_len
        per_rank = sequences // degrees.dp if sequences % degrees.dp == 0 else None
    micro = micro_batch_size(t, degrees.dp) if degrees is not None else t.micro_batch_size
    problems = pipeline_problems(
        resolve_model_args(cfg.model), p.pp_degree, p.pp_schedule, p.pp_microbatches, p.pp_virtual_stages, per_rank, micro
    )
    if problems:
        raise ConfigError("; ".join(problems))


def micro_batch_size(t: "TrainSection", dp: int) -> int:
    """Sequences per forward on one rank: train.micro_batch_size, or a rank's whole share of the
    step when that is smaller (so a config keeps working as ranks are added)."""
    return min(t.micro_batch_size, t.global_batch_tokens // t.seq_len // dp)


def resolve_model_args(m: ModelSection, tokenizer_vocab: int | None = None) -> "ModelArgs":
    """The named size with this section's overrides applied, shape rules checked.

    `tokenizer_vocab` is the tokenizer's vocabulary when known: the embedding then has at least
    that many rows (padded up to `vocab_multiple` when the size does not fix the vocabulary).
    """
    from plait.model.sizes import NAMED_SIZES

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
