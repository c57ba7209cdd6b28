"""`parallel.auto = true`: `plait train` runs the planner at start-up and trains its best layout.

It sits between the entry points (`cli.py`, `api.py`) and the planner, outside the pure-Python
planner because a start-up may measure this machine (`plait.measure.calibrate`) when there is no
profile, and asks torch whether CUDA is there.

`plan_for_job(cfg, world_size, local_workers)` turns a config into the one `plait train` runs: the
whole `[parallel]` section and the `[train]` keys a layout fixes (micro-batch, activation
checkpointing) come from the best layout that fits, on

- the cluster profile at `parallel.cluster_profile`, with its worker counts replaced by the
  job's (the job's workers per node are the node: that is where its fast link is); or
- without one, a profile of this machine measured now with the job's workers in a few seconds
  (`QUICK_*` below) and written to `RUN_DIR/cluster.toml`, where the next start of the run finds
  it again while its worker count matches (so a resumed run plans the same layout).

The keys the user set are pins (`pinned_keys`). The answer is resolved by `plait train`'s own
`resolve_run` before any worker starts (`AutoPlan.run`, what the trainer takes); the chosen layout
is what the run records (`auto = false`).

torch is imported only by `_calibrate_here` (its workers) and `on_gpu` (asks whether CUDA is there).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from plait.config import Config, ConfigError, ParallelSection, TrainSection, set_value
from plait.hardware.devices import Cluster
from plait.hardware.profile import load_profile
from plait.validation import ResolvedRun, resolve_run
from plait.planner import workload_from_config
from plait.planner import explain
from plait.planner.search import PlanError, plan
from plait.layout import Workload
from plait.planner.types import Candidate

PROFILE_NAME = "cluster.toml"  # in the run directory, when measured at start-up
PLAN_NAME = "plan.txt"  # in the run directory: the explanation of the choice
TOP = 3  # layouts shown

KB, MB = 2**10, 2**20
# Start-up calibration: a few points, ~20 ms each, so that 2 CPU workers on a 2-core machine
# measure in about 8 s (the full `plait plan --calibrate` takes longer). On a CPU the messages stop
# at 2 MB (gloo over loopback is latency-bound below ~100 KB, so three sizes still fix both terms);
# on GPUs they go to 64 MB, where NVLink's bandwidth shows. Matmuls of 256 and 512 on a CPU; the
# GPU default sizes otherwise (they take milliseconds).
QUICK_MESSAGE_BYTES_CPU = (4 * KB, 256 * KB, 2 * MB)
QUICK_MESSAGE_BYTES_GPU = (64 * KB, 4 * MB, 64 * MB)
QUICK_MATMUL_SIZES_CPU = (256, 512)
QUICK_SECONDS_PER_POINT = 0.02

# The [parallel] keys that are pins when set (config name -> the planner's pin key).
PARALLEL_PINS = {
    "dp_replicate_degree": "dp_replicate", "dp_shard_degree": "dp_shard", "zero_stage": "zero_stage",
    "tp_degree": "tp", "sequence_parallel": "sequence_parallel", "cpu_offload": "cpu_offload", "pp_degree": "pp",
    "pp_schedule": "pp_schedule", "pp_virtual_stages": "pp_virtual_stages", "cp_degree": "cp",
    "cp_method": "cp_method", "ep_degree": "ep",
}
TRAIN_PINS = {"micro_batch_size": "micro_batch_size", "activation_checkpointing": "activation_checkpointing"}
# train.compile = true is a pin the plan keeps but never sets: the layouts it does not compose with
# (tensor parallelism, the zero-bubble schedule, experts) are left out of the search.
COMPILE_PIN = {"compile": "compile"}
# Set by the plan from the rest: bf16 sharded parameters follow the precision and the ZeRO stage,
# the pipeline's micro-batches follow train.micro_batch_size.
PLANNED_ONLY = {
    "mixed_precision": "the plan turns it on for ZeRO-2/3 layouts that train in bf16",
    "pp_microbatches": "the plan runs one pipeline micro-batch per train.micro_batch_size (pin that instead)",
}
FILLS = ("dp_replicate_degree", "dp_shard_degree")  # -1 fills the world: not a pin


@dataclass
class AutoPlan:
    """The planner's answer for one job: the config to train, and what it was chosen from."""

    run: ResolvedRun  # the resolved config ([parallel] and the layout's [train] keys filled, auto = false) and layout
    candidates: list[Candidate]  # the best TOP layouts, best first (all fit)
    workload: Workload
    cluster: Cluster  # the profile as the job sees it (its workers)
    pins: dict[str, Any]  # "section.key" -> value the user fixed
    calibrated: bool  # the profile was measured at this start

    @property
    def chosen(self) -> Candidate:
        return self.candidates[0]

    @property
    def config(self) -> Config:
        return self.run.config

    def context(self) -> str:
        how = "measured at start-up" if self.calibrated else "profile"
        pins = ", ".join(f"{k} = {_fmt(v)}" for k, v in self.pins.items()) or "none"
        return (f"parallel.auto: planned for {self.cluster.gpus} worker(s), {self.cluster.gpus_per_node} per node, "
                f"on {self.config.parallel.cluster_profile} ({how}); pinned: {pins}")

    def chosen_keys(self) -> str:
        """The keys the choice sets, those of [parallel] that differ from the defaults."""
        default = ParallelSection()
        p, t = self.config.parallel, self.config.train
        keys = [f"parallel.{k} = {_fmt(getattr(p, k))}" for k in self.chosen.layout.parallel_section()
                if getattr(p, k) != getattr(default, k)]
        keys += [f"train.{k} = {_fmt(getattr(t, k))}" for k in TRAIN_PINS]
        return ", ".join(keys)

    def summary(self) -> str:
        """A few lines for the start of the run: the top layouts and the choice."""
        return "\n".join([self.context(), explain.header(self.workload, self.cluster), "",
                          explain.table(self.candidates), "",
                          f"chosen: {self.chosen.layout.short()}: {self.chosen_keys()}"])

    def text(self) -> str:
        """The whole explanation (RUN_DIR/plan.txt): what was planned on, the table, the choice's
        memory and step-time breakdowns, why the runner-up lost, and the keys it sets."""
        return "\n".join([self.context(), explain.explain(self.candidates, self.workload, self.cluster),
                          "", f"config: {self.chosen_keys()}"]) + "\n"

    def write(self, echo: bool = True) -> Path:
        """Write RUN_DIR/plan.txt, and print the summary when `echo`."""
        run_dir = self.config.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / PLAN_NAME
        path.write_text(self.text())
        if echo:
            print(f"{self.summary()}\n(the breakdown: {path})", flush=True)
        return path


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) else str(value)


