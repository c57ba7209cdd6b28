"""The planner's memory model (plait.planner.memory) against what plait really allocates.

Model states: on gloo CPU workers, each layout is built the way the trainer builds it
(`build_layout`, `apply_layout`, `build_layout_optimizer`) on the `debug` model in fp32, one
training step runs, and each rank sums the bytes of the distinct storages of its parameters
(local shards), gradients (the larger of the end of backward and after the step: ZeRO-1 frees the
full gradients into its slice) and optimizer state. The most loaded rank must equal
`estimate_memory`'s parameters, gradients and optimizer to the byte.

Activations: the distinct storages autograd saves during one micro-batch's forward (parameters
excluded; a checkpointed block's kept input included), on the `tiny` model at seq_len 256, must
be within 10% of the prediction.

One spawn of 2 workers holds every 1- and 2-rank case, one of 4 the FSDP 2 x TP 2 case.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from .spawn import run_cases, run_on_ranks
from plait.model import NAMED_SIZES

SEQ, SEQUENCES, MICRO = 32, 4, 2  # per step: 4 sequences of 32 tokens, micro-batches of 2 per rank
# (name, model, vocab, degrees (dp_replicate, dp_shard, tp, pp, cp, ep), zero stage, world)
STATE_CASES = {
    "single": ("debug", 256, (1, 1, 1, 1, 1, 1), 0, 1),
    "ddp2": ("debug", 256, (2, 1, 1, 1, 1, 1), 0, 2),
    "zero1x2": ("debug", 256, (1, 2, 1, 1, 1, 1), 1, 2),
    # An odd vocabulary: FSDP2 pads the embedding and head rows (257 -> 2 x 129).
    "zero2x2": ("debug", 257, (1, 2, 1, 1, 1, 1), 2, 2),
    "zero3x2": ("debug", 257, (1, 2, 1, 1, 1, 1), 3, 2),
    "tp2": ("debug", 256, (1, 1, 2, 1, 1, 1), 0, 2),
    "pp2": ("debug", 256, (1, 1, 1, 2, 1, 1), 0, 2),
    "ep2": ("debug-moe", 256, (1, 2, 1, 1, 1, 2), 3, 2),
    "fsdp2_tp2": ("debug", 256, (1, 2, 2, 1, 1, 1), 3, 4),
}
# (name, layout knobs) for one micro-batch of 2 sequences of 256 tokens of `tiny`.
ACT_SEQ, ACT_MICRO = 256, 2
ACT_CASES = {
    "plain": {"world": 1},
    "checkpointing": {"world": 1, "activation_checkpointing": True},
    "tp2": {"world": 2, "tp": 2},
    "tp2_sp": {"world": 2, "tp": 2, "sequence_parallel": True},
    "cp2_ring": {"world": 2, "cp": 2, "cp_method": "ring"},
    "cp2_ulysses": {"world": 2, "cp": 2, "cp_method": "ulysses"},
}


def _layout(degrees: tuple, zero: int, micro: int, **knobs):
    from plait.layout import Layout

    dp_r, dp_s, tp, pp, cp, ep = degrees
    return Layout(pp=pp, dp_replicate=dp_r, dp_shard=dp_s, cp=cp, tp=tp, ep=ep, zero_stage=zero,
                  sequence_parallel=knobs.get("sequence_parallel", False), micro_batch_size=micro,
                  activation_checkpointing=knobs.get("activation_checkpointing", False),
                  cp_method=knobs.get("cp_method", "ring"))


def _build(name: str, vocab: int, layout, seq: int):
    from plait.config import OptimSection
    from plait.model import build_model, materialize
    from plait.parallel.apply import apply_layout, build_layout_optimizer
    from plait.parallel.mesh import build_mesh

    mesh = build_mesh(layout, torch.device("cpu"))
    args = NAMED_SIZES[name].replace(vocab=vocab)
    module = materialize(build_model(args), "cpu", 1234)
    model = apply_layout(module, mesh, seq)
    optimizer = build_layout_optimizer(model, OptimSection(), mesh)
    return args, mesh, module, model, optimizer


def _bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (DTensors: their local shard)."""
    from torch.distributed.tensor import DTensor

    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        local = t._local_tensor if isinstance(t, DTensor) else t
        storage = local.untyped_storage()
        seen[storage.data_ptr() or id(storage)] = storage.nbytes()
    return sum(seen.values())


