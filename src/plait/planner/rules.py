"""The rules a layout must satisfy: `check_layout` refuses, with the field, the value and the fix,
what `plait train` would refuse (`plait.config_checks`, restated without torch) and a layout that
does not match the cluster. The estimators price any layout (bench/planner_published.py prices
Megatron's DDP with a pipeline, which plait refuses); `search.candidate()` checks first, so
`--layout` pins and API users get the reason. tests/unit/test_planner_search.py refuses an
example of every rule, with `validate` refusing the same config where the rule is plait train's.

Pure Python, arithmetic only: it runs for every layout a search estimates.
"""

from __future__ import annotations

from typing import Any

from plait.hardware.devices import Cluster
from plait.planner.types import Layout, Workload

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zero-bubble")  # as plait.parallel.pipeline_plan
SINGLE_CHUNK_SCHEDULES = ("gpipe", "1f1b")  # one model chunk per rank: pp_virtual_stages = 1
CP_METHODS = ("ring", "ulysses")


class PlanError(ValueError):
    """Bad planner input (pins, workload, cluster, layout), with the field, the value and the fix."""


def check_layout(workload: Workload, layout: Layout, cluster: Cluster | None = None) -> None:
    """Raise PlanError, naming the field, the value and the fix, when `plait train` would refuse
    `layout` for `workload` (`plait.config_checks`), or when its world is not `cluster`'s GPUs.

    The rules `search.structures` enumerates under, restated for a layout given from outside
    (`--layout` pins, API users, `search.candidate()`); the search's pruning (tp within a node,
    powers of two) is a choice, not a rule, and is not checked."""
    problem = layout_problem(workload, layout, cluster)
    if problem is not None:
        raise PlanError(f"layout {_describe(layout)}: {problem}")


def _describe(layout: Layout) -> str:
    try:
        return layout.short()
    except TypeError:  # a value of the wrong type (compared with a number): name it all
        return repr(layout)