def pinned_keys(cfg: Config) -> dict[str, Any]:
    """The layout keys the user fixed ("section.key" -> value): every [parallel] key set to a
    non-default value (a -1 data-parallel degree fills the world: no pin), and
    train.micro_batch_size / train.activation_checkpointing when not default. A default value
    cannot be told from an unset one, so it pins nothing. The keys the plan sets from the others
    (`PLANNED_ONLY`) raise ConfigError when set."""
    parallel, train = ParallelSection(), TrainSection()
    for key, why in PLANNED_ONLY.items():
        value = getattr(cfg.parallel, key)
        if value != getattr(parallel, key):
            raise ConfigError(f"parallel.{key} = {_fmt(value)} with parallel.auto = true: {why}; drop "
                              f"parallel.{key}, or set parallel.auto = false and give the whole layout")
    pins = {f"parallel.{key}": getattr(cfg.parallel, key) for key in PARALLEL_PINS
            if getattr(cfg.parallel, key) != getattr(parallel, key) and not (key in FILLS and getattr(cfg.parallel, key) == -1)}
    pins.update({f"train.{key}": getattr(cfg.train, key) for key in {**TRAIN_PINS, **COMPILE_PIN}
                 if getattr(cfg.train, key) != getattr(train, key)})
    return pins


