"""The planner: predict memory and speed of every layout of a model on a cluster, pick the best
that fits, explain why, and write the `[parallel]` plan `plait train` reads (docs/planner.md).

Pure Python (no torch), so that it answers for 16,384 GPUs on a laptop. The cluster it plans for
is `plait.hardware`'s; measuring a machine is `plait.measure`'s, and planning at `plait train`
start-up (`parallel.auto`) is `plait.autoplan`'s: both sit above the planner and import it.
"""

from __future__ import annotations

from typing import Any

from plait.config import Config, ConfigError, ModelSection
from plait.layout import Layout, Workload
from plait.planner.types import Candidate, MemoryEstimate, TimeEstimate
from plait.validation import resolve_model_args

__all__ = ["Candidate", "Layout", "MemoryEstimate", "TimeEstimate", "Workload", "workload_from_config", "model_keys"]


def tokenizer_vocab(cfg: Config) -> int | None:
    """The vocabulary `data.tokenizer` will give, when it is known without loading anything."""
    if cfg.data.tokenizer == "byte":
        return 256
    if cfg.data.tokenizer == "bpe":
        return cfg.data.bpe_vocab
    return None


def workload_from_config(cfg: Config, seq_len: int | None = None, global_batch_sequences: int | None = None,
                         dtype: str = "bf16") -> Workload:
    """The workload a config trains: its model (named size + `model.*` overrides, vocabulary
    resolved), sequence length and global batch (the config's unless given)."""
    known = tokenizer_vocab(cfg)
    args = resolve_model_args(cfg.model, known)
    if args.vocab is None:
        raise ConfigError(f"data.tokenizer = {cfg.data.tokenizer!r} does not say its vocabulary before it is "
                          f"loaded; set model.vocab (e.g. --model.vocab=32000) for the plan")
    seq = seq_len if seq_len is not None else cfg.train.seq_len
    if seq < 1:
        raise ConfigError(f"--seq-len = {seq} must be at least 1")
    if global_batch_sequences is None:
        if cfg.train.global_batch_tokens % seq:
            raise ConfigError(f"train.global_batch_tokens = {cfg.train.global_batch_tokens} is not a multiple of the "
                              f"sequence length {seq}; use {max(seq, cfg.train.global_batch_tokens // seq * seq)}")
        global_batch_sequences = cfg.train.global_batch_tokens // seq
    if global_batch_sequences < 1:
        raise ConfigError(f"the global batch is {global_batch_sequences} sequences; it must be at least 1")
    return Workload(model=args, seq_len=seq, global_batch_sequences=global_batch_sequences, dtype=dtype)  # type: ignore[arg-type]


def model_keys(cfg: Config) -> dict[str, Any]:
    """The `[model]` keys a config sets (its name, and what differs from the defaults)."""
    default = ModelSection()
    keys = {k: v for k, v in cfg.to_dict()["model"].items() if k == "name" or v != getattr(default, k)}
    return keys
