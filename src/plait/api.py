"""The Python API under the CLI: `train(config)` and `load(run_dir)`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from plait.config import Config
from plait.validation import ResolvedRun, build_config, resolve_model_args, resolve_run, validate

if TYPE_CHECKING:
    from plait.model import Transformer
    from plait.trainer import TrainResult


def train(config: Config | None = None, **overrides: object) -> "TrainResult":
    """Train the run `config` describes (default: the built-in default run).

    Keyword overrides use "section__key" names: `plait.train(train__steps=100)`. The config is
    validated here, once, for the job's workers (one process, or each worker of a torchrun job);
    with `parallel.auto = true` the layout is planned first (`plan_for_job`; under a torchrun of
    several workers that needs `parallel.cluster_profile`).
    """
    from plait.config import set_value
    from plait.parallel.job import launched_local_world_size, launched_rank, launched_world_size
    from plait.trainer import train as run_training

    cfg = config if config is not None else Config()
    for key, value in overrides.items():
        set_value(cfg, key.replace("__", "."), value)
    world = launched_world_size()
    # Under torchrun (world > 1) a restart of the job must resume from the checkpoints it wrote:
    # there the trainer's own check applies; in one process refuse before a plan is written.
    run = resolve_for_job(cfg, world, launched_local_world_size(), shared=world > 1,
                          announce=launched_rank() == 0, guard_checkpoints=world == 1)
    return run_training(run)


def resolve_for_job(cfg: Config, world: int, local_workers: int, *, shared: bool, announce: bool,
                    guard_checkpoints: bool) -> ResolvedRun:
    """`cfg` validated and resolved for a job of `world` workers, `local_workers` per node: the
    one check of a config at an entry point (`plait.train`, and `plait train`'s launcher).

    With `parallel.auto` the layout is planned first (`plan_for_job`; `shared`: several processes
    plan this job, so they need one profile), and `announce` prints the plan and writes plan.txt.
    `guard_checkpoints`: refuse a run directory holding checkpoints under `checkpoint.resume =
    false` here, before anything (a plan, a measured profile) is written into it."""
    if cfg.parallel.auto:
        validate(cfg, world)  # the fields and the pins first, so that a bad key is named as such
    else:
        run = resolve_run(cfg, world)
    if guard_checkpoints:
        from plait.checkpoint import refuse_checkpoints_without_resume

        refuse_checkpoints_without_resume(cfg.run_dir, cfg.checkpoint.resume)
    if cfg.parallel.auto:
        from plait.autoplan import plan_for_job

        planned = plan_for_job(cfg, world, local_workers, shared=shared)
        if announce:
            planned.write(echo=cfg.run.progress != "none")
        run = planned.run
    return run


@dataclass
class LoadedRun:
    """A trained model with its tokenizer and config, ready to sample or evaluate."""

    model: "Transformer"
    tokenizer: object
    config: Config
    step: int
    path: Path

    def generate(self, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = 50, seed: int = 0) -> str:
        """The prompt followed by sampled text (stops early at the document separator)."""
        from plait.model import generate

        tok = self.tokenizer
        ids = generate(
            self.model, tok.encode(prompt), max_new_tokens, temperature=temperature, top_k=top_k,
            seed=seed, stop_id=tok.eos_id, vocab_limit=tok.vocab_size,
        )
        return prompt + tok.decode(ids)


def load(run_dir: str | Path, step: int | None = None, device: str = "cpu") -> LoadedRun:
    """The model of a run directory at its `latest` checkpoint (or at `step`), in eval mode."""
    import torch

    from plait.checkpoint import checkpoint_dir, latest_checkpoint, load_model_weights, read_manifest
    from plait.data import load_tokenizer_dir
    from plait.model import build_model, materialize

    run_dir = Path(run_dir)
    config_file = run_dir / "config.toml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.toml: is it a plait run directory?")
    # The weights come from the checkpoint: a model.init_from directory is neither needed nor checked.
    cfg = build_config(str(config_file), ["--model.init_from="])
    tokenizer = load_tokenizer_dir(run_dir)
    if step is None:
        path = latest_checkpoint(run_dir)
        if path is None:
            raise FileNotFoundError(f"{run_dir} has no complete checkpoint under {checkpoint_dir(run_dir)}")
    else:
        path = checkpoint_dir(run_dir) / f"step_{step}"
    saved_step = int(read_manifest(path)["step"])
    args = resolve_model_args(cfg.model, tokenizer.vocab_size)
    model = materialize(build_model(args), torch.device(device), cfg.run.seed)
    load_model_weights(path, model)
    model.eval()
    return LoadedRun(model=model, tokenizer=tokenizer, config=cfg, step=saved_step, path=path)