def planner_pins(pins: dict[str, Any]) -> dict[str, Any]:
    """Config pins ("parallel.tp_degree") as the planner's (`tp`)."""
    names = {**{f"parallel.{k}": v for k, v in PARALLEL_PINS.items()},
             **{f"train.{k}": v for k, v in {**TRAIN_PINS, **COMPILE_PIN}.items()}}
    return {names[key]: value for key, value in pins.items()}


def on_gpu(cfg: Config) -> bool:
    """Whether the job trains on GPUs: train.device "cpu" no, "auto" when CUDA is there, and
    "cuda" yes (refused here, as the trainer would, on a machine without CUDA)."""
    if cfg.train.device == "cpu":
        return False
    import torch

    if cfg.train.device != "auto" and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {cfg.train.device!r} but this machine has no CUDA GPU; use auto or cpu")
    return torch.cuda.is_available()


def job_cluster(profile: Cluster, world_size: int, local_workers: int) -> Cluster:
    """`profile` for this job: `world_size` workers, `local_workers` per node.

    A node is the job's workers on one machine, not the profile's count: a profile measured with 2
    workers describes the links between processes of that machine, and a job of 4 there still has
    all 4 on the fast link (calibration writes the inter-node link equal to the intra-node one
    anyway). A CPU's memory is shared by its workers: a CPU profile holds the share of each of
    the workers it was measured with, rescaled here to the job's count."""
    device = profile.device
    if device.name == "cpu" and local_workers != profile.gpus_per_node:
        device = replace(device, memory_bytes=device.memory_bytes * profile.gpus_per_node // local_workers)
    return replace(profile, device=device, gpus=world_size, gpus_per_node=local_workers)


def plan_for_job(cfg: Config, world_size: int, local_workers: int | None = None, *, shared: bool = False,
                 gpu: bool | None = None) -> AutoPlan:
    """The config `plait train` runs for `cfg` (with parallel.auto = true) on `world_size` workers,
    `local_workers` per node (default all), and its explanation.

    `shared`: several processes plan this same job (every worker under an external torchrun, the
    launcher of each node): they must reach the same layout, so they need one profile, named by
    parallel.cluster_profile (the plan is deterministic given it); measuring on each would not
    agree. `gpu`: whether the job trains on GPUs (default: `on_gpu(cfg)`).

    Raises ConfigError when nothing fits, when no layout matches the pins, or when the profile
    is missing or wrong; each message names the key and the fix."""
    assert cfg.parallel.auto, "plan_for_job plans configs with parallel.auto = true"
    local = world_size if local_workers is None else local_workers
    if world_size < 1 or local < 1 or world_size % local:
        raise ConfigError(f"the job has {world_size} worker(s), {local} per node; each node must run the same "
                          f"number (--nproc-per-node)")
    gpu = on_gpu(cfg) if gpu is None else gpu
    pins = pinned_keys(cfg)
    profile_path, profile, calibrated = _profile(cfg, local, shared, gpu)
    cluster = job_cluster(profile, world_size, local)
    workload = workload_from_config(cfg, dtype="bf16" if gpu and cfg.train.dtype != "fp32" else "fp32")
    try:
        cands = plan(workload, cluster, planner_pins(pins), top=TOP)
    except PlanError as err:
        raise ConfigError(f"parallel.auto = true: {err}") from None
    if not cands:
        said = f"the pinned {', '.join(f'{k} = {_fmt(v)}' for k, v in pins.items())}" if pins else "this config"
        raise ConfigError(
            f"parallel.auto = true: no layout plait train accepts matches {said} for model.name = "
            f"{cfg.model.name!r} on {world_size} worker(s) ({local} per node); "
            + ("drop a pin or change it (the degrees multiply to the workers, tp stays within a node and divides "
               "the heads, the batch splits over the data-parallel ranks)" if pins else
               f"run a number of workers that divides the batch ({workload.global_batch_sequences} sequences) "
               f"or change train.global_batch_tokens")
        )
    if not cands[0].fits:
        unpin = f" Or drop pins ({', '.join(pins)})." if pins else ""
        raise ConfigError(
            f"parallel.auto = true: {explain.nothing_fits(cands, workload, cluster, for_train=True)}{unpin} The "
            f"device and its memory are from parallel.cluster_profile = {str(profile_path)!r}."
        )
    resolved = _resolved(cfg, cands[0], pins, profile_path)
    try:  # the fields were checked before planning; the layout is resolved as plait train resolves it
        run = resolve_run(resolved, world_size, fields_checked=True)
    except ConfigError as err:  # the search keeps what the same rules accept: a difference is a planner bug
        raise ConfigError(f"parallel.auto = true chose {cands[0].layout.short()}, which plait train refuses: {err}; "
                          f"please report it, and pin the layout meanwhile (e.g. with `plait plan --write`)") from None
    return AutoPlan(run=run, candidates=cands, workload=workload, cluster=cluster, pins=pins, calibrated=calibrated)


def _resolved(cfg: Config, best: Candidate, pins: dict[str, Any], profile_path: Path) -> Config:
    """`cfg` with the layout's [parallel] and [train] keys. A pinned knob the layout does not use
    (a pipeline schedule without a pipeline, a context method without context parallelism) keeps
    the user's value; every other pin equals the layout's by construction."""
    values = {f"parallel.{k}": v for k, v in best.layout.parallel_section().items()}
    values.update({f"train.{k}": v for k, v in best.layout.train_section().items()})
    values.update(pins)
    values.update({"parallel.auto": False, "parallel.cluster_profile": str(profile_path)})
    out = copy.deepcopy(cfg)
    for key, value in values.items():
        set_value(out, key, value)
    return out


def _profile(cfg: Config, local: int, shared: bool, gpu: bool) -> tuple[Path, Cluster, bool]:
    """(path, profile, measured now): parallel.cluster_profile, else RUN_DIR/cluster.toml when its
    worker count and device kind match this job, else a new measurement written there."""
    if cfg.parallel.cluster_profile:
        path = Path(cfg.parallel.cluster_profile)
        if not path.is_file():
            raise ConfigError(f"parallel.cluster_profile = {str(path)!r}: no such file; write one with "
                              f"`plait plan --calibrate --workers N --out {path}`, or leave the key empty to "
                              f"measure this machine at start-up")
        try:
            return path, load_profile(path), False
        except ConfigError as err:
            raise ConfigError(f"parallel.cluster_profile = {str(path)!r}: {err}") from None
    if shared:
        raise ConfigError(
            "parallel.auto = true without parallel.cluster_profile measures this machine at start-up, but "
            "several processes plan this job (each worker under torchrun, or each node's launcher), and "
            "their measurements would not agree; write a profile once with `plait plan --calibrate --workers N "
            "--out cluster.toml` and set --parallel.cluster_profile=cluster.toml (the same file on every node), "
            "or start one node with plait train --nproc-per-node N"
        )
    path = cfg.run_dir / PROFILE_NAME
    if path.is_file():
        try:
            found = load_profile(path)
        except ConfigError:
            found = None  # unreadable: measure again
        if found is not None and found.gpus == local and (found.device.name != "cpu") == gpu:
            return path, found, False
    return path, _calibrate_here(local, path, gpu), True


def _calibrate_here(workers: int, path: Path, gpu: bool) -> Cluster:
    """Measure this machine with `workers` processes (quick settings) and write the profile."""
    from plait.measure.calibrate import calibrate

    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"parallel.auto: measuring this machine with {workers} worker(s) for the plan ...", flush=True)
    with _loopback_sockets():
        return calibrate(
            workers, path,
            message_bytes=QUICK_MESSAGE_BYTES_GPU if gpu else QUICK_MESSAGE_BYTES_CPU,
            matmul_sizes=None if gpu else QUICK_MATMUL_SIZES_CPU,
            seconds_per_point=QUICK_SECONDS_PER_POINT,
        )


@contextlib.contextmanager
def _loopback_sockets() -> Iterator[None]:
    """The measuring workers' gloo and NCCL sockets on the loopback interface, as a one-node job's
    (plait.launch): nothing listens on another interface. What the user set wins."""
    from plait.launch import loopback_interface

    added = [key for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if key not in os.environ]
    lo = loopback_interface()
    for key in added:
        os.environ[key] = lo
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)
