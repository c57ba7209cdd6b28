"""The search: every layout `plait train` accepts for a workload on a cluster, and the best that fit.

Pure Python. `enumerate_layouts` walks the degrees (tp, cp, pp, the data-parallel split and its
ZeRO stage, ep) and the knobs (sequence parallelism, schedule and virtual stages, context method,
offload, micro-batch, activation checkpointing) under the rules of `plait.config_checks`, which
are restated here without torch (tests/unit/test_planner_search.py checks every emitted layout
against `validate`). `check_layout` states the same rules for one layout given from outside the
search (`candidate()` calls it: the estimators price any layout, even one `plait train` refuses).
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
from plait.planner.rules import PlanError, check_layout, pinned_layout
from plait.planner.timing import estimate_time
from plait.planner.types import Candidate, Layout, Workload

MAX_MICRO_BATCH = 32  # sequences per forward; beyond this the time model gains nothing
MAX_CP = 64
INTERLEAVED_VIRTUAL_STAGES = (2, 4)
ZERO_BUBBLE_VIRTUAL_STAGES = (1, 2)

# What `--layout` / `pins` may fix: a Layout field (or "dp": dp_replicate x dp_shard).
PIN_KEYS = ("tp", "pp", "cp", "ep", "dp", "dp_replicate", "dp_shard", "zero_stage", "micro_batch_size",
            "activation_checkpointing", "sequence_parallel", "pp_schedule", "pp_virtual_stages", "cp_method",
            "cpu_offload")
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


def _ok(pins: dict[str, Any], key: str, value: Any) -> bool:
    return key not in pins or pins[key] == value


def tp_options(workload: Workload, cluster: Cluster) -> list[int]:
    """Tensor-parallel degrees plait can split this model by, at most a node."""
    a = workload.model
    if a.moe_experts:
        return [1]  # the tensor-parallel plan covers dense MLPs only
    out = []
    for tp in _divisors(cluster.gpus_per_node):
        sizes = (a.heads, a.kv_heads, a.hidden, a.ffn, a.vocab or 1)
        if cluster.gpus % tp == 0 and tp <= a.kv_heads and all(s % tp == 0 for s in sizes):
            out.append(tp)
    return out


def cp_options(workload: Workload, world: int) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = [(1, "ring")]
    for cp in _powers_of_two(min(world, MAX_CP))[1:]:
        if workload.seq_len % (2 * cp) == 0:
            out.append((cp, "ring"))
        if workload.seq_len % cp == 0 and workload.model.kv_heads % cp == 0:
            out.append((cp, "ulysses"))
    return out


def _data_splits(dp: int, cp: int, pp: int) -> Iterator[tuple[int, int, int]]:
    """(dp_replicate, dp_shard, zero_stage) for `dp` data-parallel ranks."""
    if dp == 1:
        yield 1, 1, 0  # no data parallelism, nothing for ZeRO to shard
        return
    if pp == 1:
        yield dp, 1, 0  # DDP
        if cp == 1:
            yield 1, dp, 1  # ZeRO-1 (not with context or pipeline parallelism)
    for stage in (2, 3):
        yield 1, dp, stage
        if cp == 1:  # HSDP: shards within a group, replicas across (not with context parallelism)
            for shard in _powers_of_two(dp // 2)[1:]:
                if dp % shard == 0 and shard < dp:
                    yield dp // shard, shard, stage


def _schedules(workload: Workload, pp: int) -> list[tuple[str, int]]:
    if pp == 1:
        return [("1f1b", 1)]
    layers = workload.model.layers
    out = [("gpipe", 1), ("1f1b", 1)]
    out += [("interleaved-1f1b", v) for v in INTERLEAVED_VIRTUAL_STAGES if layers >= pp * v]
    out += [("zero-bubble", v) for v in ZERO_BUBBLE_VIRTUAL_STAGES if layers >= pp * v]
    return out


def structures(workload: Workload, cluster: Cluster, pins: dict[str, Any] | None = None) -> Iterator[Layout]:
    """The degrees and every knob but micro-batch and checkpointing, each with its most frugal
    micro-batch (the smallest the schedule accepts) and checkpointing on."""
    pins = check_pins(pins)
    a, world = workload.model, cluster.gpus
    sequences = workload.global_batch_sequences
    for tp in tp_options(workload, cluster):
        if not _ok(pins, "tp", tp):
            continue
        for sp in ((False, True) if tp > 1 and workload.seq_len % tp == 0 else (False,)):
            if not _ok(pins, "sequence_parallel", sp):
                continue
            for cp, method in cp_options(workload, world // tp):
                if (cp > 1 and tp > 1) or world % (tp * cp) or not _ok(pins, "cp", cp) \
                        or (cp > 1 and not _ok(pins, "cp_method", method)):
                    continue
                pps = [1] if (cp > 1 or a.moe_experts or a.tie_embeddings) else \
                    [p for p in _divisors(world // (tp * cp)) if p <= a.layers]
                for pp in pps:
                    if not _ok(pins, "pp", pp):
                        continue
                    dp = world // (tp * cp * pp)
                    if sequences % dp or not _ok(pins, "dp", dp):
                        continue
                    yield from _with_data(workload, pins, tp, sp, cp, method, pp, dp)


def _with_data(workload: Workload, pins: dict[str, Any], tp: int, sp: bool, cp: int, method: str,
               pp: int, dp: int) -> Iterator[Layout]:
    a = workload.model
    per_rank = workload.global_batch_sequences // dp
    for replicate, shard, stage in _data_splits(dp, cp, pp):
        if not (_ok(pins, "dp_replicate", replicate) and _ok(pins, "dp_shard", shard) and _ok(pins, "zero_stage", stage)):
            continue
        eps = [1]
        if a.moe_experts and stage >= 2 and cp == 1:
            eps += [e for e in _divisors(a.moe_experts) if e > 1 and (shard * cp) % e == 0]
        for ep in eps:
            if not _ok(pins, "ep", ep):
                continue
            for offload in ((False, True) if stage == 3 and ep == 1 else (False,)):
                if not _ok(pins, "cpu_offload", offload):
                    continue
                for schedule, v in _schedules(workload, pp):
                    if pp > 1 and not (_ok(pins, "pp_schedule", schedule) and _ok(pins, "pp_virtual_stages", v)):
                        continue
                    base = Layout(pp=pp, dp_replicate=replicate, dp_shard=shard, cp=cp, tp=tp, ep=ep,
                                  zero_stage=stage, sequence_parallel=sp, pp_schedule=schedule,
                                  pp_virtual_stages=v, cp_method=method, cpu_offload=offload,
                                  mixed_precision=stage >= 2 and workload.dtype == "bf16")
                    if micro_batch_sizes(base, per_rank, pins):
                        yield base


def micro_batch_sizes(base: Layout, per_rank: int, pins: dict[str, Any]) -> list[int]:
    """Micro-batch sizes (ascending) that divide a rank's sequences and suit the schedule."""
    out = []
    sizes = [pins["micro_batch_size"]] if "micro_batch_size" in pins else _powers_of_two(min(per_rank, MAX_MICRO_BATCH))
    for mb in sizes:
        if mb < 1 or per_rank % mb:
            continue
        m = per_rank // mb
        if base.pp > 1:
            if m < base.pp:  # every schedule here wants a micro-batch per stage (plait raises the count otherwise)
                continue
            if base.pp_schedule not in ("gpipe", "1f1b") and m % (m // base.pp):
                continue  # interleaved schedules run rounds of pp micro-batches
        out.append(mb)
    return out


def variants(base: Layout, workload: Workload, pins: dict[str, Any]) -> Iterator[Layout]:
    """`base` with each micro-batch size and checkpointing choice, the most frugal first."""
    pins = check_pins(pins)
    per_rank = workload.global_batch_sequences // base.dp
    acs = (True, False) if "activation_checkpointing" not in pins else (bool(pins["activation_checkpointing"]),)
    for ac in acs:
        for mb in micro_batch_sizes(base, per_rank, pins):
            yield base.replace(micro_batch_size=mb, activation_checkpointing=ac)


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
