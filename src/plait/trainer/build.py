"""Everything a run decides before step 1, in one place: the data, the model and its layout, the
optimizer, the loader, and where training resumes from (`build_run` -> `Run`).

Order and why: the mesh first (a collective every rank joins at once); the data next, because
the tokenizer fixes the vocabulary and so the model's shape (rank 0 fills the token cache, the
others then read it instead of tokenizing the corpus again); the model on the meta device,
materialised from the seed, optionally overwritten by a Hugging Face model, and only then
transformed for the layout (`plait.parallel.parallelize`); the checkpoint last, loaded into the
transformed model and optimizer. The run directory's config.toml is written only after a resume
succeeded, so that a refused resume leaves the directory as it was.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from plait.checkpoint import latest_checkpoint, refuse_checkpoints_without_resume
from plait.checkpoint.hf import init_model_from
from plait._version import __version__
from plait.checkpoint.sharded import (
    CheckpointError,
    Checkpointer,
    find_intact,
    model_chunks,
    optimizer_chunks,
    optimizer_groups,
    remove_unfinished,
    restore,
    rng_chunks,
)
from plait.config import Config, ConfigError
from plait.data import DataBundle, TrainLoader, build_data, save_tokenizer
from plait.model import ModelArgs, build_model, materialize
from plait.parallel.apply import Parallelized, parallelize
from plait.parallel.job import DistInfo, barrier
from plait.parallel.mesh import build_mesh
from plait.trainer.device import autocast_for, pick_dtype
from plait.trainer.record import Derived, derive, resolved_config, write_run_config
from plait.validation import ResolvedRun, resolve_model_args


@dataclass
class Run:
    """A run ready for its first (or next) step."""

    cfg: Config  # the model's shape written out
    args: ModelArgs
    derived: Derived
    data: DataBundle
    par: Parallelized  # the model under its layout, its optimizer, the step's forward/backward
    loader: TrainLoader
    checkpointer: Checkpointer
    dist: DistInfo
    step: int = 0  # the last finished step (from the checkpoint when resumed)
    tokens_seen: int = 0
    resumed_from: Path | None = None
    early_log: list[str] = dataclasses.field(default_factory=list)  # said once the progress display exists

    @property
    def device(self) -> torch.device:
        return self.dist.device


def build_run(resolved: ResolvedRun, dist_info: DistInfo) -> Run:
    cfg, layout, main = resolved.config, resolved.layout, dist_info.is_main
    mesh = build_mesh(layout, dist_info.device)
    run_dir = cfg.run_dir
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    if not main:
        barrier(dist_info)
    data = build_data(cfg.data)
    if main:
        barrier(dist_info)
    args = resolve_model_args(cfg.model, data.tokenizer.vocab_size)
    derived = derive(cfg, layout, args, str(dist_info.device), pick_dtype(cfg.train.dtype, dist_info.device))
    cfg = resolved_config(cfg, args)

    torch.manual_seed(cfg.run.seed)
    module = materialize(build_model(args), dist_info.device, cfg.run.seed)
    if cfg.model.init_from and latest_checkpoint(run_dir) is None:  # a checkpoint, when there is one, wins
        init_model_from(module, cfg.model.init_from)  # whole weights, before any parallel layout
    par = parallelize(module, mesh, cfg.optim, cfg.train.seq_len, derived.accumulation_steps, dist_info.device,
                      autocast_for(dist_info.device, derived.dtype))
    loader = TrainLoader(data.train, cfg.train.seq_len, derived.sequences_per_step, dp_rank=mesh.dp_rank(),
                         dp_degree=layout.dp, seed=cfg.run.seed)
    checkpointer = Checkpointer(run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.async_save,
                                dist_info.world_size > 1, print)
    run = Run(cfg, args, derived, data, par, loader, checkpointer, dist_info)
    _resume(run)
    if main:  # only now, so that a refused resume leaves the run directory as it was
        write_run_config(run_dir, cfg, derived)
        save_tokenizer(data.tokenizer, run_dir)
    return run


def _resume(run: Run) -> None:
    """Load the newest intact checkpoint of the run directory, if there is one."""
    cfg, dist_info, run_dir = run.cfg, run.dist, run.cfg.run_dir
    refuse_checkpoints_without_resume(run_dir, cfg.checkpoint.resume)
    if dist_info.is_main:
        run.early_log += remove_unfinished(run_dir)
    try:
        checkpoint = find_intact(run_dir, run.early_log.append, dist_info.rank, dist_info.world_size,
                                 run.checkpointer.group)
    except CheckpointError as err:
        raise ConfigError(f"cannot resume run.dir = {str(run_dir)!r}: {err}") from None
    if checkpoint is None:
        return
    shapes = {name: p.shape for name, p in build_model(run.args).state_dict().items()}  # meta: free
    try:
        restored = restore(checkpoint, run.par.model, run.par.optimizer, shapes, dist_info.rank,
                           run.checkpointer.group, dist_info.world_size > 1)
        if restored["loader"] is not None:  # None: a weights-only (imported) checkpoint
            run.loader.load_state_dict(restored["loader"])
    except ValueError as err:  # a different model or data shape than the one saved
        raise ConfigError(
            f"cannot resume run.dir = {str(run_dir)!r} from {checkpoint.name}: {err}. "
            f"Use a new --run.dir for a different config"
        ) from None
    run.step, run.tokens_seen, run.resumed_from = int(restored["step"]), int(restored["tokens_seen"]), checkpoint


def save_checkpoint(run: Run, step: int) -> None:
    """Every rank writes its own part of the state (a collective; see plait.checkpoint.sharded)."""
    par, loader, dp = run.par, run.loader, run.par.layout.dp
    chunks = {**model_chunks(par.model), **optimizer_chunks(par.model, par.optimizer), **rng_chunks(run.dist.rank)}
    manifest: dict[str, Any] = {
        "plait_version": __version__, "tokens_seen": run.tokens_seen, "world_size": run.dist.world_size,
        "layout": dataclasses.asdict(par.layout),  # for the record: a checkpoint loads under any layout
        # One global position: every data-parallel rank of any layout takes its share of it.
        "loader": loader.state_dict(),
        "loader_ranks": [loader.sequences_consumed + r * loader.local_batch_sequences for r in range(dp)],
        "optimizer_groups": optimizer_groups(par.optimizer), "config": run.cfg.to_dict(),
    }
    run.checkpointer.save(step, chunks, manifest)

