"""Every rule a layout must satisfy, each stated once, for `plait train`'s validation and the
planner alike.

`layout_problem(layout, workload)` returns the first rule the layout breaks as a `Problem`: the
config field, its value, and one sentence that says why and what to set instead, in the names of
the config keys (`parallel.tp_degree`, `train.micro_batch_size`): that is what `plait train`
reads and what `plait plan --write` writes. `plait.config.validate` raises it as a ConfigError,
the planner's `check_layout` as a PlanError, with the same sentence (tests/unit/test_layout_rules.py
checks both on every layout the planner emits and on a refused example of every rule).

The families, in the order they are checked: values (a layout built by hand or from `--layout`
pins), data parallelism and ZeRO, the batch split, tensor parallelism, context parallelism,
pipeline parallelism, mixture of experts and expert parallelism (`structure_problem`), then the
micro-batch (`micro_batch_problem`: it divides a rank's share, and a pipeline schedule gets the
micro-batches it needs), which the planner checks apart for each of its variants. A rule here is a fact about
plait (a shape that does not split, a combination that is not built); the planner's pruning of
its search (tp within a node, powers of two) is a choice and lives in `plait.planner.search`.

Pure Python, arithmetic only: it runs for every layout a search estimates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from plait.errors import ConfigError
from plait.layout.pipeline import SCHEDULES, SINGLE_CHUNK_SCHEDULES
from plait.layout.types import CP_METHODS, Layout, Workload
from plait.model.sizes import ModelArgs
from plait.optim import OPTIMIZERS

# The config key of each Layout field.
FIELDS = {
    "pp": "parallel.pp_degree", "dp_replicate": "parallel.dp_replicate_degree", "dp_shard": "parallel.dp_shard_degree",
    "cp": "parallel.cp_degree", "tp": "parallel.tp_degree", "ep": "parallel.ep_degree",
    "zero_stage": "parallel.zero_stage", "sequence_parallel": "parallel.sequence_parallel",
    "micro_batch_size": "train.micro_batch_size", "activation_checkpointing": "train.activation_checkpointing",
    "compile": "train.compile", "pp_schedule": "parallel.pp_schedule", "pp_virtual_stages": "parallel.pp_virtual_stages",
    "cp_method": "parallel.cp_method", "cpu_offload": "parallel.cpu_offload", "mixed_precision": "parallel.mixed_precision",
}
_WHOLE = ("pp", "dp_replicate", "dp_shard", "cp", "tp", "ep", "micro_batch_size", "pp_virtual_stages")
_FLAGS = ("sequence_parallel", "activation_checkpointing", "compile", "cpu_offload", "mixed_precision")


def fmt(value: Any) -> str:
    """A value as the config file writes it: true/false, "text", numbers as they are."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


@dataclass(frozen=True)
class Problem:
    """A broken rule: the config `field`, its `value`, and the sentence for people (which starts
    with "field = value" and ends with the fix)."""

    field: str
    value: Any
    message: str

    def __str__(self) -> str:
        return self.message


def problem(key: str, value: Any, rest: str) -> Problem:
    """A Problem for `key` (a Layout field or a dotted config key): "key = value rest"."""
    field = FIELDS.get(key, key)
    return Problem(field, value, f"{field} = {fmt(value)} {rest}")


def check_layout_rules(layout: Layout, workload: Workload) -> None:
    """Raise ConfigError with the first rule `layout` breaks for `workload`."""
    found = layout_problem(layout, workload)
    if found is not None:
        raise ConfigError(found.message)


def layout_problem(layout: Layout, workload: Workload) -> Problem | None:
    """The first rule `layout` breaks for `workload`, or None."""
    return structure_problem(layout, workload) or micro_batch_problem(layout, workload)


def structure_problem(layout: Layout, workload: Workload) -> Problem | None:
    """The first broken rule that does not depend on the micro-batch size or on activation
    checkpointing (the planner checks these once for all its micro-batch variants)."""
    for family in (_values, _data_parallel, _batch_split, _tensor_parallel, _context_parallel, _pipeline, _experts):
        found = family(layout, workload)
        if found is not None:
            return found
    return None


def micro_batch_problem(layout: Layout, workload: Workload) -> Problem | None:
    """The first broken rule about the micro-batch: it divides a rank's share of the batch, and
    a pipeline's schedule gets the micro-batches it needs. Call after `structure_problem`."""
    return _micro_batch(layout, workload) or _pipeline_micro_batches(layout, workload)


