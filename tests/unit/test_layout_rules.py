"""The layout rules are stated once (plait.layout.rules), and `plait train` and the planner agree:

- every layout the planner emits is a config `plait train` accepts, and resolves back to that
  very layout (the one type the planner emits and the trainer runs);
- a refused example of every rule is refused by both with the same sentence, which names the
  field, the value and the fix.
"""

from __future__ import annotations

import dataclasses

import pytest

from plait.config import Config, ConfigError, ModelSection, OptimSection, ParallelSection, TrainSection
from plait.hardware.devices import Cluster, Device, Link
from plait.layout import Layout, Workload, layout_problem, resolve_layout
from plait.model.sizes import NAMED_SIZES
from plait.optim import OPTIMIZERS, OptimizerSpec
from plait.planner.check import PlanError, check_layout
from plait.planner.explain import plan_config
from plait.planner.search import candidate, enumerate_layouts
from plait.planner.types import Candidate, MemoryEstimate, TimeEstimate
from plait.validation import resolve_run, validate

GIB = 2**30
INTRA, INTER = Link(bandwidth=300e9, latency=5e-6), Link(bandwidth=25e9, latency=10e-6)


def _cluster(gpus: int, per_node: int = 8) -> Cluster:
    device = Device(name="test-gpu", peak_flops={"bf16": 1e15, "fp32": 5e14}, memory_bytes=80 * GIB)
    return Cluster(device=device, gpus=gpus, gpus_per_node=per_node, intra=INTRA, inter=INTER,
                   host_memory_bytes=2048 * GIB, source="test")


def _workload(name: str, seq_len: int, sequences: int, dtype: str = "bf16") -> Workload:
    args = NAMED_SIZES[name]
    if args.vocab is None:
        args = args.replace(vocab=256)  # the byte tokenizer's vocabulary, as `plait plan` resolves it
    return Workload(model=args, seq_len=seq_len, global_batch_sequences=sequences, dtype=dtype)


def _config(layout: Layout, workload: Workload, name: str) -> Config:
    """The config `plait plan --write` writes for this layout (sections built directly: parsing
    TOML for thousands of layouts would dominate the test)."""
    c = Candidate(layout=layout, memory=MemoryEstimate(), time=TimeEstimate(), tokens_per_s_per_gpu=0.0,
                  tflops_per_gpu=0.0, mfu=0.0, fits=True)
    sections = plan_config(c, workload, {"name": name})
    return Config(model=ModelSection(**sections["model"]), train=TrainSection(**sections["train"]),
                  parallel=ParallelSection(**sections["parallel"]))


