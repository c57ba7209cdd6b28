"""The planner's answer for people and programs: the table, the breakdowns, why the runner-up lost,
the JSON, and the config file `plait train --config` reads. Pure Python."""

from __future__ import annotations

from typing import Any

from plait.config import to_toml
from plait.hardware.devices import Cluster
from plait.planner.memory import HOST_RESERVED, host_bytes_per_node, memory_ratios, usable_host_bytes
from plait.layout import Workload
from plait.planner.types import Candidate

GIB = 2**30


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms"


def header(workload: Workload, cluster: Cluster) -> str:
    a = workload.model
    return (f"model: {a.layers} layers, hidden {a.hidden}, {a.heads} heads ({a.kv_heads} kv), vocab {a.vocab}"
            + (f", {a.moe_experts} experts top-{a.moe_top_k}" if a.moe_experts else "")
            + f"; seq_len {workload.seq_len}, {workload.global_batch_sequences} sequences "
            f"({workload.global_batch_tokens:,} tokens) per step, {workload.dtype}\n"
            f"cluster: {cluster.gpus} x {cluster.device.name} ({cluster.gpus_per_node} per node, "
            f"{_gib(cluster.device.memory_bytes)} each, {_gib(cluster.host_memory_bytes)} host memory per node; "
            f"from {cluster.source})")


