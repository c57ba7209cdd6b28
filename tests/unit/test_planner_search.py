"""The planner's time model, search and `plait plan`: every emitted layout is one `plait train`
accepts, pins are honoured, the answers come out as a table, JSON and a config file."""

from __future__ import annotations

import json

import pytest

from plait.cli import main
from plait.config import Config, load_toml, validate
from plait.model.sizes import NAMED_SIZES
from plait.planner.explain import plan_config
from plait.planner.search import PlanError, enumerate_layouts, plan
from plait.planner.timing import estimate_time, link_for, ring_time
from plait.planner.types import Cluster, Device, Layout, Link, Workload

GIB = 2**30
INTRA, INTER = Link(bandwidth=300e9, latency=5e-6), Link(bandwidth=25e9, latency=10e-6)


def _cluster(gpus: int, per_node: int = 8, memory: int = 80 * GIB) -> Cluster:
    device = Device(name="test-gpu", peak_flops={"bf16": 1e15, "fp32": 5e14}, memory_bytes=memory)
    return Cluster(device=device, gpus=gpus, gpus_per_node=per_node, intra=INTRA, inter=INTER, source="test")


def _workload(name: str, seq_len: int, sequences: int) -> Workload:
    args = NAMED_SIZES[name]
    if args.vocab is None:
        args = args.replace(vocab=256)  # the byte tokenizer's vocabulary, as `plait plan` resolves it
    return Workload(model=args, seq_len=seq_len, global_batch_sequences=sequences)