@pytest.mark.parametrize("name, gpus, per_node, seq_len, sequences", [
    ("debug", 8, 4, 64, 16),
    ("debug-moe", 8, 8, 64, 16),
    ("1b", 16, 8, 2048, 64),  # tied embeddings: no pipeline
    ("8b", 32, 8, 4096, 64),
])
def test_every_emitted_layout_is_what_train_runs(name, gpus, per_node, seq_len, sequences):
    workload, cluster = _workload(name, seq_len, sequences), _cluster(gpus, per_node)
    layouts = list(enumerate_layouts(workload, cluster, {}))
    assert len(layouts) > 10
    assert len(set(layouts)) == len(layouts)  # no layout twice
    # resolve_run takes about a millisecond: all layouts of the small cases, an even sample of about
    # 500 of the large ones (every structure's variants are spread through the list).
    kinds = set()
    for layout in layouts[:: max(1, len(layouts) // 500)]:
        assert layout.world == gpus and layout_problem(layout, workload) is None, layout
        run = resolve_run(_config(layout, workload, name), gpus)  # raises ConfigError where train refuses
        assert run.layout == layout
        kinds.add((layout.tp > 1, layout.pp > 1, layout.cp > 1, layout.ep > 1, layout.zero_stage))
    assert len(kinds) >= 3  # the search covers several parallelisms, not one family


def _refused(name, seq_len, sequences, gpus, match, train="same", dtype="bf16", **layout):
    """A layout that breaks one rule. `train`: "same" (plait train refuses the config the plan
    would write with the same sentence), "planner" (planner input that is no train config), or
    "resolves" (plait train derives another, valid layout from that config)."""
    readable = match.replace("\\", "").replace(".*", "...")
    return pytest.param(name, seq_len, sequences, dtype, gpus, layout, train, match, id=readable[:48])


REFUSED = [
    # data parallelism and ZeRO
    _refused("8b", 4096, 64, 32, r"parallel.zero_stage = 3 shards .* but parallel.dp_shard_degree = 1", tp=8,
             dp_replicate=4, zero_stage=3),
    _refused("8b", 4096, 64, 32, r"parallel.dp_shard_degree = 32 needs a ZeRO stage", dp_shard=32),
    _refused("8b", 4096, 64, 32, r"parallel.mixed_precision = true .*zero_stage = 2 or 3 .* not 1", dp_shard=32,
             zero_stage=1, mixed_precision=True),
    _refused("8b", 4096, 64, 32, r"parallel.cpu_offload = true needs parallel.zero_stage = 3", dp_shard=32, zero_stage=2,
             cpu_offload=True),
    # the batch
    _refused("8b", 4096, 64, 48, r"train.global_batch_tokens = 262144 is 64 sequences, which do not split into 48",
             dp_shard=48, zero_stage=3),
    _refused("8b", 4096, 64, 32, r"train.micro_batch_size = 3 does not divide a data-parallel rank's 8 sequences", tp=4,
             dp_shard=8, zero_stage=3, micro_batch_size=3),
    # tensor parallelism
    _refused("8b", 4096, 64, 48, r"parallel.tp_degree = 3 does not divide model.heads = 32", tp=3, dp_shard=16, zero_stage=3),
    _refused("8b", 4096, 64, 32, r"parallel.tp_degree = 16 is more than model.kv_heads = 8", tp=16, dp_shard=2, zero_stage=3),
    _refused("8b", 4096, 64, 32, r"parallel.sequence_parallel = true needs parallel.tp_degree > 1", dp_shard=32,
             zero_stage=3, sequence_parallel=True),
    _refused("8b", 4098, 64, 32, r"train.seq_len = 4098 is not divisible by parallel.tp_degree = 4 .* sequence",
             tp=4, dp_shard=8, zero_stage=3, sequence_parallel=True),
    _refused("8b", 4096, 64, 32, r"train.compile = true with parallel.tp_degree > 1", tp=4, dp_shard=8, zero_stage=3,
             compile=True),
    # context parallelism
    _refused("8b", 4096, 64, 32, r"parallel.cp_degree = 2 with parallel.tp_degree = 2", tp=2, cp=2, dp_shard=8, zero_stage=3),
    _refused("8b", 4096, 64, 32, r"parallel.cp_degree = 2 with parallel.pp_degree = 2", pp=2, cp=2, dp_shard=8, zero_stage=3),
    _refused("8b", 4096, 64, 32, r"parallel.cp_degree = 2 with parallel.zero_stage = 1", cp=2, dp_shard=16, zero_stage=1),
    _refused("8b", 4096, 64, 32, r"parallel.cp_degree = 2 with parallel.dp_replicate_degree = 2 .* \(HSDP\)", cp=2,
             dp_replicate=2, dp_shard=8, zero_stage=3),
    _refused("8b", 102, 64, 32, r"train.seq_len = 102 is not divisible by 2 x parallel.cp_degree = 4 \(ring", cp=2,
             dp_shard=16, zero_stage=3),
    _refused("8b", 4096, 64, 32, r"model.kv_heads = 8 is not divisible by parallel.cp_degree = 16: Ulysses", cp=16,
             cp_method="ulysses", dp_shard=2, zero_stage=3),
    # pipeline parallelism
    _refused("1b", 2048, 64, 32, r"parallel.pp_degree = 2 with tied embeddings", pp=2, dp_shard=16, zero_stage=3),
    _refused("8b", 4096, 64, 32, r"parallel.pp_degree = 2 with data parallelism .*zero_stage = 2 or 3 .* not 1", pp=2,
             dp_shard=16, zero_stage=1),
    _refused("8b", 4096, 64, 32, r"parallel.pp_degree = 2 with data parallelism .* not 0", pp=2, dp_replicate=16),
    _refused("8b", 4096, 64, 32, r"train.compile = true with parallel.pp_schedule = \"zero-bubble\"", pp=4, dp_shard=8,
             zero_stage=3, pp_schedule="zero-bubble", compile=True),
    _refused("8b", 4096, 64, 32, r"parallel.pp_virtual_stages = 2 needs an interleaved schedule", pp=4, dp_shard=8,
             zero_stage=3, pp_virtual_stages=2),
    _refused("8b", 4096, 64, 32, r"parallel.pp_schedule = \"interleaved-1f1b\" needs parallel.pp_virtual_stages >= 2",
             pp=4, dp_shard=8, zero_stage=3, pp_schedule="interleaved-1f1b"),
    _refused("8b", 4096, 64, 32, r"model.layers = 32 cannot fill .* 32 x 2 = 64 stages", pp=32,
             pp_schedule="interleaved-1f1b", pp_virtual_stages=2),
    _refused("8b", 4096, 72, 32, r"parallel.pp_schedule = \"interleaved-1f1b\" runs micro-batches in rounds .* the 9",
             pp=4, dp_shard=8, zero_stage=3, pp_schedule="interleaved-1f1b", pp_virtual_stages=2),
    # plait train raises the micro-batch count to fill the pipeline: another layout than this one.
    _refused("8b", 4096, 64, 32, r"parallel.pp_schedule = \"1f1b\" needs at least parallel.pp_degree = 4 micro-batches",
             "resolves", pp=4, dp_shard=8, zero_stage=3, micro_batch_size=4),
    # mixture of experts and expert parallelism
    _refused("8b", 4096, 64, 32, r"parallel.ep_degree = 2 spreads experts, but the model is dense", dp_shard=32,
             zero_stage=3, ep=2),
    _refused("debug-moe", 64, 16, 8, r"parallel.tp_degree = 2 with a mixture-of-experts model", tp=2, dp_shard=4,
             zero_stage=3),
    _refused("debug-moe", 64, 16, 8, r"parallel.pp_degree = 2 with a mixture-of-experts model", pp=2, dp_shard=4,
             zero_stage=3),
    _refused("debug-moe", 64, 16, 8, r"train.compile = true with a mixture-of-experts model", dp_shard=8, zero_stage=3,
             compile=True),
    _refused("debug-moe", 64, 12, 6, r"parallel.ep_degree = 3 must divide model.moe_experts = 4", dp_shard=6,
             zero_stage=3, ep=3),
    _refused("debug-moe", 64, 16, 8, r"parallel.ep_degree = 2 needs parallel.zero_stage = 2 or 3, not 1", dp_shard=8,
             zero_stage=1, ep=2),
    _refused("debug-moe", 64, 16, 8, r"parallel.ep_degree = 2 with parallel.cp_degree = 2", cp=2, dp_shard=4,
             zero_stage=3, ep=2),
    _refused("debug-moe", 64, 16, 8, r"parallel.cpu_offload = true with parallel.ep_degree = 2", dp_shard=8,
             zero_stage=3, ep=2, cpu_offload=True),
    _refused("debug-moe", 64, 16, 2, r"parallel.ep_degree = 4 must divide parallel.dp_shard_degree x cp_degree = 2 x 1",
             dp_shard=2, zero_stage=3, ep=4),
    # planner input that is no plait train config
    _refused("8b", 4096, 64, 32, r"= 16 ranks, but the cluster has 32 GPU\(s\); e.g. dp_shard = 32", "planner",
             dp_shard=16, zero_stage=3),
    _refused("8b", 4096, 64, 32, r"mixed_precision = true computes in bf16, but the workload's dtype is 'fp32'",
             "planner", dtype="fp32", dp_shard=32, zero_stage=3, mixed_precision=True),
    _refused("8b", 4096, 64, 32, r"parallel.tp_degree = 0 must be a whole number of at least 1", "planner", tp=0),
    _refused("8b", 4096, 64, 32, r"parallel.zero_stage = 4 must be 0", "planner", dp_shard=32, zero_stage=4),
    _refused("8b", 4096, 64, 32, r"parallel.pp_schedule = \"dualpipe\" is not a schedule", "planner", pp=2,
             dp_shard=16, zero_stage=3, pp_schedule="dualpipe"),
]


@pytest.mark.parametrize("name, seq_len, sequences, dtype, gpus, layout, train, match", REFUSED)
def test_train_and_planner_refuse_with_the_same_sentence(name, seq_len, sequences, dtype, gpus, layout, train, match):
    workload = _workload(name, seq_len, sequences, dtype)
    lay, cluster = Layout(**layout), _cluster(gpus)
    with pytest.raises(PlanError, match=match) as planned:
        check_layout(workload, lay, cluster)
    with pytest.raises(PlanError, match=match):
        candidate(workload, lay, cluster)  # what --layout pins and API users reach
    if train == "planner":
        return
    cfg = _config(lay, workload, name)
    cfg.train.compile = lay.compile
    if train == "resolves":
        run = resolve_run(cfg, gpus)
        assert run.layout != lay and layout_problem(run.layout, workload) is None
        return
    with pytest.raises(ConfigError) as refused:
        validate(cfg, gpus)
    problem = layout_problem(lay, workload)
    assert problem is not None and str(refused.value) == problem.message
    assert str(planned.value).endswith(": " + problem.message)
    assert problem.message.startswith(f"{problem.field} = ")  # names the field and its value first


def test_resolution_fills_the_world_and_derives_the_micro_batch():
    t = TrainSection(seq_len=64, global_batch_tokens=64 * 32, micro_batch_size=32)
    workload = Workload(model=NAMED_SIZES["debug"], seq_len=64, global_batch_sequences=32)
    lay = resolve_layout(ParallelSection(dp_shard_degree=-1), t, 4, workload)
    assert (lay.dp_shard, lay.zero_stage, lay.micro_batch_size) == (4, 3, 8)  # auto ZeRO-3; a rank's share
    lay = resolve_layout(ParallelSection(dp_shard_degree=-1, tp_degree=2), t, 2, workload)
    assert (lay.dp_shard, lay.zero_stage) == (1, 0)  # the fill leaves one rank: nothing to shard
    lay = resolve_layout(ParallelSection(pp_degree=2), t, 2, workload)
    assert lay.micro_batch_size == 16  # one micro-batch per stage at least: the count rises to 2
    lay = resolve_layout(ParallelSection(pp_degree=2, pp_microbatches=8), t, 2, workload)
    assert lay.micro_batch_size == 4
    with pytest.raises(ConfigError, match="only one degree may be -1"):
        resolve_layout(ParallelSection(dp_shard_degree=-1, dp_replicate_degree=-1), t, 4, workload)
    with pytest.raises(ConfigError, match="multiply to tp 2 = 2, but the job has 4 worker"):
        resolve_layout(ParallelSection(tp_degree=2), t, 4, workload)


def test_zero1_refuses_an_optimizer_that_is_not_element_wise(monkeypatch):
    """ZeRO-1 steps flat slices that cut through parameters: a whole-matrix optimizer is refused
    with the field and the fix, and runs under FSDP."""
    adamw = OPTIMIZERS["adamw"]
    monkeypatch.setitem(OPTIMIZERS, "matrixwise", dataclasses.replace(adamw, name="matrixwise", elementwise=False))
    cfg = Config(optim=OptimSection(name="matrixwise"), parallel=ParallelSection(dp_shard_degree=2, zero_stage=1))
    with pytest.raises(ConfigError, match=r'optim.name = "matrixwise" updates whole matrices, but parallel.zero_stage = 1 '
                                          r'\(ZeRO-1\) steps flat slices of them; set parallel.zero_stage = 2 or 3, or an '
                                          r'element-wise optimizer \(adamw\)'):
        validate(cfg, 2)
    validate(Config(optim=OptimSection(name="matrixwise"), parallel=ParallelSection(dp_shard_degree=2, zero_stage=3)), 2)
    assert isinstance(adamw, OptimizerSpec) and adamw.elementwise


def test_unknown_optimizer_is_named():
    with pytest.raises(ConfigError, match="optim.name = 'adamww' is not an optimizer of plait; did you mean 'adamw'"):
        validate(Config(optim=OptimSection(name="adamww")))
