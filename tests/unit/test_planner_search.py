"""The planner's time model, search and `plait plan`: pins are honoured, the answers come out as a
table, JSON and a config file (that every emitted layout is one `plait train` runs, and that both
refuse the same layouts with the same sentence, is tests/unit/test_layout_rules.py)."""

from __future__ import annotations

import json

import pytest

from plait.cli import main
from plait.config import load_toml
from plait.hardware.devices import Cluster, Device, Link
from plait.model.sizes import NAMED_SIZES
from plait.planner.explain import memory_breakdown, nothing_fits
from plait.planner.memory import estimate_memory, memory_fits
from plait.planner.search import PlanError, candidate, enumerate_layouts, plan
from plait.planner.timing import estimate_time, link_for, ring_time
from plait.layout import Layout, Workload
from plait.validation import validate

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


def test_pins_no_layout_matches_name_the_rule(capsys):
    workload = _workload("8b", 4096, 64)
    with pytest.raises(PlanError, match=r"parallel.cp_degree = 2 with parallel.tp_degree = 2"):
        plan(workload, _cluster(32), {"tp": 2, "cp": 2})
    with pytest.raises(PlanError, match=r"parallel.pp_degree = 2 with data parallelism .* not 1"):
        plan(workload, _cluster(32), {"zero": 1, "pp": 2})
    assert main(CLI + ["--layout", "tp=2,cp=2"]) == 2
    assert "parallel.cp_degree = 2 with parallel.tp_degree = 2" in capsys.readouterr().err


def test_compile_pin_leaves_out_what_compile_does_not_compose_with():
    """train.compile = true (a pin parallel.auto keeps): no tensor parallelism, no zero-bubble."""
    workload = _workload("8b", 4096, 64)
    layouts = list(enumerate_layouts(workload, _cluster(32), {"compile": True}))
    assert layouts and all(lay.compile and lay.tp == 1 and lay.pp_schedule != "zero-bubble" for lay in layouts)
    assert any(lay.tp > 1 for lay in enumerate_layouts(workload, _cluster(32), {}))


def test_planning_does_not_import_torch():
    """The planner answers for 16,384 GPUs on a laptop without torch: a plan that needs the
    pipeline split (plait.layout.pipeline) and the model's shapes leaves torch unimported."""
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