def table(cands: list[Candidate]) -> str:
    rows = [("#", "tp", "pp", "cp", "ep", "dp (rep x shard)", "zero", "mb", "ac", "knobs", "mem/GPU", "tok/s/GPU", "TFLOP/s", "MFU")]
    for i, c in enumerate(cands, 1):
        lay = c.layout
        knobs = [k for k, on in (("sp", lay.sequence_parallel), ("offload", lay.cpu_offload)) if on]
        if lay.pp > 1:
            knobs.append(lay.pp_schedule + (f"/v{lay.pp_virtual_stages}" if lay.pp_virtual_stages > 1 else ""))
        if lay.cp > 1:
            knobs.append(lay.cp_method)
        rows.append((str(i), str(lay.tp), str(lay.pp), str(lay.cp), str(lay.ep),
                     f"{lay.dp} ({lay.dp_replicate}x{lay.dp_shard})", str(lay.zero_stage), str(lay.micro_batch_size),
                     "yes" if lay.activation_checkpointing else "no", " ".join(knobs) or "-",
                     _gib(c.memory.total), f"{c.tokens_per_s_per_gpu:,.0f}", f"{c.tflops_per_gpu:.3g}",
                     f"{c.mfu:.1%}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows)


def memory_breakdown(c: Candidate, cluster: Cluster) -> str:
    """Device bytes by part; with CPU offload (or on the "cpu" device) also the node's host
    memory: the ranks of a node times each rank's host bytes, against what the node has."""
    lines = [f"memory per GPU (most loaded rank): {_gib(c.memory.total)} of {_gib(cluster.device.memory_bytes)}"]
    lines += [f"  {name:<20} {_gib(value):>11}" for name, value in c.memory.parts.items() if value]
    if c.memory.host_total or cluster.device_is_host:
        lines.append(_host_line(c, cluster))
        lines += [f"  {name:<20} {_gib(value):>11} per rank" for name, value in c.memory.host.items() if value]
    lines += [f"  note: {n}" for n in c.memory.notes]
    return "\n".join(lines)


def _host_line(c: Candidate, cluster: Cluster) -> str:
    per_rank = c.memory.host_total + (c.memory.total if cluster.device_is_host else 0)
    what = (f"{cluster.ranks_per_node} workers x {_gib(per_rank)}: the device is the host" if cluster.device_is_host
            else f"{cluster.ranks_per_node} ranks x {_gib(per_rank)} of offloaded states")
    return (f"host memory per node: {_gib(host_bytes_per_node(c.memory, cluster))} ({what}) of "
            f"{_gib(usable_host_bytes(cluster))} usable ({_gib(cluster.host_memory_bytes)} less "
            f"{HOST_RESERVED:.0%} for the OS and buffers)")


def time_breakdown(c: Candidate) -> str:
    t = c.time
    lines = [f"step time: {_ms(t.step_s)} ({c.tokens_per_s_per_gpu:,.0f} tokens/s per GPU)"]
    for name, value in t.parts.items():
        if value <= 0:
            continue
        full = t.collectives.get(name)
        extra = f"   (exposed; {_ms(full)} in all, the rest overlaps compute)" if full and full > value * 1.001 else ""
        lines.append(f"  {name:<32} {_ms(value):>11}{extra}")
    hidden = [n for n, v in t.collectives.items() if v > 0 and t.parts.get(n, 0.0) <= 0]
    for name in hidden:
        lines.append(f"  {name:<32} {'0.0 ms':>11}   (fully overlapped; {_ms(t.collectives[name])} in all)")
    lines += [f"  note: {n}" for n in t.notes]
    return "\n".join(lines)


def why_runner_up_lost(best: Candidate, second: Candidate) -> str:
    """The parts where the runner-up is slower (or heavier) than the choice, largest first."""
    if second.tokens_per_s_per_gpu == best.tokens_per_s_per_gpu and second.memory.total >= best.memory.total:
        head = (f"runner-up {second.layout.short()}: as fast as the choice; it needs "
                f"{_gib(second.memory.total - best.memory.total)} more memory per GPU")
        return head
    ratio = best.tokens_per_s_per_gpu / second.tokens_per_s_per_gpu - 1
    lines = [f"runner-up {second.layout.short()}: {ratio:.1%} slower "
             f"({_ms(second.time.step_s)} vs {_ms(best.time.step_s)} per step) because of:"]
    names = set(best.time.parts) | set(second.time.parts)
    diffs = sorted(((second.time.parts.get(n, 0.0) - best.time.parts.get(n, 0.0), n) for n in names), reverse=True)
    worse = [(d, n) for d, n in diffs if d > 1e-4 * best.time.step_s]
    lines += [f"  {n:<32} +{_ms(d)}" for d, n in worse[:5]]
    better = [(d, n) for d, n in diffs if d < -1e-4 * best.time.step_s]
    if better:
        lines.append("  (it saves " + ", ".join(f"{n} {_ms(-d)}" for d, n in better[-3:]) + ")")
    return "\n".join(lines)


def _degrees(c: Candidate) -> tuple[int, ...]:
    lay = c.layout
    return (lay.tp, lay.pp, lay.cp, lay.ep, lay.dp_replicate, lay.dp_shard)


def runner_up(cands: list[Candidate]) -> Candidate:
    """The best layout with other degrees than the choice (the informative comparison), else the second."""
    return next((c for c in cands[1:] if _degrees(c) != _degrees(cands[0])), cands[1])


def explain(cands: list[Candidate], workload: Workload, cluster: Cluster) -> str:
    """The full printout: header, table, the choice's breakdowns, the runner-up."""
    out = [header(workload, cluster), "", table(cands), ""]
    best = cands[0]
    out += [f"chosen: {best.layout.short()}", memory_breakdown(best, cluster), "",
            time_breakdown(best)]
    if len(cands) > 1:
        out += ["", why_runner_up_lost(best, runner_up(cands))]
    return "\n".join(out)


def nothing_fits(closest: list[Candidate], workload: Workload, cluster: Cluster, for_train: bool = False) -> str:
    """What to change when no layout fits: the layout closest to fitting, which memory it runs
    out of (the device's, or the node's host memory for CPU offload and the "cpu" device), by
    how much, and the fixes, in `plait plan`'s flags or (`for_train`, parallel.auto) in
    `plait train`'s."""
    if not closest:
        return "no layout matches"
    least = min(closest, key=lambda c: max(memory_ratios(c.memory, cluster)))
    device_need, host_need = memory_ratios(least.memory, cluster)
    need = max(device_need, host_need)
    factor = 2
    while factor < need:
        factor *= 2
    gpus = cluster.gpus * factor
    if host_need > device_need:
        if for_train:
            what = "the workers' memory" if cluster.device_is_host else "the offloaded states"
            fix = f"Spread the run over more machines (--nnodes; {gpus} workers or more in all), machines with more memory"
        elif cluster.device_is_host:
            what = f"{cluster.ranks_per_node} workers' memory"
            fix = (f"Spread the workers over more machines (--gpus {gpus} --gpus-per-node "
                   f"{cluster.ranks_per_node}, or fewer per machine), a machine with more memory (--cluster FILE)")
        else:
            what = f"{cluster.ranks_per_node} ranks' offloaded states"
            fix = (f"Use more GPUs (--gpus {gpus} or more, so ZeRO-3 shards the states over more nodes), nodes "
                   f"with more memory (--cluster FILE with cluster.host_memory_bytes)")
        return (f"no layout fits: the closest, {least.layout.short()}, needs "
                f"{_gib(host_bytes_per_node(least.memory, cluster))} of host memory per node ({what}), but a node "
                f"has {_gib(usable_host_bytes(cluster))} usable ({_gib(cluster.host_memory_bytes)} less "
                f"{HOST_RESERVED:.0%} for the OS and buffers; {need:.1f}x). {fix}, a shorter sequence (--seq-len) "
                f"or a smaller model.")
    head = (f"no layout fits: the most frugal, {least.layout.short()}, needs {_gib(least.memory.total)} per GPU, "
            f"but a {cluster.device.name} has {_gib(cluster.device.memory_bytes)} ({need:.1f}x). ")
    if for_train:
        return head + (f"Run more workers ({gpus} or more with --nproc-per-node and --nnodes, so ZeRO-3 and pipeline "
                       f"stages shard the states further), a shorter train.seq_len or a smaller model.")
    return head + (f"Use more GPUs (--gpus {gpus} or more, so ZeRO-3 and pipeline stages shard the states further), "
                   f"a GPU with more memory (--gpu), a shorter sequence (--seq-len) or a smaller model.")


def layout_json(c: Candidate) -> dict[str, Any]:
    lay = c.layout
    return {
        "degrees": {"tp": lay.tp, "pp": lay.pp, "cp": lay.cp, "ep": lay.ep, "dp": lay.dp,
                    "dp_replicate": lay.dp_replicate, "dp_shard": lay.dp_shard},
        "zero_stage": lay.zero_stage, "micro_batch": lay.micro_batch_size,
        "activation_checkpointing": lay.activation_checkpointing, "sequence_parallel": lay.sequence_parallel,
        "pp_schedule": lay.pp_schedule, "pp_virtual_stages": lay.pp_virtual_stages, "cp_method": lay.cp_method,
        "cpu_offload": lay.cpu_offload, "fits": c.fits,
        "memory_bytes_per_gpu": c.memory.total, "memory_parts": dict(c.memory.parts),
        "host_memory_bytes_per_rank": c.memory.host_total, "host_memory_parts": dict(c.memory.host),
        "step_s": c.time.step_s, "time_parts": dict(c.time.parts),
        "tokens_per_s_per_gpu": c.tokens_per_s_per_gpu, "tflops_per_gpu": c.tflops_per_gpu, "mfu": c.mfu,
    }


def plan_config(c: Candidate, workload: Workload, model_keys: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The sections a plan writes: the model as given, the [train] keys the plan fixes, [parallel]."""
    lay = c.layout
    train = {"seq_len": workload.seq_len, "global_batch_tokens": workload.global_batch_tokens,
             **lay.train_section()}
    if workload.dtype == "bf16" and not lay.mixed_precision:
        train["dtype"] = "bf16"  # unsharded layouts train in bf16 autocast
    return {"model": dict(model_keys), "train": train, "parallel": lay.parallel_section()}


def plan_toml(c: Candidate, workload: Workload, cluster: Cluster, model_keys: dict[str, Any],
              base: dict[str, dict[str, Any]] | None = None) -> str:
    """The plan as TOML; with `base` (a config's sections) the plan's keys are merged into it, so
    the file is that config with the chosen layout."""
    head = (f"# Written by `plait plan` for {cluster.gpus} x {cluster.device.name} ({cluster.gpus_per_node} per node):\n"
            f"# {c.layout.short()}: predicted {_gib(c.memory.total)} per GPU, "
            f"{c.tokens_per_s_per_gpu:,.0f} tokens/s per GPU, MFU {c.mfu:.1%}.\n"
            f"# Run with {cluster.gpus} workers, e.g. plait train --config FILE --nproc-per-node "
            f"{min(cluster.gpus, cluster.gpus_per_node)}" + (f" --nnodes {cluster.nodes}" if cluster.nodes > 1 else "") + "\n\n")
    sections = plan_config(c, workload, model_keys)
    if base is not None:
        merged = {name: dict(values) for name, values in base.items()}
        for name, values in sections.items():
            merged.setdefault(name, {}).update(values)
        if "auto" in merged["parallel"]:  # a config that asked to be planned: this is its plan
            merged["parallel"]["auto"] = False
        sections = merged
    return head + to_toml(sections)
