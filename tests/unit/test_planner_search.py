"""The planner's time model, search and `plait plan`: every emitted layout is one `plait train`
accepts, pins are honoured, the answers come out as a table, JSON and a config file."""

from __future__ import annotations

import json

import pytest

from plait.cli import main
from plait.config import Config, ConfigError, load_toml, validate
from plait.hardware.devices import Cluster, Device, Link
from plait.model.sizes import NAMED_SIZES
from plait.planner.explain import memory_breakdown, nothing_fits, plan_config
from plait.planner.memory import estimate_memory, memory_fits
from plait.planner.search import PlanError, candidate, check_layout, enumerate_layouts, plan
from plait.planner.timing import estimate_time, link_for, ring_time
from plait.planner.types import Layout, Workload

GIB = 2**30
INTRA, INTER = Link(bandwidth=300e9, latency=5e-6), Link(bandwidth=25e9, latency=10e-6)


def _cluster(gpus: int, per_node: int = 8, memory: int = 80 * GIB, host: int = 2048 * GIB, name: str = "test-gpu") -> Cluster:
    device = Device(name=name, peak_flops={"bf16": 1e15, "fp32": 5e14}, memory_bytes=memory)
    return Cluster(device=device, gpus=gpus, gpus_per_node=per_node, intra=INTRA, inter=INTER,
                   host_memory_bytes=host, source="test")


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
    cluster = _cluster(gpus, per_node)
    layouts = list(enumerate_layouts(workload, cluster, {}))
    assert len(layouts) > 10
    assert len({lay for lay in layouts}) == len(layouts)  # no layout twice
    for layout in layouts:  # check_layout is arithmetic: every layout
        check_layout(workload, layout, cluster)
        assert not layout.mixed_precision or layout.zero_stage >= 2  # what --write puts in [parallel]
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
    # 405B's states (6.5 TB) fit neither 8 GPUs nor, offloaded, one 2 TB node: host memory runs out.
    rc = main(["plan", "--model.name=405b", "--gpus", "8", "--gpu", "h100", "--global-batch-sequences", "16"])
    err = capsys.readouterr().err
    assert rc == 1 and "no layout fits" in err and "--gpus 32" in err and "host memory per node" in err
    rc = main(["plan", "--model.name=405b", "--gpus", "8", "--gpu", "h100", "--global-batch-sequences", "16",
               "--layout", "offload=false"])
    err = capsys.readouterr().err
    assert rc == 1 and "per GPU, but a h100 has" in err and "host memory" not in err


def test_cli_bad_flags_are_named(capsys):
    assert main(["plan", "--model.name=8b", "--gpus", "8", "--global-batch-tokens", "1000", "--seq-len", "4096"]) == 2
    assert "--global-batch-tokens = 1000" in capsys.readouterr().err
    assert main(["plan", "--model.name=8b"]) == 2
    assert "--gpus" in capsys.readouterr().err
    assert main(["plan", "--model.name=8b", "--gpus", "8", "--layout", "tp"]) == 2
    assert "key=value" in capsys.readouterr().err


# ---- host memory: CPU offload and the "cpu" device ----------------------------------------------


def test_offload_is_planned_only_where_host_memory_holds_the_states():
    """70B's 1.1 TB of states: not on 8 GPUs of 80 GB, and offloaded they need a node with
    1.1 TB of host memory after the reserve: a 2 TiB node holds them, a 1 TiB one does not."""
    workload = _workload("70b", 4096, 16)
    pins = {"dp": 8}  # the data-parallel layouts: the only ones offload applies to here
    big = plan(workload, _cluster(8, host=2048 * GIB), pins, top=5)
    assert big and all(c.fits for c in big) and big[0].layout.cpu_offload
    small_cluster = _cluster(8, host=1024 * GIB)
    small = plan(workload, small_cluster, pins, top=5)
    assert small and not any(c.fits for c in small)
    offloaded = [c for c in small if c.layout.cpu_offload]
    assert offloaded and all(c.memory.total <= small_cluster.device.memory_bytes for c in offloaded)  # host ran out
    assert "of host memory per node" in nothing_fits(small, workload, small_cluster)
    # The same offloaded layout: its device bytes fit both clusters; only the host decides.
    layout = big[0].layout
    assert candidate(workload, layout, _cluster(8, host=2048 * GIB)).fits
    assert not candidate(workload, layout, small_cluster).fits
    assert "host memory per node" in memory_breakdown(big[0], _cluster(8, host=2048 * GIB))