def layout_problem(workload: Workload, layout: Layout, cluster: Cluster | None = None) -> str | None:
    """The first reason `check_layout` refuses `layout`, or None."""
    lay, a = layout, workload.model
    for name in ("pp", "dp_replicate", "dp_shard", "cp", "tp", "ep", "micro_batch_size", "pp_virtual_stages"):
        value = getattr(lay, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"{name} = {value!r} must be a whole number of at least 1"
    for name in ("sequence_parallel", "activation_checkpointing", "cpu_offload", "mixed_precision"):
        if not isinstance(getattr(lay, name), bool):
            return f"{name} = {getattr(lay, name)!r} must be true or false"
    if isinstance(lay.zero_stage, bool) or not isinstance(lay.zero_stage, int) or lay.zero_stage not in (0, 1, 2, 3):
        return f"zero_stage = {lay.zero_stage!r} must be 0 (none), 1, 2 or 3 (FSDP)"
    if lay.pp_schedule not in SCHEDULES:
        return f"pp_schedule = {lay.pp_schedule!r} is not a schedule; use one of {', '.join(SCHEDULES)}"
    if lay.cp_method not in CP_METHODS:
        return f"cp_method = {lay.cp_method!r} is not a context-parallel method; use \"ring\" or \"ulysses\""

    world, z, dp = lay.world, lay.zero_stage, lay.dp
    if cluster is not None and world != cluster.gpus:
        others = world // lay.dp_shard
        fix = (f"e.g. dp_shard = {cluster.gpus // others}" if cluster.gpus % others == 0
               else f"make pp x dp_replicate x dp_shard x cp x tp = {cluster.gpus}")
        return (f"pp x dp_replicate x dp_shard x cp x tp = {lay.pp} x {lay.dp_replicate} x {lay.dp_shard} x "
                f"{lay.cp} x {lay.tp} = {world} ranks, but the cluster has {cluster.gpus} GPU(s); {fix}")

    # Data parallelism and ZeRO (over dp_shard).
    if z >= 1 and lay.dp_shard == 1:
        return (f"zero_stage = {z} shards over the data-parallel shard axis, but dp_shard = 1; "
                f"set dp_shard > 1, or zero_stage = 0")
    if z == 0 and lay.dp_shard > 1:
        return (f"dp_shard = {lay.dp_shard} needs a ZeRO stage to say what is sharded; set zero_stage = 1, 2 or 3, "
                f"or use dp_replicate = {lay.dp_shard} for plain replicas")
    if lay.mixed_precision and z < 2:
        return (f"mixed_precision = true applies to sharded parameters (FSDP): it needs zero_stage = 2 or 3, "
                f"not {z}; set mixed_precision = false (an unsharded bf16 workload trains under autocast)")
    if lay.mixed_precision and workload.dtype != "bf16":
        return (f"mixed_precision = true computes in bf16, but the workload's dtype is {workload.dtype!r}; "
                f"set mixed_precision = false, or plan a bf16 workload")
    if lay.cpu_offload and z != 3:
        return f"cpu_offload = true needs zero_stage = 3 (FSDP's CPUOffloadPolicy), not {z}; set zero_stage = 3"
    sequences = workload.global_batch_sequences
    if sequences % dp:
        return (f"the global batch of {sequences} sequences does not split over dp_replicate x dp_shard = "
                f"{lay.dp_replicate} x {lay.dp_shard} = {dp} data-parallel ranks; pick a dp that divides {sequences}")
    per_rank = sequences // dp
    if per_rank % lay.micro_batch_size:
        options = [b for b in range(1, min(per_rank, lay.micro_batch_size) + 1) if per_rank % b == 0]
        return (f"micro_batch_size = {lay.micro_batch_size} does not divide a data-parallel rank's {per_rank} "
                f"sequences per step; set micro_batch_size = {options[-1]}")

    # Tensor parallelism.
    if lay.tp > 1:
        if a.moe_experts:
            return (f"tp = {lay.tp} with a mixture-of-experts model: the tensor-parallel plan covers dense MLPs "
                    f"only; set tp = 1")
        shapes = (("heads", a.heads), ("kv_heads", a.kv_heads), ("hidden", a.hidden), ("MLP width", a.ffn),
                  ("vocab", a.vocab or lay.tp))
        for name, size in shapes:
            if size % lay.tp:  # (tp > kv_heads never divides them: key/value heads are not replicated)
                valid = [t for t in range(1, a.kv_heads + 1) if all(s % t == 0 for _, s in shapes)]
                return (f"tp = {lay.tp} does not divide the model's {name} = {size} (every rank takes whole heads, "
                        f"an equal share of the widths and of the vocabulary); set tp to one of {valid}")
    if lay.sequence_parallel and lay.tp == 1:
        return "sequence_parallel = true needs tp > 1 (it splits the tensor-parallel norm regions); set it false"
    if lay.sequence_parallel and workload.seq_len % lay.tp:
        return (f"sequence_parallel = true splits each sequence over tp = {lay.tp} ranks, but the sequence length "
                f"{workload.seq_len} is not a multiple of {lay.tp}; set sequence_parallel = false")

    # Context parallelism.
    if lay.cp > 1:
        refused = ((lay.tp > 1, f"tp = {lay.tp}", "set tp = 1 (tensor parallelism splits the heads context "
                    "parallelism's attention exchanges)"),
                   (lay.pp > 1, f"pp = {lay.pp}", "set pp = 1 (pipeline stages do not pass the tokens' positions on)"),
                   (z == 1, "zero_stage = 1", "use zero_stage = 0 (DDP over data x context ranks) or 2/3 (FSDP over "
                    "dp_shard x cp)"),
                   (z >= 2 and lay.dp_replicate > 1, f"dp_replicate = {lay.dp_replicate} (HSDP)",
                    "use dp_shard alone for FSDP with context parallelism"))
        for bad, what, fix in refused:
            if bad:
                return f"cp = {lay.cp} with {what} is not supported in plait: {fix}"
        if lay.cp_method == "ring" and workload.seq_len % (2 * lay.cp):
            return (f"cp = {lay.cp} with ring attention cuts each sequence into 2 x cp = {2 * lay.cp} chunks, but "
                    f"the sequence length {workload.seq_len} is not a multiple of {2 * lay.cp}; pick another cp")
        if lay.cp_method == "ulysses" and (workload.seq_len % lay.cp or a.kv_heads % lay.cp):
            return (f"cp = {lay.cp} with Ulysses needs the sequence length ({workload.seq_len}) and the key/value "
                    f"heads ({a.kv_heads}) divisible by cp; pick another cp, or cp_method = \"ring\"")

    # Pipeline parallelism.
    if lay.pp > 1:
        if a.tie_embeddings:
            return (f"pp = {lay.pp} with tied embeddings: the first and last stages would each need the shared "
                    f"matrix, which plait does not keep in sync; set pp = 1 (or untie the embeddings)")
        if a.moe_experts:
            return f"pp = {lay.pp} with a mixture-of-experts model is not in plait; set pp = 1"
        if dp > 1 and z < 2:
            return (f"pp = {lay.pp} with data parallelism (dp = {dp}) needs zero_stage = 2 or 3 (FSDP on each "
                    f"stage), not {z}: DDP and ZeRO-1 are not wired into pipeline stages; set zero_stage = 3")
        v = lay.pp_virtual_stages
        if lay.pp_schedule in SINGLE_CHUNK_SCHEDULES and v != 1:
            return (f"pp_virtual_stages = {v} needs an interleaved schedule, but pp_schedule = {lay.pp_schedule!r} "
                    f"runs one chunk per rank; set pp_virtual_stages = 1")
        if lay.pp_schedule == "interleaved-1f1b" and v < 2:
            return "pp_schedule = \"interleaved-1f1b\" needs pp_virtual_stages >= 2; set 2, or pp_schedule = \"1f1b\""
        if a.layers < lay.pp * v:
            return (f"pp x pp_virtual_stages = {lay.pp} x {v} stages is more than the model's {a.layers} layers; "
                    f"use fewer stages")
        m = per_rank // lay.micro_batch_size
        if m < lay.pp:
            return (f"pp = {lay.pp} needs at least {lay.pp} micro-batches per step, but a data-parallel rank's "
                    f"{per_rank} sequences at micro_batch_size = {lay.micro_batch_size} make {m}; lower "
                    f"micro_batch_size (to {max(1, per_rank // lay.pp)} or less) or dp")
        if lay.pp_schedule not in SINGLE_CHUNK_SCHEDULES and m % (m // lay.pp):
            return (f"pp_schedule = {lay.pp_schedule!r} runs micro-batches in rounds of pp = {lay.pp}: the {m} "
                    f"micro-batches per step must split into {m // lay.pp} equal rounds; pick a micro_batch_size "
                    f"that gives a multiple of {lay.pp}")

    # Expert parallelism.
    if lay.ep > 1:
        if not a.moe_experts:
            return f"ep = {lay.ep} spreads experts, but the model is dense; set ep = 1"
        if a.moe_experts % lay.ep:
            return (f"ep = {lay.ep} must divide the model's {a.moe_experts} experts; use one of "
                    f"{[e for e in range(1, a.moe_experts + 1) if a.moe_experts % e == 0]}")
        if z < 2:
            return (f"ep = {lay.ep} needs zero_stage = 2 or 3 (expert weights are sharded over ep and FSDP "
                    f"averages the dense gradients), not {z}; set zero_stage = 3")
        if lay.cp > 1:
            return f"ep = {lay.ep} with cp = {lay.cp} is not in plait; set cp = 1"
        if lay.cpu_offload:
            return f"cpu_offload = true with ep = {lay.ep} is not in plait; set cpu_offload = false"
        if (lay.dp_shard * lay.cp) % lay.ep:
            return (f"ep = {lay.ep} must divide dp_shard x cp = {lay.dp_shard} x {lay.cp} (experts are spread over "
                    f"those ranks); set dp_shard to a multiple of {lay.ep}")
    return None


def pinned_layout(workload: Workload, cluster: Cluster, pins: dict[str, Any]) -> Layout:
    """The layout `pins` describe (Layout field names, as `search.check_pins` returns them), the
    free degrees filled as `plait train` fills them: the data-parallel ranks take what the other
    degrees leave of the cluster, on the shard axis with ZeRO-3 unless the pins say otherwise.
    What `check_layout` can name a reason against when no layout of the search matches the pins."""
    fields = {k: v for k, v in pins.items() if k != "dp"}
    lay = Layout(**fields)
    ints = [lay.pp, lay.cp, lay.tp, lay.dp_replicate, lay.dp_shard, pins.get("dp", 1)]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in ints):
        return lay  # check_layout names the bad value
    inner = lay.pp * lay.cp * lay.tp
    dp = pins["dp"] if "dp" in pins else (cluster.gpus // inner if cluster.gpus % inner == 0 else 1)
    if "dp_replicate" in pins and "dp_shard" not in pins:
        lay = lay.replace(dp_shard=max(1, dp // lay.dp_replicate))
    elif "dp_shard" in pins and "dp_replicate" not in pins:
        lay = lay.replace(dp_replicate=max(1, dp // lay.dp_shard))
    elif "dp_shard" not in pins:
        lay = lay.replace(**({"dp_replicate": dp} if pins.get("zero_stage") == 0 else {"dp_shard": dp}))
    if "zero_stage" not in pins:
        lay = lay.replace(zero_stage=3 if lay.dp_shard > 1 else 0)
    if isinstance(lay.zero_stage, int):
        lay = lay.replace(mixed_precision=lay.zero_stage >= 2 and workload.dtype == "bf16")
    return lay