def _values(lay: Layout, w: Workload) -> Problem | None:
    """Types and ranges (a Layout from outside the config: pins, API users)."""
    for name in _WHOLE:
        value = getattr(lay, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return problem(name, value, "must be a whole number of at least 1")
    for name in _FLAGS:
        if not isinstance(getattr(lay, name), bool):
            return problem(name, getattr(lay, name), "must be true or false")
    if isinstance(lay.zero_stage, bool) or lay.zero_stage not in (0, 1, 2, 3):
        return problem("zero_stage", lay.zero_stage, "must be 0 (none), 1, 2 or 3 (FSDP)")
    if lay.pp_schedule not in SCHEDULES:
        return problem("pp_schedule", lay.pp_schedule, f"is not a schedule; use one of {', '.join(map(fmt, SCHEDULES))}")
    if lay.cp_method not in CP_METHODS:
        return problem("cp_method", lay.cp_method, "is not a context-parallel method; use \"ring\" or \"ulysses\"")
    return None


def _data_parallel(lay: Layout, w: Workload) -> Problem | None:
    """ZeRO over the dp_shard axis, and what needs which stage."""
    z = lay.zero_stage
    if z >= 1 and lay.dp_shard == 1:
        return problem("zero_stage", z, "shards over the data-parallel shard axis, but parallel.dp_shard_degree = 1; "
                       "set parallel.dp_shard_degree > 1 (or -1), or parallel.zero_stage = 0")
    if z == 0 and lay.dp_shard > 1:
        return problem("dp_shard", lay.dp_shard, "needs a ZeRO stage to say what is sharded; set parallel.zero_stage = "
                       "1, 2 or 3 (3 = FSDP), or -1 (auto, the default: 3), or use parallel.dp_replicate_degree "
                       "for plain replicas")
    if lay.mixed_precision and z < 2:
        return problem("mixed_precision", True, f"applies to sharded parameters: it needs parallel.zero_stage = 2 or 3 "
                       f"(with parallel.dp_shard_degree > 1), not {z}; for unsharded layouts use train.dtype = \"bf16\"")
    if lay.cpu_offload and z != 3:
        return problem("cpu_offload", True, f"needs parallel.zero_stage = 3 (with parallel.dp_shard_degree > 1), not {z}")
    spec = OPTIMIZERS.get(w.optimizer)
    if spec is not None and not spec.elementwise and lay.dp > 1 and (z == 1 or (z == 0 and lay.tp > 1)):
        # ZeRO-1's optimizer (also plain data parallelism under TP, where DDP takes no DTensors)
        # steps flat slices that cut through the parameters.
        return problem("optim.name", w.optimizer, f"updates whole matrices, but parallel.zero_stage = {z} "
                       f"{'(ZeRO-1)' if z == 1 else 'with parallel.tp_degree > 1'} steps flat slices of them; set "
                       f"parallel.zero_stage = 2 or 3, or an element-wise optimizer ("
                       f"{', '.join(n for n, s in OPTIMIZERS.items() if s.elementwise)})")
    return None


def _batch_split(lay: Layout, w: Workload) -> Problem | None:
    """The global batch splits over the data-parallel ranks."""
    sequences, dp, seq = w.global_batch_sequences, lay.dp, w.seq_len
    if sequences % dp:
        return problem("train.global_batch_tokens", sequences * seq,
                       f"is {sequences} sequences, which do not split into {dp} data-parallel ranks "
                       f"(parallel.dp_replicate_degree x dp_shard_degree = {lay.dp_replicate} x {lay.dp_shard}); set "
                       f"train.global_batch_tokens = {math.ceil(sequences / dp) * dp * seq}, or a data-parallel "
                       f"degree that divides {sequences}")
    return None


def _micro_batch(lay: Layout, w: Workload) -> Problem | None:
    """Each rank's share of the batch splits into micro-batches."""
    sequences, dp, seq = w.global_batch_sequences, lay.dp, w.seq_len
    per_rank, mb = sequences // dp, lay.micro_batch_size
    if per_rank % mb:
        options = [b for b in range(1, min(mb, per_rank) + 1) if per_rank % b == 0]
        return problem("micro_batch_size", mb, f"does not divide a data-parallel rank's {per_rank} sequences per step "
                       f"(train.global_batch_tokens = {sequences * seq} over {dp} rank(s)); set train.micro_batch_size = "
                       f"{options[-1]} or train.global_batch_tokens = {math.ceil(per_rank / mb) * mb * dp * seq}")
    return None


def tensor_parallel_degrees(a: ModelArgs) -> list[int]:
    """The tensor-parallel degrees this model's shapes split over (whole heads and key/value
    heads, equal shares of the widths and of the vocabulary when it is known)."""
    sizes = [a.heads, a.kv_heads, a.hidden, a.ffn] + ([a.vocab] if a.vocab is not None else [])
    return [d for d in range(1, a.kv_heads + 1) if all(size % d == 0 for size in sizes)]


def _tp_fit(a: ModelArgs) -> str:
    return f"set parallel.tp_degree to one of {tensor_parallel_degrees(a)}"


def tensor_parallel_problem(a: ModelArgs, tp: int, vocab_multiple: int | None = None) -> Problem | None:
    """Whether the model's shapes split over `tp` ranks: whole query and key/value heads on every
    rank, equal shares of the widths and of the vocabulary (`vocab_multiple`: the padding of a
    vocabulary not known yet). `plait.parallel.tensor_parallel` checks it too, for a caller that
    shards a model by hand."""
    if tp == 1:
        return None
    if a.heads % tp:
        return problem("tp", tp, f"does not divide model.heads = {a.heads} (each rank computes whole query heads); "
                       f"{_tp_fit(a)}")
    if a.hidden % tp:
        return problem("tp", tp, f"does not divide model.hidden = {a.hidden}; {_tp_fit(a)}")
    if a.kv_heads < tp:
        # Replicating key/value heads across ranks (as Megatron does for grouped-query attention) is not built.
        return problem("tp", tp, f"is more than model.kv_heads = {a.kv_heads}: each rank needs at least one whole "
                       f"key/value head, and they are not replicated; {_tp_fit(a)}, or raise model.kv_heads to a "
                       f"multiple of {tp} that divides model.heads")
    if a.kv_heads % tp:
        return problem("tp", tp, f"does not divide model.kv_heads = {a.kv_heads} (each rank computes whole key/value "
                       f"heads); {_tp_fit(a)}")
    if a.ffn % tp:
        return problem("tp", tp, f"does not divide the MLP width {a.ffn} (model.ffn_hidden); set model.ffn_hidden to a "
                       f"multiple of {tp} (e.g. {-(-a.ffn // tp) * tp}), or {_tp_fit(a).removeprefix('set ')}")
    if a.vocab is not None and a.vocab % tp:
        return problem("tp", tp, f"does not divide model.vocab = {a.vocab} (the embedding and output head are split "
                       f"by vocabulary rows); set model.vocab = {-(-a.vocab // tp) * tp}, or leave model.vocab unset "
                       f"with model.vocab_multiple a multiple of {tp}")
    if a.vocab is None and vocab_multiple is not None and vocab_multiple % tp:
        return problem("model.vocab_multiple", vocab_multiple, f"is not a multiple of parallel.tp_degree = {tp}, so "
                       f"the padded vocabulary may not split over the ranks; set model.vocab_multiple = "
                       f"{math.lcm(vocab_multiple, tp)}")
    return None


def _tensor_parallel(lay: Layout, w: Workload) -> Problem | None:
    a, tp = w.model, lay.tp
    if lay.sequence_parallel and tp == 1:
        return problem("sequence_parallel", True, "needs parallel.tp_degree > 1 (it splits the tensor-parallel norm "
                       "regions); set parallel.sequence_parallel = false or parallel.tp_degree >= 2")
    if tp == 1:
        return None
    if a.moe_experts:
        return problem("tp", tp, "with a mixture-of-experts model is not in this version of plait (the tensor-parallel "
                       "plan covers dense MLPs only); set parallel.tp_degree = 1")
    found = tensor_parallel_problem(a, tp, w.vocab_multiple)
    if found is not None:
        return found
    if lay.sequence_parallel and w.seq_len % tp:
        options = sorted({-(-w.seq_len // tp) * tp, w.seq_len // tp * tp} - {0})
        return problem("train.seq_len", w.seq_len, f"is not divisible by parallel.tp_degree = {tp} (sequence "
                       f"parallelism splits every sequence over the ranks); set train.seq_len = "
                       f"{' or '.join(map(str, options))}, or parallel.sequence_parallel = false")
    if lay.compile:
        return problem("compile", True, "with parallel.tp_degree > 1 fails inside PyTorch in this version (compiled "
                       "DTensor redistribute in backward); set train.compile = false for tensor-parallel runs")
    return None


def context_parallel_problem(seq: int, kv: int, cp: int, method: str) -> Problem | None:
    """Whether sequences of `seq` tokens and `kv` key/value heads split over `cp` ranks with
    `method`: ring attention cuts each sequence into 2 x cp chunks (to balance the causal work),
    Ulysses gives each rank whole key/value heads."""
    if cp == 1:
        return None
    if method == "ring" and seq % (2 * cp):
        return problem("train.seq_len", seq, f"is not divisible by 2 x parallel.cp_degree = {2 * cp} (ring attention "
                       f"cuts each sequence into 2 x cp chunks to balance the causal work); use train.seq_len = "
                       f"{max(2 * cp, seq // (2 * cp) * 2 * cp)}, or another parallel.cp_degree")
    if method == "ulysses" and seq % cp:
        return problem("train.seq_len", seq, f"is not divisible by parallel.cp_degree = {cp}; use train.seq_len = "
                       f"{max(cp, seq // cp * cp)}, or another parallel.cp_degree")
    if method == "ulysses" and kv % cp:
        return problem("model.kv_heads", kv, f"is not divisible by parallel.cp_degree = {cp}: Ulysses gives each rank "
                       f"kv_heads / cp_degree key/value heads (they are not replicated); use parallel.cp_degree in "
                       f"{[d for d in range(1, kv + 1) if kv % d == 0]} or parallel.cp_method = \"ring\"")
    return None


def _context_parallel(lay: Layout, w: Workload) -> Problem | None:
    cp, z = lay.cp, lay.zero_stage
    if cp == 1:
        return None
    refused = (
        (lay.tp > 1, f"parallel.tp_degree = {lay.tp}",
         "tensor parallelism splits the heads that context parallelism's attention exchanges; set parallel.tp_degree = 1"),
        (lay.pp > 1, f"parallel.pp_degree = {lay.pp}",
         "pipeline stages do not pass the tokens' global positions on; set parallel.pp_degree = 1"),
        (z == 1, "parallel.zero_stage = 1",
         "use parallel.zero_stage = 0 (DDP over data x context ranks) or 2/3 (FSDP over dp_shard x cp)"),
        (z >= 2 and lay.dp_replicate > 1, f"parallel.dp_replicate_degree = {lay.dp_replicate} and parallel.zero_stage "
         f"= {z} (HSDP)", "use parallel.dp_shard_degree alone for FSDP with context parallelism"),
    )
    for bad, what, fix in refused:
        if bad:
            return problem("cp", cp, f"with {what} is not supported in this version: {fix}")
    return context_parallel_problem(w.seq_len, w.model.kv_heads, cp, lay.cp_method)


def _pipeline(lay: Layout, w: Workload) -> Problem | None:
    pp, v, a, schedule = lay.pp, lay.pp_virtual_stages, w.model, lay.pp_schedule
    if pp == 1:
        return None
    if a.tie_embeddings:
        return problem("pp", pp, "with tied embeddings (model.tie_embeddings = true): the first and last stages would "
                       "each need the shared matrix, which plait does not keep in sync across stages; set "
                       "parallel.pp_degree = 1, or model.tie_embeddings = false")
    if a.moe_experts:
        return problem("pp", pp, "with a mixture-of-experts model is not in this version of plait (the balance loss "
                       "is collected outside the pipeline); set parallel.pp_degree = 1")
    if lay.dp > 1 and lay.zero_stage < 2:
        return problem("pp", pp, f"with data parallelism needs parallel.zero_stage = 2 or 3 (FSDP on each stage over "
                       f"the data-parallel axes), not {lay.zero_stage}: DDP and ZeRO-1 are not wired into pipeline "
                       f"stages in plait; set parallel.zero_stage = 3 and parallel.dp_shard_degree > 1")
    if lay.compile and schedule == "zero-bubble":
        return problem("compile", True, "with parallel.pp_schedule = \"zero-bubble\": PyTorch's zero-bubble schedules "
                       "split the backward into input and weight parts, which compiled blocks do not support; set "
                       "train.compile = false or another parallel.pp_schedule")
    if schedule in SINGLE_CHUNK_SCHEDULES and v != 1:
        return problem("pp_virtual_stages", v, f"needs an interleaved schedule, but parallel.pp_schedule = {fmt(schedule)} "
                       f"runs one chunk per rank; set parallel.pp_schedule = \"interleaved-1f1b\" or "
                       f"parallel.pp_virtual_stages = 1")
    if schedule == "interleaved-1f1b" and v < 2:
        return problem("pp_schedule", schedule, "needs parallel.pp_virtual_stages >= 2 (model chunks per rank); set "
                       "parallel.pp_virtual_stages = 2, or parallel.pp_schedule = \"1f1b\"")
    if a.layers < pp * v:
        return problem("model.layers", a.layers, f"cannot fill parallel.pp_degree x pp_virtual_stages = {pp} x {v} = "
                       f"{pp * v} stages of at least one layer; use model.layers >= {pp * v} or fewer stages")
    return None


def _pipeline_micro_batches(lay: Layout, w: Workload) -> Problem | None:
    """A pipeline's schedule gets the micro-batches it needs."""
    pp, schedule = lay.pp, lay.pp_schedule
    if pp == 1:
        return None
    m = lay.microbatches(w)
    if schedule != "gpipe" and m < pp:
        # 1F1B needs a micro-batch for every stage to fill its steady phase (PyTorch refuses fewer),
        # and the interleaved schedules order their rounds by pp_degree micro-batches.
        return problem("pp_schedule", schedule, f"needs at least parallel.pp_degree = {pp} micro-batches per step, but "
                       f"a data-parallel rank's {m * lay.micro_batch_size} sequences at train.micro_batch_size = "
                       f"{lay.micro_batch_size} make {m}; set parallel.pp_microbatches = {pp} or more, or a smaller "
                       f"train.micro_batch_size")
    if schedule not in SINGLE_CHUNK_SCHEDULES and m % (m // pp):
        # PyTorch's interleaved schedules run m // pp_degree rounds of equal size.
        return problem("pp_schedule", schedule, f"runs micro-batches in rounds of parallel.pp_degree = {pp}: the {m} "
                       f"micro-batches per step must split into {m // pp} equal rounds; use a multiple of {pp} "
                       f"micro-batches (parallel.pp_microbatches, or train.micro_batch_size)")
    return None


def _experts(lay: Layout, w: Workload) -> Problem | None:
    experts, ep = w.model.moe_experts, lay.ep
    if experts == 0:
        if ep > 1:
            return problem("ep", ep, "spreads experts, but the model is dense (model.moe_experts = 0); use a "
                           "mixture-of-experts model (model.name = \"debug-moe\", \"tiny-moe\" or model.moe_experts > 0) "
                           "or parallel.ep_degree = 1")
        return None
    if lay.compile:
        return problem("compile", True, "with a mixture-of-experts model is not in this version of plait "
                       "(data-dependent token counts per expert); set train.compile = false")
    if ep == 1:
        return None
    if experts % ep:
        return problem("ep", ep, f"must divide model.moe_experts = {experts} (each rank holds the same number of "
                       f"experts); use one of {[e for e in range(1, experts + 1) if experts % e == 0]}")
    if lay.zero_stage < 2:
        return problem("ep", ep, f"needs parallel.zero_stage = 2 or 3, not {lay.zero_stage}: expert weights are sharded "
                       f"over the ep axis and FSDP averages the dense gradients (DDP and ZeRO-1 would average the "
                       f"expert shards too); set parallel.zero_stage = 3")
    if lay.cp > 1:
        return problem("ep", ep, f"with parallel.cp_degree = {lay.cp} is not in this version of plait (experts spread "
                       f"over context-parallel ranks are untested); set parallel.cp_degree = 1")
    if lay.cpu_offload:
        return problem("cpu_offload", True, f"with parallel.ep_degree = {ep} is not in this version of plait; set "
                       f"parallel.cpu_offload = false")
    if (lay.dp_shard * lay.cp) % ep:
        return problem("ep", ep, f"must divide parallel.dp_shard_degree x cp_degree = {lay.dp_shard} x {lay.cp} (experts "
                       f"are spread over those ranks); set parallel.dp_shard_degree to a multiple of {ep}")
    return None