def test_cpu_workers_on_one_machine_share_its_memory():
    """On the "cpu" device each worker's bytes come out of the machine's memory: two workers on
    one machine with less than twice a worker's bytes do not fit, even if each would alone."""
    workload = Workload(model=NAMED_SIZES["debug"].replace(vocab=256), seq_len=64, global_batch_sequences=8, dtype="fp32")
    layout = Layout(dp_replicate=2, micro_batch_size=4)
    per_rank = estimate_memory(workload, layout).total
    machine = int(1.5 * per_rank)  # more than one worker needs, less than two
    one_machine = _cluster(2, per_node=2, memory=machine, host=machine, name="cpu")
    two_machines = _cluster(2, per_node=1, memory=machine, host=machine, name="cpu")
    assert not candidate(workload, layout, one_machine).fits
    assert candidate(workload, layout, two_machines).fits
    # A GPU with the same memory holds its bytes apart from the host: it fits.
    assert memory_fits(estimate_memory(workload, layout), _cluster(2, per_node=2, memory=machine, host=machine))


# ---- check_layout: each rule refused, by the planner and (where it is one) by plait train ------


def _refused(name, seq_len, sequences, gpus, train_refuses, match, dtype="bf16", **layout):
    readable = match.replace("\\", "").replace(".*", "...")
    return pytest.param(name, seq_len, sequences, dtype, gpus, layout, train_refuses, match, id=readable[:40])


REFUSED = [
    _refused("8b", 4096, 64, 32, True, r"cp = 2 with tp = 2", tp=2, cp=2, dp_shard=8, zero_stage=3),
    _refused("8b", 4096, 64, 32, True, r"cp = 2 with pp = 2", pp=2, cp=2, dp_shard=8, zero_stage=3),
    _refused("8b", 4096, 64, 32, True, r"cp = 2 with zero_stage = 1", cp=2, dp_shard=16, zero_stage=1),
    _refused("8b", 4096, 64, 32, True, r"cp = 2 with dp_replicate = 2 \(HSDP\)", cp=2, dp_replicate=2, dp_shard=8, zero_stage=3),
    _refused("8b", 102, 64, 32, True, r"ring attention .* 102 is not a multiple of 4", cp=2, dp_shard=16, zero_stage=3),
    _refused("8b", 4096, 64, 32, True, r"cp = 16 with Ulysses .* key/value heads \(8\)", cp=16, cp_method="ulysses",
             dp_shard=2, zero_stage=3),
    _refused("8b", 4096, 64, 32, True, r"pp = 2 with data parallelism .* zero_stage = 2 or 3 .* not 1", pp=2, dp_shard=16,
             zero_stage=1),
    _refused("8b", 4096, 64, 32, True, r"pp = 2 with data parallelism .* not 0", pp=2, dp_replicate=16),
    _refused("8b", 4096, 64, 32, True, r"mixed_precision = true .* zero_stage = 2 or 3, not 1", dp_shard=32, zero_stage=1,
             mixed_precision=True),
    _refused("8b", 4096, 64, 32, True, r"= 16 ranks, but the cluster has 32 GPU\(s\); e.g. dp_shard = 32", dp_shard=16,
             zero_stage=3),
    _refused("8b", 4096, 64, 48, True, r"global batch of 64 sequences does not split .* 48", dp_shard=48, zero_stage=3),
    _refused("8b", 4096, 64, 32, True, r"micro_batch_size = 3 does not divide .* 8 sequences", tp=4, dp_shard=8,
             zero_stage=3, micro_batch_size=3),
    _refused("8b", 4096, 64, 32, True, r"zero_stage = 3 .* but dp_shard = 1", tp=8, dp_replicate=4, zero_stage=3),
    _refused("8b", 4096, 64, 32, True, r"dp_shard = 32 needs a ZeRO stage", dp_shard=32),
    _refused("8b", 4096, 64, 32, True, r"cpu_offload = true needs zero_stage = 3", dp_shard=32, zero_stage=2,
             cpu_offload=True),
    _refused("8b", 4096, 64, 48, True, r"tp = 3 does not divide the model's heads = 32", tp=3, dp_shard=16, zero_stage=3),
    _refused("8b", 4096, 64, 32, True, r"tp = 16 does not divide the model's kv_heads = 8", tp=16, dp_shard=2, zero_stage=3),
    _refused("8b", 4096, 64, 32, True, r"sequence_parallel = true needs tp > 1", dp_shard=32, zero_stage=3,
             sequence_parallel=True),
    _refused("1b", 2048, 64, 32, True, r"pp = 2 with tied embeddings", pp=2, dp_shard=16, zero_stage=3),
    _refused("8b", 4096, 64, 32, True, r"32 x 2 stages is more than the model's 32 layers", pp=32,
             pp_schedule="interleaved-1f1b", pp_virtual_stages=2),
    _refused("8b", 4096, 64, 32, True, r"pp_virtual_stages = 2 needs an interleaved schedule", pp=4, dp_shard=8,
             zero_stage=3, pp_virtual_stages=2),
    _refused("8b", 4096, 64, 32, True, r"interleaved-1f1b\" needs pp_virtual_stages >= 2", pp=4, dp_shard=8, zero_stage=3,
             pp_schedule="interleaved-1f1b"),
    _refused("8b", 4096, 72, 32, True, r"rounds of pp = 4: the 9 micro-batches", pp=4, dp_shard=8, zero_stage=3,
             pp_schedule="interleaved-1f1b", pp_virtual_stages=2),
    # plait train would raise the micro-batch count to fill the pipeline: another run than the estimate's.
    _refused("8b", 4096, 64, 32, False, r"pp = 4 needs at least 4 micro-batches .* make 2", pp=4, dp_shard=8, zero_stage=3,
             micro_batch_size=4),
    _refused("8b", 4096, 64, 32, True, r"ep = 2 spreads experts, but the model is dense", dp_shard=32, zero_stage=3, ep=2),
    _refused("debug-moe", 64, 16, 8, True, r"tp = 2 with a mixture-of-experts model", tp=2, dp_shard=4, zero_stage=3),
    _refused("debug-moe", 64, 16, 8, True, r"pp = 2 with a mixture-of-experts model", pp=2, dp_shard=4, zero_stage=3),
    _refused("debug-moe", 64, 12, 6, True, r"ep = 3 must divide the model's 4 experts", dp_shard=6, zero_stage=3, ep=3),
    _refused("debug-moe", 64, 16, 8, True, r"ep = 2 needs zero_stage = 2 or 3 .* not 1", dp_shard=8, zero_stage=1, ep=2),
    _refused("debug-moe", 64, 16, 8, True, r"ep = 2 with cp = 2", cp=2, dp_shard=4, zero_stage=3, ep=2),
    _refused("debug-moe", 64, 16, 8, True, r"cpu_offload = true with ep = 2", dp_shard=8, zero_stage=3, ep=2,
             cpu_offload=True),
    _refused("debug-moe", 64, 16, 2, True, r"ep = 4 must divide dp_shard x cp = 2 x 1", dp_shard=2, zero_stage=3, ep=4),
    # Planner input that is no plait train config.
    _refused("8b", 4096, 64, 32, False, r"mixed_precision = true computes in bf16, but the workload's dtype is 'fp32'",
             dtype="fp32", dp_shard=32, zero_stage=3, mixed_precision=True),
    _refused("8b", 4096, 64, 32, False, r"tp = 0 must be a whole number of at least 1", tp=0),
    _refused("8b", 4096, 64, 32, False, r"zero_stage = 4 must be 0", dp_shard=32, zero_stage=4),
    _refused("8b", 4096, 64, 32, False, r"pp_schedule = 'dualpipe' is not a schedule", pp=2, dp_shard=16, zero_stage=3,
             pp_schedule="dualpipe"),
]