@pytest.mark.parametrize("name, gpus, per_node, seq_len, sequences", [
    ("debug", 8, 4, 64, 16),
    ("debug-moe", 8, 8, 64, 16),
    ("1b", 16, 8, 2048, 64),  # tied embeddings: no pipeline
    ("8b", 32, 8, 4096, 64),
])
def test_every_emitted_layout_passes_train_validation(name, gpus, per_node, seq_len, sequences):
    workload = _workload(name, seq_len, sequences)
    layouts = list(enumerate_layouts(workload, _cluster(gpus, per_node), {}))
    assert len(layouts) > 10
    assert len({lay for lay in layouts}) == len(layouts)  # no layout twice
    # validate() takes a few ms: all layouts of the small cases, an even sample of about 500 of the
    # large one (every structure's variants are spread through the list, so all families are hit).
    stride = max(1, len(layouts) // 500)
    kinds = set()
    for layout in layouts[::stride]:
        assert layout.world == gpus, layout
        validate(_config(layout, workload, name), gpus)  # raises ConfigError on a layout plait train refuses
        kinds.add((layout.tp > 1, layout.pp > 1, layout.cp > 1, layout.ep > 1, layout.zero_stage))
    assert len(kinds) >= 3  # the search covers several parallelisms, not one family


def _config(layout: Layout, workload: Workload, name: str) -> Config:
    """The config `plan_config` writes for this layout (sections built directly: parsing TOML
    for thousands of layouts would dominate the test)."""
    from plait.config import ModelSection, ParallelSection, TrainSection
    from plait.planner.types import Candidate, MemoryEstimate, TimeEstimate

    c = Candidate(layout=layout, memory=MemoryEstimate(), time=TimeEstimate(), tokens_per_s_per_gpu=0.0,
                  tflops_per_gpu=0.0, mfu=0.0, fits=True)
    sections = plan_config(c, workload, {"name": name})
    return Config(model=ModelSection(**sections["model"]), train=TrainSection(**sections["train"]),
                  parallel=ParallelSection(**sections["parallel"]))


def test_ring_collective_time_follows_the_formula():
    link = Link(bandwidth=1e9, latency=1e-3)
    assert ring_time("all_reduce", 8e9, 4, link) == pytest.approx(2 * 3 / 4 * 8 + 2 * 3 * 1e-3)
    assert ring_time("all_gather", 8e9, 4, link) == pytest.approx(3 / 4 * 8 + 3 * 1e-3)
    assert ring_time("all_reduce", 8e9, 1, link) == 0.0


def test_groups_cross_nodes_by_mesh_order():
    cluster = _cluster(64, per_node=8)
    layout = Layout(tp=8, dp_shard=8, zero_stage=3)
    assert link_for(layout, cluster, "tp") is cluster.intra  # tp ranks are neighbours
    assert link_for(layout, cluster, "dp_shard") is cluster.inter  # 8 x 8 spans 8 nodes
    assert link_for(Layout(tp=2, dp_shard=4, zero_stage=3), cluster, "dp_shard") is cluster.intra


def test_time_model_parts_respond_to_the_layout():
    workload, cluster = _workload("8b", 4096, 64), _cluster(16)
    plain = estimate_time(workload, Layout(dp_shard=16, zero_stage=3, micro_batch_size=1), cluster)
    ac = estimate_time(workload, Layout(dp_shard=16, zero_stage=3, micro_batch_size=1, activation_checkpointing=True), cluster)
    assert plain.parts["recompute"] == 0 and ac.parts["recompute"] == pytest.approx(plain.parts["compute"] / 3)
    assert plain.collectives["fsdp_reduce_scatter"] > 0
    tp = estimate_time(workload, Layout(tp=4, dp_shard=4, zero_stage=3), cluster)
    assert tp.parts["tp_allreduce"] > 0
    bubbles = {}
    for schedule, v in (("1f1b", 1), ("interleaved-1f1b", 2), ("zero-bubble", 1)):
        lay = Layout(pp=4, dp_shard=4, zero_stage=3, pp_schedule=schedule, pp_virtual_stages=v)
        bubbles[schedule] = estimate_time(workload, lay, cluster).parts["pipeline_bubble"]
    assert bubbles["zero-bubble"] < bubbles["interleaved-1f1b"] < bubbles["1f1b"]


def test_405b_on_1024_gpus_is_answered():
    workload = _workload("405b", 8192, 2048)
    cands = plan(workload, _cluster(1024), top=5)
    assert cands and all(c.fits and c.layout.world == 1024 for c in cands)
    assert [c.tokens_per_s_per_gpu for c in cands] == sorted((c.tokens_per_s_per_gpu for c in cands), reverse=True)
    assert all(c.memory.total <= 80 * GIB for c in cands)


def test_pins_are_honoured_and_unknown_pins_named():
    workload = _workload("8b", 4096, 64)
    cands = plan(workload, _cluster(32), {"tp": 4, "pp": 2, "ac": True}, top=20)
    assert cands and all(c.layout.tp == 4 and c.layout.pp == 2 and c.layout.activation_checkpointing for c in cands)
    with pytest.raises(PlanError, match="'tpp'.*'tp'"):
        plan(workload, _cluster(32), {"tpp": 4})


CLI = ["plan", "--model.name=8b", "--gpus", "32", "--gpu", "h100", "--global-batch-sequences", "64", "--seq-len", "4096"]


def test_cli_prints_table_and_explanation(capsys):
    assert main(CLI + ["--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "tok/s/GPU" in out and "MFU" in out and "chosen:" in out
    assert "memory per GPU" in out and "step time" in out and "runner-up" in out


def test_cli_json_has_the_keys(capsys):
    assert main(CLI + ["--json", "--top", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] and len(data["layouts"]) == 2
    for row in data["layouts"]:
        assert {"degrees", "micro_batch", "memory_bytes_per_gpu", "tokens_per_s_per_gpu", "tflops_per_gpu", "mfu"} <= set(row)
        assert row["degrees"]["tp"] * row["degrees"]["pp"] * row["degrees"]["cp"] * row["degrees"]["dp"] == 32


def test_cli_write_gives_a_config_train_accepts(tmp_path, capsys):
    out = tmp_path / "plan.toml"
    assert main(CLI + ["--layout", "tp=2,pp=2", "--write", str(out)]) == 0
    cfg = load_toml(out)
    validate(cfg, 32)
    assert cfg.parallel.tp_degree == 2 and cfg.parallel.pp_degree == 2 and cfg.model.name == "8b"
    assert cfg.train.global_batch_tokens == 64 * 4096


def test_cli_says_what_to_change_when_nothing_fits(capsys):
    # Without CPU offload (the planner does not yet check host memory, so offload "fits" anything).
    rc = main(["plan", "--model.name=405b", "--gpus", "8", "--gpu", "h100", "--global-batch-sequences", "16",
               "--layout", "offload=false"])
    err = capsys.readouterr().err
    assert rc == 1 and "no layout fits" in err and "--gpus" in err


def test_cli_bad_flags_are_named(capsys):
    assert main(["plan", "--model.name=8b", "--gpus", "8", "--global-batch-tokens", "1000", "--seq-len", "4096"]) == 2
    assert "--global-batch-tokens = 1000" in capsys.readouterr().err
    assert main(["plan", "--model.name=8b"]) == 2
    assert "--gpus" in capsys.readouterr().err
    assert main(["plan", "--model.name=8b", "--gpus", "8", "--layout", "tp"]) == 2
    assert "key=value" in capsys.readouterr().err
