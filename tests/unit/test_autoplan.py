"""`parallel.auto = true`: the config a job trains is the planner's best layout for its workers,
checked by plait train's own rules; pins are honoured; what cannot be planned is refused before
any worker starts, naming the fix; a profile measured at start-up is written and reused."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest

import plait
from plait.autoplan import (
    PLAN_NAME, PROFILE_NAME, QUICK_MESSAGE_BYTES_CPU, job_cluster, pinned_keys, plan_for_job, planner_pins,
)
from plait.cli import main
from plait.config import ConfigError, load_toml
from plait.validation import build_config, resolve_run, validate
from plait.hardware.devices import Cluster, Device, Link
from plait.hardware.profile import cluster_from_flags, load_profile, write_profile

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib

GIB = 2**30
BASE = ["--model.name=debug", "--train.seq_len=64", "--train.global_batch_tokens=2048", "--train.device=cpu",
        "--parallel.auto=true"]


def _profile(path: Path, memory: int = 4 * GIB, gpus: int = 2) -> Path:
    """A small CPU profile with round numbers (what `plait plan --calibrate` writes, by hand)."""
    device = Device(name="cpu", peak_flops={"fp32": 1e11, "bf16": 2e10}, memory_bytes=memory, matmul_efficiency=1.0)
    link = Link(bandwidth=2e9, latency=3e-5)
    write_profile(Cluster(device=device, gpus=gpus, gpus_per_node=gpus, intra=link, inter=link,
                          host_memory_bytes=gpus * memory, source="test"), path)
    return path


def _config(tmp_path: Path, *extra: str, profile: Path | None = None):
    profile = profile if profile is not None else _profile(tmp_path / "local.toml")
    return build_config(None, [*BASE, f"--run.dir={tmp_path / 'run'}", f"--parallel.cluster_profile={profile}", *extra])


def test_the_plan_fills_the_layout_and_passes_train_validation(tmp_path):
    cfg = _config(tmp_path)
    planned = plan_for_job(cfg, 2, 2)
    out = planned.config
    validate(out, 2)  # raises on a layout plait train refuses
    assert planned.run.layout == planned.chosen.layout  # what the trainer takes is the layout chosen
    assert resolve_run(out, 2).layout == planned.chosen.layout and planned.run.world_size == 2
    assert not out.parallel.auto and out.parallel.cluster_profile == str(tmp_path / "local.toml")
    layout = planned.chosen.layout
    assert {k: getattr(out.parallel, k) for k in layout.parallel_section()} == layout.parallel_section()
    assert {k: getattr(out.train, k) for k in layout.train_section()} == layout.train_section()
    assert cfg.parallel.auto and cfg.parallel.dp_shard_degree == 1  # the input is left as it was
    assert (planned.cluster.gpus, planned.cluster.gpus_per_node) == (2, 2)
    assert planned.workload.dtype == "fp32" and planned.pins == {}
    speeds = [c.tokens_per_s_per_gpu for c in planned.candidates]
    assert 1 < len(speeds) <= 3 and speeds == sorted(speeds, reverse=True) and all(c.fits for c in planned.candidates)
    summary = planned.summary()
    assert "tok/s/GPU" in summary and f"chosen: {layout.short()}" in summary
    assert "memory per GPU" in planned.text() and "step time" in planned.text()


@pytest.mark.parametrize("extra, pins, expect", [
    (["--parallel.tp_degree=2"], {"parallel.tp_degree": 2}, {"tp_degree": 2, "dp_shard_degree": 1}),
    # Refused by plait train alone (sequence parallelism needs tp > 1): the plan supplies the tp.
    (["--parallel.sequence_parallel=true"], {"parallel.sequence_parallel": True},
     {"sequence_parallel": True, "tp_degree": 2}),
    (["--parallel.zero_stage=3", "--train.activation_checkpointing=true", "--train.micro_batch_size=4"],
     {"parallel.zero_stage": 3, "train.activation_checkpointing": True, "train.micro_batch_size": 4},
     {"zero_stage": 3, "dp_shard_degree": 2}),
    # A schedule pinned for a plan without a pipeline is kept as given (it applies to none of it).
    (["--parallel.pp_schedule=gpipe", "--parallel.pp_degree=1"], {"parallel.pp_schedule": "gpipe"},
     {"pp_schedule": "gpipe", "pp_degree": 1}),
    (["--parallel.dp_shard_degree=-1"], {}, {}),  # -1 fills the world: no pin
])
def test_pins_are_honoured(tmp_path, extra, pins, expect):
    cfg = _config(tmp_path, *extra)
    assert pinned_keys(cfg) == pins
    out = plan_for_job(cfg, 2, 2).config
    validate(out, 2)
    for key, value in {**{k: v for k, v in pins.items()}, **{f"parallel.{k}": v for k, v in expect.items()}}.items():
        section, name = key.split(".")
        assert getattr(getattr(out, section), name) == value, key


def test_pins_map_to_the_planner_keys():
    cfg = build_config(None, [*BASE, "--parallel.tp_degree=2", "--parallel.dp_replicate_degree=-1",
                              "--parallel.cp_method=ulysses", "--train.micro_batch_size=8"])
    pins = pinned_keys(cfg)
    assert pins == {"parallel.tp_degree": 2, "parallel.cp_method": "ulysses", "train.micro_batch_size": 8}
    assert planner_pins(pins) == {"tp": 2, "cp_method": "ulysses", "micro_batch_size": 8}


def test_workers_get_the_planned_run_as_it_was_resolved(tmp_path):
    """What the launcher hands the workers (the resolved run, as text in their environment) is the
    planned config and layout, with auto off."""
    from plait.validation import ResolvedRun

    planned = plan_for_job(_config(tmp_path, "--parallel.tp_degree=2"), 2, 2)
    rebuilt = ResolvedRun.from_json(planned.run.to_json())
    assert rebuilt == planned.run and not rebuilt.config.parallel.auto and rebuilt.layout.tp == 2


def test_nothing_fits_names_the_fix(tmp_path):
    cfg = _config(tmp_path, profile=_profile(tmp_path / "small.toml", memory=2**20))
    with pytest.raises(ConfigError, match=r"no layout fits.*--nnodes.*small\.toml"):
        plan_for_job(cfg, 2, 2)


def test_pins_that_match_no_layout_are_named(tmp_path):
    cfg = _config(tmp_path, "--parallel.tp_degree=3")
    with pytest.raises(ConfigError, match=r"parallel.tp_degree = 3 does not divide model.heads = 4 .*set parallel.tp_degree to one of \[1, 2\]"):
        plan_for_job(cfg, 2, 2)


def test_keys_the_plan_sets_cannot_be_pinned(tmp_path):
    with pytest.raises(ConfigError, match=r"parallel\.mixed_precision = true with parallel\.auto = true"):
        plan_for_job(_config(tmp_path, "--parallel.mixed_precision=true"), 2, 2)


def test_a_missing_profile_says_how_to_write_one(tmp_path):
    with pytest.raises(ConfigError, match=r"parallel\.cluster_profile = .*nope\.toml.*no such file.*plait plan --calibrate"):
        plan_for_job(_config(tmp_path, profile=tmp_path / "nope.toml"), 2, 2)


def test_several_planners_need_a_profile(tmp_path, monkeypatch):
    """Under an external torchrun every worker would plan; measuring on each would not agree."""
    cfg = build_config(None, [*BASE, f"--run.dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"set --parallel\.cluster_profile=cluster\.toml"):
        plan_for_job(cfg, 2, 2, shared=True)
    # plait.train (the API, as plait train runs it inside each worker) refuses before joining any job.
    for key, value in (("WORLD_SIZE", "2"), ("LOCAL_WORLD_SIZE", "2"), ("RANK", "1")):
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=r"parallel\.cluster_profile"):
        plait.train(cfg)
    assert not (tmp_path / "run").exists()


def test_a_profile_measured_at_start_up_is_written_and_reused(tmp_path, monkeypatch):
    calls = []
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)

    def fake_calibrate(workers, out, **settings):
        calls.append((workers, settings, os.environ.get("GLOO_SOCKET_IFNAME")))
        _profile(Path(out), gpus=workers)
        return load_profile(out)

    monkeypatch.setattr("plait.measure.calibrate.calibrate", fake_calibrate)
    cfg = build_config(None, [*BASE, f"--run.dir={tmp_path / 'run'}"])
    first = plan_for_job(cfg, 2, 2)
    written = tmp_path / "run" / PROFILE_NAME
    assert first.calibrated and written.is_file() and first.config.parallel.cluster_profile == str(written)
    (workers, settings, ifname), = calls
    assert workers == 2 and settings["message_bytes"] == QUICK_MESSAGE_BYTES_CPU and ifname  # on loopback
    assert "GLOO_SOCKET_IFNAME" not in os.environ  # set for the measurement only
    again = plan_for_job(cfg, 2, 2)  # the next start of the run: same workers, same profile, same plan
    assert not again.calibrated and len(calls) == 1 and again.config == first.config
    plan_for_job(cfg, 1, 1)  # another worker count measures again
    assert [c[0] for c in calls] == [2, 1] and load_profile(written).gpus == 1


def test_a_gpu_job_plans_in_bf16_on_the_profile_with_its_workers(tmp_path):
    profile = tmp_path / "dgx.toml"
    write_profile(cluster_from_flags(16, None, "h100"), profile)
    cfg = _config(tmp_path, "--train.device=auto", profile=profile)
    planned = plan_for_job(cfg, 2, 2, gpu=True)
    assert planned.workload.dtype == "bf16"
    assert (planned.cluster.gpus, planned.cluster.gpus_per_node, planned.cluster.device.name) == (2, 2, "h100")
    validate(planned.config, 2)
    assert planned.config.parallel.mixed_precision == (planned.config.parallel.zero_stage >= 2)
    assert plan_for_job(_config(tmp_path, "--train.dtype=fp32", profile=profile), 2, 2, gpu=True).workload.dtype == "fp32"


def test_a_cpu_profile_shares_the_machine_among_the_jobs_workers():
    device = Device(name="cpu", peak_flops={"fp32": 1e11}, memory_bytes=8 * GIB)
    link = Link(bandwidth=1e9, latency=1e-5)
    profile = Cluster(device=device, gpus=2, gpus_per_node=2, intra=link, inter=link, host_memory_bytes=16 * GIB)
    job = job_cluster(profile, 4, 4)
    assert (job.gpus, job.gpus_per_node, job.device.memory_bytes) == (4, 4, 4 * GIB)
    gpu = dataclasses.replace(profile, device=dataclasses.replace(device, name="h100"))
    assert job_cluster(gpu, 16, 8).device.memory_bytes == 8 * GIB  # a GPU's memory is its own


def test_validate_leaves_the_layout_to_the_plan_but_checks_ranges():
    validate(build_config(None, [*BASE, "--parallel.sequence_parallel=true"]), 2)
    with pytest.raises(ConfigError, match="needs parallel.tp_degree > 1"):
        build_config(None, [*BASE, "--parallel.sequence_parallel=true", "--parallel.auto=false"])
    with pytest.raises(ConfigError, match=r"parallel\.tp_degree = 0 must be at least 1"):
        build_config(None, [*BASE, "--parallel.tp_degree=0"])


def test_plait_config_says_the_layout_is_planned_at_start_up(capsys):
    assert main(["config", "--parallel.auto=true"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# parallel.auto = true: plait train chooses [parallel]")
    assert tomllib.loads(out)["parallel"]["auto"] is True


def test_an_unplanned_config_is_not_resolved():
    with pytest.raises(ConfigError, match=r"call plait\.train\(cfg\)"):
        resolve_run(build_config(None, BASE), 1)


def test_api_train_plans_for_one_process_and_records_the_choice(tmp_path, monkeypatch):
    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK"):
        monkeypatch.delenv(key, raising=False)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n\n" * 400)
    cfg = _config(tmp_path, "--train.steps=2", "--train.eval_every=0", "--train.sample_tokens=0",
                  "--checkpoint.every=0", "--checkpoint.save_final=false", "--run.progress=none",
                  "--run.tensorboard=false", f"--data.corpus={corpus}", "--data.val_fraction=0",
                  "--train.micro_batch_size=16")  # a pin: two forwards per step keep the test short
    result = plait.train(cfg)
    run_dir = tmp_path / "run"
    assert result.step == 2
    assert "chosen:" in (run_dir / PLAN_NAME).read_text()
    saved = load_toml(run_dir / "config.toml")
    assert not saved.parallel.auto and resolve_run(saved, 1).layout.world == 1
    assert saved.train.micro_batch_size == 16


def test_a_run_dir_with_checkpoints_is_refused_before_the_plan_writes_into_it(tmp_path, monkeypatch):
    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK"):
        monkeypatch.delenv(key, raising=False)
    run_dir = tmp_path / "run"
    step = run_dir / "checkpoints" / "step_5"
    step.mkdir(parents=True)
    (step / "manifest.json").write_text("{}")
    (run_dir / "checkpoints" / "latest").write_text("step_5")
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    monkeypatch.setattr("plait.measure.calibrate.calibrate", lambda *a, **k: pytest.fail("measured before the refusal"))
    cfg = build_config(None, [*BASE, f"--run.dir={run_dir}", "--checkpoint.resume=false"])
    with pytest.raises(ConfigError, match=r"already holds checkpoints \(step_5\) and checkpoint.resume = false"):
        plait.train(cfg)
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before  # no plan.txt, no cluster.toml


def test_plait_plan_writes_a_config_that_asked_for_auto_as_its_plan(tmp_path, capsys):
    """`plait plan --config` of a parallel.auto config writes the plan with auto off: the file
    trains as written (with auto on, the plan's mixed precision and degrees would be pins)."""
    source, out = tmp_path / "auto.toml", tmp_path / "plan.toml"
    source.write_text('[model]\nname = "debug"\n[train]\nseq_len = 64\nglobal_batch_tokens = 2048\n'
                      '[parallel]\nauto = true\n')
    assert main(["plan", "--config", str(source), "--cluster", str(_profile(tmp_path / "local.toml")),
                 "--write", str(out)]) == 0
    planned = load_toml(out)
    assert not planned.parallel.auto
    validate(planned, 2)

