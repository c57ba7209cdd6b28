"""Tensor and sequence parallelism on 2 gloo ranks against an unsharded reference.

One spawn of two CPU workers runs every layout (plain TP, TP+SP, the GELU MLP, tied embeddings)
of the `debug` model (vocab 256, fp32): the first loss, every gradient (gathered with
`.full_tensor()`) and the losses of 3 AdamW steps must equal the single-process model's. Rank 0
writes the numbers to a JSON file and the tests compare them, one test per layout. The shape
rules (plait.layout.rules) are pure and run without processes.
"""

from __future__ import annotations


import pytest
import torch

from .spawn import run_cases, run_on_ranks
from plait.layout import Layout, Workload, layout_problem
from plait.model import NAMED_SIZES, build_model
from plait.parallel.tensor_parallel import (
    SEQUENCE_PARALLEL_PLAN,
    TENSOR_PARALLEL_PLAN,
    build_parallelize_plan,
)

WORLD = 2
STEPS = 3
BATCH, SEQ = 4, 16
DEBUG = NAMED_SIZES["debug"].replace(vocab=256)
# name -> (model changes, sequence_parallel)
LAYOUTS: dict[str, tuple[dict, bool]] = {
    "tp": ({}, False),
    "tp_sp": ({}, True),
    "tp_gelu": ({"mlp": "gelu"}, False),
    "tp_sp_gelu": ({"mlp": "gelu"}, True),
    "tp_sp_tied": ({"tie_embeddings": True}, True),
}


def materialize_debug(**changes: object) -> torch.nn.Module:
    from plait.model import materialize

    return materialize(build_model(DEBUG.replace(**changes)), "cpu", seed=0)


def _run_layout(changes: dict, sequence_parallel: bool, mesh) -> dict:
    # Imports here: the worker is a fresh (spawned) interpreter.
    from torch.distributed.tensor import DTensor

    from plait.model import materialize
    from plait.parallel.tensor_parallel import apply_tensor_parallel, loss_parallel_context, tp_cross_entropy

    args = DEBUG.replace(**changes)
    reference = materialize(build_model(args), "cpu", seed=0)
    model = materialize(build_model(args), "cpu", seed=0)
    apply_tensor_parallel(model, mesh, sequence_parallel)

    gen = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, args.vocab, (BATCH, SEQ + 1), generator=gen)
    inputs_BT, targets_BT = tokens[:, :-1], tokens[:, 1:]

    def step_reference() -> float:
        loss = tp_cross_entropy(reference(inputs_BT), targets_BT)
        loss.backward()
        return loss.item()

    def step_sharded() -> float:
        # The backward of loss_parallel only works inside the context.
        with loss_parallel_context(True):
            logits_BTV = model(inputs_BT)
            assert isinstance(logits_BTV, DTensor) and logits_BTV.placements[0].is_shard(2), logits_BTV
            loss = tp_cross_entropy(logits_BTV, targets_BT)
            loss.backward()
        return loss.item()

    out: dict = {"loss_ref": step_reference(), "loss_tp": step_sharded(), "grad_diff": {}, "misplaced": []}
    ref_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        grad = param.grad
        if isinstance(param, DTensor) and grad.placements != param.placements:
            out["misplaced"].append(f"{name}: grad {grad.placements} vs param {param.placements}")
        full = grad.full_tensor() if isinstance(grad, DTensor) else grad
        out["grad_diff"][name] = (full - ref_params[name].grad).abs().max().item()
    out["tied"] = model.output.weight is model.embed.weight

    # foreach=False: the same per-parameter code path for plain and DTensor parameters.
    opt_ref = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    opt_tp = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    out["steps_ref"], out["steps_tp"] = [], []
    for _ in range(STEPS):
        for opt in (opt_ref, opt_tp):
            opt.step()
            opt.zero_grad()
        out["steps_ref"].append(step_reference())
        out["steps_tp"].append(step_sharded())
    return out


