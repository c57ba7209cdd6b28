"""Everything the loop needs decided before step 1: device, precision, derived batch numbers,
the run directory and its config.toml."""

from __future__ import annotations

import dataclasses
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from plait.config import Config, ConfigError, micro_batch_size, to_toml
from plait.model import ModelArgs, count_params, flops_per_token


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device = {name!r} is not a device; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {name!r} but this machine has no CUDA GPU; use auto or cpu")
    return device


def pick_dtype(name: str, device: torch.device) -> str:
    """"auto" is bf16 on a GPU and fp32 on a CPU: without AMX, a CPU's bf16 matmul is slower than
    its fp32 one (measured: 100 vs 220 GFLOP/s on a 2-core AVX-512 Xeon), see docs/training.md."""
    if name != "auto":
        return name
    return "bf16" if device.type == "cuda" else "fp32"


@dataclass(frozen=True)
class Derived:
    """Numbers computed once from the config and the model, printed and saved with the run."""

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


def derive(cfg: Config, args: ModelArgs, device: torch.device, dp_degree: int = 1) -> Derived:
    t = cfg.train
    sequences = t.global_batch_tokens // t.seq_len
    micro = micro_batch_size(t, dp_degree)
    if cfg.parallel.pp_degree > 1:  # the pipeline's micro-batch count (parallel.pp_microbatches) sets the split
        from plait.parallel.pipeline_plan import pipeline_microbatches

        micro = sequences // dp_degree // pipeline_microbatches(cfg.parallel.pp_microbatches, sequences // dp_degree, micro, cfg.parallel.pp_degree)
    accumulation = sequences // (micro * dp_degree)
    return Derived(
        tokens_per_step=t.global_batch_tokens,
        sequences_per_step=sequences,
        micro_batch_size=micro,
        accumulation_steps=accumulation,
        dp_degree=dp_degree,
        params=count_params(args).total,
        flops_per_token=flops_per_token(args, t.seq_len, recompute=t.activation_checkpointing),
        dtype=pick_dtype(t.dtype, device),
        device=str(device),
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


def memory_bytes(device: torch.device) -> int:
    """Peak memory: allocated GPU memory on CUDA, the process's peak resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def config_lines(cfg: Config) -> list[str]:
    """The resolved config, one line per section, for the start-of-run printout."""
    return [
        f"[{section}] " + " ".join(f"{key}={value!r}" for key, value in values.items())
        for section, values in cfg.to_dict().items()
    ]