def _optimizer_tensors(optimizer) -> list:
    from plait.optim.zero1 import Zero1Optimizer

    inner = optimizer._inner if isinstance(optimizer, Zero1Optimizer) else optimizer
    tensors = [v for state in inner.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    if isinstance(optimizer, Zero1Optimizer):
        tensors.append(optimizer._param_slice)
    return tensors


def _grad_tensors(model, optimizer) -> list:
    from plait.optim.zero1 import Zero1Optimizer

    grads = [p.grad for p in model.parameters()]
    if isinstance(optimizer, Zero1Optimizer) and optimizer._grad_slice is not None:
        grads.append(optimizer._grad_slice)
    return grads


def _measure_states(rank: int, case: str) -> dict:
    from plait.parallel.apply import build_grad_clipper
    from plait.parallel.data_parallel import gradient_sync
    from plait.parallel.tensor_parallel import loss_parallel_context
    from plait.planner.memory import estimate_memory_by_stage
    from plait.layout import Layout, Workload
    from plait.parallel.step import lm_loss

    name, vocab, degrees, zero, world = STATE_CASES[case]
    dp_r, dp_s, tp, pp, cp, ep = degrees
    args, mesh, module, model, optimizer = _build(name, vocab, _layout(degrees, zero, MICRO), SEQ)
    dp = dp_r * dp_s
    gen = torch.Generator().manual_seed(7)
    batch = torch.randint(0, vocab, (SEQUENCES, SEQ + 1), generator=gen)
    mine = batch.chunk(dp)[mesh.dp_rank()]
    if pp > 1:
        from plait.parallel.pipeline_parallel import Pipeline

        Pipeline(model, "1f1b", len(mine) // MICRO, torch.device("cpu"), tp > 1).train_step(mine)
    else:
        micros = mine.split(MICRO)
        for i, micro in enumerate(micros):
            with gradient_sync(model, i == len(micros) - 1), loss_parallel_context(tp > 1):
                (lm_loss(model, micro, torch.autocast("cpu", enabled=False)) / len(micros)).backward()
    grads_backward = _bytes(_grad_tensors(module, optimizer))
    build_grad_clipper(module, optimizer, mesh.layout)(1.0)
    optimizer.step()
    measured = {
        "parameters": _bytes(module.parameters()),
        "gradients": max(grads_backward, _bytes(_grad_tensors(module, optimizer))),
        "optimizer": _bytes(_optimizer_tensors(optimizer)),
    }
    # Per pipeline rank, the most loaded of its ranks on the other axes (cases of fewer ranks
    # than the spawn run the same on every rank).
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (mesh.coordinate("pp"), measured))
    most = [max((m for r, m in everyone if r == stage), key=lambda m: sum(m.values())) for stage in range(pp)]
    workload = Workload(args, SEQ, SEQUENCES, dtype="fp32")
    plan = Layout(pp=pp, dp_replicate=dp_r, dp_shard=dp_s, cp=cp, tp=tp, ep=ep, zero_stage=zero,
                  micro_batch_size=MICRO, mixed_precision=False)
    predicted = [e.parts for e in estimate_memory_by_stage(workload, plan)]
    return {"measured": most, "predicted": [{k: stage[k] for k in most[0]} for stage in predicted]}


def _measure_activations(rank: int, case: str) -> dict:
    """Saved-tensor bytes of one micro-batch's forward on this rank, and the prediction."""
    from plait.planner.memory import estimate_memory
    from plait.layout import Layout, Workload
    from plait.parallel.tensor_parallel import loss_parallel_context
    from plait.parallel.step import lm_loss
    from torch.distributed.tensor import DTensor

    knobs = dict(ACT_CASES[case])
    world = knobs.pop("world")
    tp, cp = knobs.get("tp", 1), knobs.get("cp", 1)
    degrees = (1, 1, tp, 1, cp, 1)
    args, mesh, module, model, _ = _build("tiny", 256, _layout(degrees, 0, ACT_MICRO, **knobs), ACT_SEQ)
    cp_sharding = None
    if cp > 1:
        from plait.parallel.context_parallel import context_sharding

        cp_sharding = context_sharding(mesh.submesh("cp"), mesh.layout.cp_method)

    def storage(t: torch.Tensor):
        # Unwrap DTensors and functional collectives' async results to the tensor holding memory.
        while isinstance(t, DTensor) or hasattr(t, "elem"):
            t = t._local_tensor if isinstance(t, DTensor) else t.elem
        return t.untyped_storage()

    params = {storage(p).data_ptr() for p in module.parameters()}
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> None:
        s = storage(t)
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        keep(t)
        return t

    # A checkpointed block keeps its input for the recomputation (not through saved tensors).
    hooks = [block.register_forward_pre_hook(lambda _m, inputs: keep(inputs[0])) for block in module.layers.values()] \
        if knobs.get("activation_checkpointing") else []
    batch = torch.randint(0, 256, (ACT_MICRO, ACT_SEQ + 1), generator=torch.Generator().manual_seed(3))
    with loss_parallel_context(tp > 1), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = lm_loss(model, batch, torch.autocast("cpu", enabled=False), cp_sharding)
    for hook in hooks:
        hook.remove()
    with loss_parallel_context(tp > 1):
        loss.backward()  # the graph is whole (and frees its saved tensors)
    workload = Workload(args, ACT_SEQ, ACT_MICRO * world // (tp * cp), dtype="fp32")
    plan = Layout(tp=tp, cp=cp, micro_batch_size=ACT_MICRO, mixed_precision=False,
                  **{k: v for k, v in knobs.items() if k in ("sequence_parallel", "activation_checkpointing", "cp_method")})
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sum(saved.values()))
    return {"measured": max(everyone), "predicted": estimate_memory(workload, plan).parts["activations"]}


def _ranks2(rank: int) -> dict:
    cases = {}
    for case, spec in STATE_CASES.items():
        if spec[-1] <= 2:
            cases[f"states:{case}"] = lambda c=case: _measure_states(rank, c)
    for case, spec in ACT_CASES.items():
        cases[f"activations:{case}"] = lambda c=case: _measure_activations(rank, c)
    return run_cases(rank, cases)


def _ranks4(rank: int) -> dict:
    return run_cases(rank, {f"states:{c}": (lambda c=c: _measure_states(rank, c)) for c, s in STATE_CASES.items() if s[-1] == 4})


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = run_on_ranks(_ranks2, 2, tmp_path_factory.mktemp("mem2"))
    out.update(run_on_ranks(_ranks4, 4, tmp_path_factory.mktemp("mem4")))
    return out


def _get(results: dict, key: str) -> dict:
    r = results[key]
    if "error" in r:
        pytest.fail(r["error"], pytrace=False)
    return r


@pytest.mark.parametrize("case", list(STATE_CASES))
def test_model_states_equal_measured_bytes(results: dict, case: str) -> None:
    r = _get(results, f"states:{case}")
    print(case, r)
    assert r["measured"] == r["predicted"], r


@pytest.mark.parametrize("case", list(ACT_CASES))
def test_activations_within_ten_percent(results: dict, case: str) -> None:
    r = _get(results, f"activations:{case}")
    measured, predicted = r["measured"], r["predicted"]
    print(f"{case}: measured {measured} predicted {predicted} ({(predicted - measured) / measured:+.1%})")
    assert abs(predicted - measured) <= 0.10 * measured, r
