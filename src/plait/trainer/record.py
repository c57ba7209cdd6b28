"""What a run records about itself before step 1: the numbers derived from the config, the
layout and the model (printed at start, written into `RUN_DIR/config.toml`'s header), and the
resolved config with the model's shape written out."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from plait.config import Config, to_toml
from plait.layout import Layout
from plait.model import ModelArgs, count_params, flops_per_token


@dataclass(frozen=True)
class Derived:
    """Numbers computed once from the config, the layout and the model."""

    tokens_per_step: int
    sequences_per_step: int
    micro_batch_size: int
    accumulation_steps: int
    dp_degree: int
    params: int
    flops_per_token: float
    dtype: str
    device: str

    def lines(self) -> list[str]:
        return [f"{f.name} = {getattr(self, f.name)!r}" for f in dataclasses.fields(self)]


def derive(cfg: Config, layout: Layout, args: ModelArgs, device: str, dtype: str) -> Derived:
    """The step's shape: tokens and sequences per step, sequences per forward (the layout's
    micro-batch, which the pipeline's micro-batch count may have set), accumulation steps."""
    t = cfg.train
    sequences = t.global_batch_tokens // t.seq_len
    return Derived(
        tokens_per_step=t.global_batch_tokens,
        sequences_per_step=sequences,
        micro_batch_size=layout.micro_batch_size,
        accumulation_steps=sequences // (layout.micro_batch_size * layout.dp),
        dp_degree=layout.dp,
        params=count_params(args).total,
        flops_per_token=flops_per_token(args, t.seq_len, recompute=layout.activation_checkpointing),
        dtype=dtype,
        device=device,
    )


def resolved_config(cfg: Config, args: ModelArgs) -> Config:
    """The config with the model's shape written out, so the saved file rebuilds the same model
    even if a named size changes in a later plait version."""
    model = dataclasses.replace(
        cfg.model, layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
        mlp=args.mlp, ffn_hidden=args.ffn, vocab=args.vocab, tie_embeddings=args.tie_embeddings,
        rope_theta=args.rope_theta, rope_scaling_factor=args.rope_scaling_factor, norm_eps=args.norm_eps,
    )
    if args.moe_experts > 0:  # dense runs keep these unset
        model = dataclasses.replace(
            model, moe_experts=args.moe_experts, moe_top_k=args.moe_top_k, moe_ffn_hidden=args.moe_ffn,
            moe_capacity_factor=args.moe_capacity_factor, moe_aux_loss_coef=args.moe_aux_loss_coef,
        )
    return dataclasses.replace(cfg, model=model)


def write_run_config(run_dir: Path, cfg: Config, derived: Derived) -> Path:
    header = ["# Resolved by plait; `plait train --config` accepts this file as is.", "# Derived:"]
    header += [f"#   {line}" for line in derived.lines()]
    path = Path(run_dir) / "config.toml"
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text("\n".join(header) + "\n\n" + to_toml(cfg.to_dict()))
    tmp.replace(path)
    return path


def config_lines(cfg: Config) -> list[str]:
    """The resolved config, one line per section, for the start-of-run printout."""
    return [
        f"[{section}] " + " ".join(f"{key}={value!r}" for key, value in values.items())
        for section, values in cfg.to_dict().items()
    ]