def _ranks(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from plait.parallel.tensor_parallel import apply_tensor_parallel

    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
    # A failure is recorded per layout (both ranks fail alike), so one broken layout reports its
    # own traceback and the others still run.
    results = run_cases(rank, {name: (lambda c=case: _run_layout(c[0], c[1], mesh)) for name, case in LAYOUTS.items()})
    try:
        apply_tensor_parallel(materialize_debug(vocab=255), mesh, sequence_parallel=False)
        results["rejects_bad_vocab"] = "no error raised"
    except ValueError as e:
        results["rejects_bad_vocab"] = str(e)
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_on_ranks(_ranks, WORLD, tmp_path_factory.mktemp("tp"))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parity_with_unsharded(results: dict, layout: str) -> None:
    r = results[layout]
    if "error" in r:
        pytest.fail(r["error"], pytrace=False)
    assert abs(r["loss_tp"] - r["loss_ref"]) <= 1e-6 * abs(r["loss_ref"]), (r["loss_tp"], r["loss_ref"])
    bad = {name: diff for name, diff in r["grad_diff"].items() if not diff <= 1e-5}
    assert not bad, f"gradients differ from the reference: {bad}"
    assert len(r["grad_diff"]) == len(list(materialize_debug(**LAYOUTS[layout][0]).parameters()))
    assert not r["misplaced"], r["misplaced"]
    for step, (ref, got) in enumerate(zip(r["steps_ref"], r["steps_tp"]), start=1):
        assert abs(got - ref) <= 1e-5 * abs(ref), f"AdamW step {step}: {got} vs {ref}"
    if LAYOUTS[layout][0].get("tie_embeddings"):
        assert r["tied"], "the output head no longer shares the embedding weight"


def test_apply_rejects_bad_shapes(results: dict) -> None:
    assert "parallel.tp_degree = 2 does not divide model.vocab = 255" in results["rejects_bad_vocab"]


def test_plan_tables_expand_per_block() -> None:
    gelu = build_model(DEBUG.replace(mlp="gelu"))
    plan = build_parallelize_plan(gelu.layers["1"], TENSOR_PARALLEL_PLAN, prefix="layers.1.")
    assert sorted(plan) == ["attn", "attn.k_proj", "attn.o_proj", "attn.q_proj", "attn.v_proj", "mlp", "mlp.down_proj", "mlp.up_proj"]
    plan = build_parallelize_plan(gelu.layers["0"], SEQUENCE_PARALLEL_PLAN, prefix="layers.0.")
    assert {"attn", "attn_norm", "mlp", "mlp_norm"} <= set(plan)
    with pytest.raises(ValueError, match="unknown style 'diagonal'"):
        build_parallelize_plan(gelu, {"embed": "diagonal"})


def _problem(tp: int, sp: bool = False, seq_len: int = 16, vocab_multiple: int | None = None, **changes) -> str:
    """The first rule a tensor-parallel layout of the debug model breaks (plait.layout.rules), or ""."""
    workload = Workload(DEBUG.replace(**changes), seq_len, global_batch_sequences=4, vocab_multiple=vocab_multiple)
    found = layout_problem(Layout(tp=tp, sequence_parallel=sp, dp_replicate=1), workload)
    return found.message if found is not None else ""


def test_problems_accepts_good_layouts() -> None:
    assert _problem(2, True, 16) == ""
    assert _problem(1, False, 15) == ""
    assert _problem(2, True, 16, tie_embeddings=True) == ""
    assert _problem(2, False, 15) == ""  # seq_len only matters with SP


def test_problems_name_fields_and_fixes() -> None:
    text = _problem(3, kv_heads=4)
    assert "parallel.tp_degree = 3 does not divide model.heads = 4" in text
    assert "set parallel.tp_degree to one of [1, 2, 4]" in text
    assert "parallel.tp_degree = 3 does not divide model.kv_heads = 4" in _problem(3, heads=6, hidden=96, kv_heads=4)
    text = _problem(4)  # debug has 2 kv heads: replicating them is not supported
    assert "parallel.tp_degree = 4 is more than model.kv_heads = 2" in text and "not replicated" in text
    assert "does not divide model.heads" not in text

    text = _problem(2, ffn_hidden=191)
    assert "model.ffn_hidden" in text and "192" in text

    text = _problem(2, vocab=257)
    assert "model.vocab = 257" in text and "model.vocab = 258" in text and "model.vocab_multiple" in text
    assert "model.vocab_multiple = 63" in _problem(2, vocab=None, vocab_multiple=63)
    assert _problem(2, vocab=None, vocab_multiple=64) == ""

    text = _problem(2, sp=True, seq_len=15)
    assert "train.seq_len = 15 is not divisible by parallel.tp_degree = 2" in text and "14 or 16" in text

    assert "parallel.sequence_parallel = true needs parallel.tp_degree > 1" in _problem(1, sp=True)
