"""The search: every layout `plait train` accepts for a workload on a cluster, and the best that fit.

Pure Python. `enumerate_layouts` walks the degrees (tp, cp, pp, the data-parallel split and its
ZeRO stage, ep) and the knobs (sequence parallelism, schedule and virtual stages, context method,
offload, micro-batch, activation checkpointing) and keeps those that pass `plait.layout.rules`,
the rules `plait train` validates with (tests/unit/test_layout_rules.py checks that both agree on
every emitted layout). `check_layout` (check.py) applies the same rules to one layout given from
outside the search (`candidate()` calls it: the estimators price any layout).
`plan` estimates memory and time, drops what does not fit (device memory, and host memory per
node for CPU offload and the "cpu" device: `memory_fits`) and ranks the rest by predicted
tokens/s per GPU.

Pruning keeps 16,384 GPUs answerable in seconds: degrees are divisors of the world (tp within a
node, cp and micro-batches powers of two), and the knobs of a set of degrees are only timed when
its most frugal variant (smallest micro-batch, checkpointing on) fits.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any

from plait.hardware.devices import Cluster
from plait.model.flops import flops_per_token
from plait.planner.memory import estimate_memory, memory_fits, memory_ratios
from plait.planner.check import PlanError, check_layout, pinned_layout
from plait.planner.timing import estimate_time
from plait.layout import CP_METHODS, Layout, Workload
from plait.layout.rules import micro_batch_problem, structure_problem
from plait.planner.types import Candidate

MAX_MICRO_BATCH = 32  # sequences per forward; beyond this the time model gains nothing
MAX_CP = 64
INTERLEAVED_VIRTUAL_STAGES = (2, 4)
ZERO_BUBBLE_VIRTUAL_STAGES = (1, 2)

# What `--layout` / `pins` may fix: a Layout field (or "dp": dp_replicate x dp_shard).
PIN_KEYS = ("tp", "pp", "cp", "ep", "dp", "dp_replicate", "dp_shard", "zero_stage", "micro_batch_size",
            "activation_checkpointing", "sequence_parallel", "pp_schedule", "pp_virtual_stages", "cp_method",
            "cpu_offload", "compile")
PIN_ALIASES = {"zero": "zero_stage", "mb": "micro_batch_size", "ac": "activation_checkpointing",
               "sp": "sequence_parallel", "schedule": "pp_schedule", "v": "pp_virtual_stages",
               "offload": "cpu_offload", "replicate": "dp_replicate", "shard": "dp_shard"}


def check_pins(pins: dict[str, Any] | None) -> dict[str, Any]:
    """Pins with aliases resolved; an unknown key is an error naming the nearest valid one."""
    out: dict[str, Any] = {}
    for key, value in (pins or {}).items():
        name = PIN_ALIASES.get(key, key)
        if name not in PIN_KEYS:
            near = difflib.get_close_matches(key, list(PIN_KEYS) + list(PIN_ALIASES), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; valid: {', '.join(PIN_KEYS)}"
            raise PlanError(f"--layout {key}={value}: {key!r} is not a layout field{hint}")
        out[name] = value
    return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _powers_of_two(limit: int) -> list[int]:
    out, p = [], 1
    while p <= limit:
        out.append(p)
        p *= 2
    return out


def tp_options(cluster: Cluster) -> list[int]:
    """Tensor-parallel degrees the search tries: within a node (where the fast link is), dividing
    the cluster. Which of them split the model is `plait.layout.rules`'."""
    return [tp for tp in _divisors(cluster.gpus_per_node) if cluster.gpus % tp == 0]


def cp_options(world: int) -> list[tuple[int, str]]:
    """(cp, method): no context parallelism, or a power of two up to MAX_CP with either method."""
    return [(1, "ring")] + [(cp, method) for cp in _powers_of_two(min(world, MAX_CP))[1:] for method in CP_METHODS]