@pytest.mark.parametrize("name, seq_len, sequences, dtype, gpus, layout, train_refuses, match", REFUSED)
def test_check_layout_refuses_what_train_refuses(name, seq_len, sequences, dtype, gpus, layout, train_refuses, match):
    workload = Workload(_workload(name, seq_len, sequences).model, seq_len, sequences, dtype=dtype)
    lay, cluster = Layout(**layout), _cluster(gpus)
    with pytest.raises(PlanError, match=match):
        check_layout(workload, lay, cluster)
    with pytest.raises(PlanError, match=match):
        candidate(workload, lay, cluster)  # what --layout pins and API users reach
    if train_refuses:  # the rule is plait train's: its validation refuses the config the plan would write
        with pytest.raises(ConfigError):
            validate(_config(lay, workload, name), gpus)


def test_pins_no_layout_matches_name_the_rule(capsys):
    workload = _workload("8b", 4096, 64)
    with pytest.raises(PlanError, match=r"cp = 2 with tp = 2"):
        plan(workload, _cluster(32), {"tp": 2, "cp": 2})
    with pytest.raises(PlanError, match=r"pp = 2 with data parallelism .* not 1"):
        plan(workload, _cluster(32), {"zero": 1, "pp": 2})
    assert main(CLI + ["--layout", "tp=2,cp=2"]) == 2
    assert "cp = 2 with tp = 2" in capsys.readouterr().err


def test_planning_does_not_import_torch():
    """The planner answers for 16,384 GPUs on a laptop without torch: a plan that needs the
    pipeline split (pipeline_plan.py) and the model's shapes leaves torch unimported."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from plait.config import Config, set_value\n"
            "from plait.planner import workload_from_config\n"
            "from plait.hardware.profile import cluster_from_flags\n"
            "from plait.planner.search import plan\n"
            "cfg = Config(); set_value(cfg, 'model.name', '8b')\n"
            "best = plan(workload_from_config(cfg, 4096, 64), cluster_from_flags(64, None, 'h100'), {'pp': 2}, top=1)\n"
            "assert best and best[0].layout.pp == 2, best\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