def _data_splits(dp: int) -> Iterator[tuple[int, int, int]]:
    """(dp_replicate, dp_shard, zero_stage) for `dp` data-parallel ranks: DDP, ZeRO-1/2/3 over all
    of them, and ZeRO-2/3 over a power-of-two shard group with replicas across (HSDP)."""
    if dp == 1:
        yield 1, 1, 0  # no data parallelism, nothing for ZeRO to shard
        return
    yield dp, 1, 0  # DDP
    for stage in (1, 2, 3):
        yield 1, dp, stage
    for stage in (2, 3):
        for shard in _powers_of_two(dp // 2)[1:]:
            if dp % shard == 0 and shard < dp:
                yield dp // shard, shard, stage


def _schedules(pp: int) -> list[tuple[str, int]]:
    """(schedule, virtual stages per rank) the search tries for a pipeline of `pp` ranks."""
    if pp == 1:
        return [("1f1b", 1)]
    return ([("gpipe", 1), ("1f1b", 1)] + [("interleaved-1f1b", v) for v in INTERLEAVED_VIRTUAL_STAGES]
            + [("zero-bubble", v) for v in ZERO_BUBBLE_VIRTUAL_STAGES])


def structures(workload: Workload, cluster: Cluster, pins: dict[str, Any] | None = None) -> Iterator[Layout]:
    """The degrees and every knob but micro-batch and checkpointing that `plait train` accepts,
    each with its most frugal micro-batch (the smallest the schedule takes) and checkpointing on.

    The search proposes (the pruning above: tp within a node, powers of two, the data-parallel
    splits, the schedules), and `plait.layout.rules` disposes: no rule is restated here."""
    pins = check_pins(pins)
    world, compile_ = cluster.gpus, bool(pins.get("compile", False))
    for tp in tp_options(cluster):
        for cp, method in cp_options(world // tp):
            if world % (tp * cp):
                continue
            for pp in _divisors(world // (tp * cp)):
                dp = world // (tp * cp * pp)
                for replicate, shard, stage in _data_splits(dp):
                    for ep in [1] + [e for e in _divisors(workload.model.moe_experts) if e > 1]:
                        for sp, offload, (schedule, v) in _knobs(pp):
                            base = Layout(pp=pp, dp_replicate=replicate, dp_shard=shard, cp=cp, tp=tp, ep=ep,
                                          zero_stage=stage, sequence_parallel=sp, pp_schedule=schedule,
                                          pp_virtual_stages=v, cp_method=method, cpu_offload=offload,
                                          mixed_precision=stage >= 2 and workload.dtype == "bf16", compile=compile_)
                            if _pinned(base, pins) and structure_problem(base, workload) is None \
                                    and next(_valid_variants(base, workload, pins), None) is not None:
                                yield base


def _knobs(pp: int) -> Iterator[tuple[bool, bool, tuple[str, int]]]:
    """(sequence parallelism, CPU offload, schedule) to try; the rules drop what does not apply
    (sequence parallelism without TP, offload without ZeRO-3)."""
    for sp in (False, True):
        for offload in (False, True):
            for schedule in _schedules(pp):
                yield sp, offload, schedule


def _pinned(layout: Layout, pins: dict[str, Any]) -> bool:
    """Whether `layout` has every pinned value ("dp" is dp_replicate x dp_shard; the schedule and
    virtual stages pin only pipelines, the context method only context-parallel layouts)."""
    for key, value in pins.items():
        if key in ("micro_batch_size", "activation_checkpointing", "compile"):
            continue  # per variant, or the same for all
        if key == "dp":
            have = layout.dp
        elif key in ("pp_schedule", "pp_virtual_stages") and layout.pp == 1:
            continue
        elif key == "cp_method" and layout.cp == 1:
            continue
        else:
            have = getattr(layout, key)
        if have != value:
            return False
    return True


def micro_batch_sizes(base: Layout, per_rank: int, pins: dict[str, Any]) -> list[int]:
    """Micro-batch sizes (ascending) the search tries: powers of two up to MAX_MICRO_BATCH that
    divide a rank's sequences, or the pinned one; under a pipeline at least one micro-batch per
    stage for every schedule (plait train would raise the count otherwise)."""
    out = []
    sizes = [pins["micro_batch_size"]] if "micro_batch_size" in pins else _powers_of_two(min(per_rank, MAX_MICRO_BATCH))
    for mb in sizes:
        if isinstance(mb, int) and not isinstance(mb, bool) and mb >= 1 and per_rank % mb == 0 \
                and per_rank // mb >= base.pp:
            out.append(mb)
    return out


def variants(base: Layout, workload: Workload, pins: dict[str, Any]) -> Iterator[Layout]:
    """`base` (a layout `structures` yields) with each micro-batch size and checkpointing choice
    that `plait train` accepts, the most frugal first."""
    return _valid_variants(base, workload, check_pins(pins))


def _valid_variants(base: Layout, workload: Workload, pins: dict[str, Any]) -> Iterator[Layout]:
    per_rank = workload.global_batch_sequences // base.dp
    acs = (True, False) if "activation_checkpointing" not in pins else (bool(pins["activation_checkpointing"]),)
    for ac in acs:
        for mb in micro_batch_sizes(base, per_rank, pins):
            layout = base.replace(micro_batch_size=mb, activation_checkpointing=ac)
            if micro_batch_problem(layout, workload) is None:
                yield layout


def enumerate_layouts(workload: Workload, cluster: Cluster, pins: dict[str, Any] | None = None) -> Iterator[Layout]:
    """Every layout `plait train` accepts for this workload on this cluster (within the pruning
    of degrees stated above), honouring `pins`."""
    for base in structures(workload, cluster, pins):
        yield from variants(base, workload, pins or {})


def candidate(workload: Workload, layout: Layout, cluster: Cluster) -> Candidate:
    """Estimate one layout: memory, time and the numbers users compare. A layout `plait train`
    would refuse (or one that does not match the cluster) raises PlanError (`check_layout`)."""
    check_layout(workload, layout, cluster)
    memory = estimate_memory(workload, layout)
    time = estimate_time(workload, layout, cluster)
    step = time.step_s
    world = layout.world
    tokens_per_s = workload.global_batch_tokens / step / world
    flops = flops_per_token(workload.model, workload.seq_len) * tokens_per_s
    peak = cluster.device.peak_flops.get(workload.dtype) or cluster.device.peak_flops.get("fp32", 0.0)
    return Candidate(layout=layout, memory=memory, time=time, tokens_per_s_per_gpu=tokens_per_s,
                     tflops_per_gpu=flops / 1e12, mfu=flops / peak if peak else 0.0,
                     fits=memory_fits(memory, cluster))


def check_workload(workload: Workload, cluster: Cluster) -> None:
    if workload.model.vocab is None:
        raise PlanError("the model's vocabulary is unset; set model.vocab (e.g. --model.vocab=32000)")
    if workload.global_batch_sequences < 1:
        raise PlanError(f"the global batch is {workload.global_batch_sequences} sequences; set "
                        f"--global-batch-sequences (or --global-batch-tokens) to at least one sequence")
    if cluster.gpus < 1 or cluster.gpus_per_node < 1:
        raise PlanError(f"the cluster has {cluster.gpus} GPU(s), {cluster.gpus_per_node} per node; both must be >= 1")


def plan(workload: Workload, cluster: Cluster, pins: dict[str, Any] | None = None, top: int = 10) -> list[Candidate]:
    """The best `top` layouts that fit, by predicted tokens/s per GPU (`_ranked`: ties go to the
    larger micro-batch on GPUs, the smaller on a CPU, then to less memory).
    When none fits, the `top` that come closest (the least need over what the device or the
    node's host memory has: `memory_ratios`), with `fits` False. When no layout matches the pins,
    the reason the layout they describe is refused (PlanError), else an empty list."""
    check_workload(workload, cluster)
    pins = check_pins(pins)
    fitting: list[Candidate] = []
    closest: list[Candidate] = []
    for base in structures(workload, cluster, pins):
        frugal = next(variants(base, workload, pins), None)
        if frugal is None:
            continue
        # Host bytes (offloaded states) do not depend on the micro-batch or checkpointing, and
        # the device bytes are least in the frugal variant: if it does not fit, none does.
        if not memory_fits(estimate_memory(workload, frugal), cluster):
            closest.append(candidate(workload, frugal, cluster))
            closest = sorted(closest, key=lambda c: max(memory_ratios(c.memory, cluster)))[:top]
            continue
        for layout in variants(base, workload, pins):
            if not memory_fits(estimate_memory(workload, layout), cluster):
                continue
            fitting.append(candidate(workload, layout, cluster))
        if len(fitting) > 20 * top:
            fitting = _ranked(fitting, not cluster.device_is_host)[: 4 * top]
    if fitting:
        return _ranked(fitting, not cluster.device_is_host)[:top]
    if not closest and pins:
        # Why no layout matches: a rule the pinned layout breaks. Not checked against the
        # cluster: the degrees filled in for it are a guess, and a world that does not match
        # is the CLI's general advice (degrees multiply to the GPUs, tp within a node).
        check_layout(workload, pinned_layout(workload, cluster, pins))
    return closest


def _ranked(cands: list[Candidate], larger_micro_batch_first: bool = True) -> list[Candidate]:
    """By predicted tokens/s per GPU (to 4 significant digits, so that float noise breaks no tie).
    At equal speed: by the tokens a rank's matmuls take per micro-batch (micro-batch x sequence /
    cp), then the fewest parallel dimensions besides data parallelism (tp, pp, cp, ep, offload:
    the simpler layout), then less memory. The time model prices no cost per micro-batch where
    the host runs ahead of the device, yet a GPU runs larger matmuls closer to peak and launches
    fewer kernels: there a tie goes to more tokens per micro-batch. On a CPU the smaller working
    set stays in cache (bench/RESULTS.md, "planner ranking vs measured": DDP on 2 workers took
    1.62 s per step at micro-batch 2 and 1.96 s at 16): there to fewer."""
    sign = -1 if larger_micro_batch_first else 1

    def key(c: Candidate) -> tuple:
        lay = c.layout
        dims = sum(d > 1 for d in (lay.tp, lay.pp, lay.cp, lay.ep)) + int(lay.cpu_offload)
        return (-float(f"{c.tokens_per_s_per_gpu:.4g}"), sign * lay.micro_batch_size / lay.cp, dims,
                c.memory.total, lay.short())

    return sorted(cands, key=key)
