"""scripts/torch_install.py, the torch decision of `make setup`, on fake facts and fake pip reports.

No test here starts pip or reaches an index: the resolver and the command runner are replaced.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "torch_install.py"
_spec = importlib.util.spec_from_file_location("torch_install", SCRIPT)
torch_install = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = torch_install  # dataclasses look their module up there
_spec.loader.exec_module(torch_install)

SPEC = "torch==2.13.0"
CPU_INDEX = torch_install.CPU_INDEX
OTHER_INDEX = "https://wheels.example.org/cpu"


def _item(name: str, version: str, requested: bool = False) -> dict:
    """One entry of `install` in pip's --report document (format version 1)."""
    return {
        "download_info": {"url": f"https://files.example.org/{name}-{version}-py3-none-any.whl",
                          "archive_info": {"hashes": {"sha256": "0" * 64}}},
        "is_direct": False,
        "requested": requested,
        "metadata": {"metadata_version": "2.1", "name": name, "version": version},
    }


def _report(*items: dict) -> dict:
    return {"version": "1", "pip_version": "23.2.1", "install": list(items),
            "environment": {"sys_platform": "linux", "platform_machine": "x86_64"}}


CPU_REPORT = _report(_item("torch", "2.13.0+cpu", requested=True), _item("filelock", "4.3.2"),
                     _item("typing_extensions", "4.16.0"), _item("sympy", "1.14.0"))
CUDA_REPORT = _report(_item("torch", "2.13.0", requested=True), _item("filelock", "4.3.2"),
                      _item("nvidia-cublas-cu12", "12.8.4.1"), _item("nvidia_cudnn_cu12", "9.10.2.21"),
                      _item("nvidia-nccl-cu12", "2.27.5"), _item("triton", "3.5.0"))


class FakeResolver:
    """Answers per index (None: pip's default) with a report or a ResolveError; records the calls."""

    def __init__(self, answers: dict):
        self.answers = answers
        self.calls = []

    def __call__(self, spec, index):
        self.calls.append((spec, index))
        answer = self.answers[index]
        if isinstance(answer, Exception):
            raise answer
        return answer


def _plan(resolver, **facts):
    facts = {"torch_version": None, "has_gpu": False, "spec": SPEC, **facts}
    return torch_install.plan_torch_install(resolve=resolver, **facts)


def test_report_reading():
    assert torch_install.cuda_packages(CUDA_REPORT) == ["nvidia-cublas-cu12", "nvidia-cudnn-cu12", "nvidia-nccl-cu12"]
    assert torch_install.cuda_packages(CPU_REPORT) == []
    assert torch_install.resolved_torch(CPU_REPORT) == "2.13.0+cpu"
    assert torch_install.resolved_torch(_report(_item("sympy", "1.14.0"))) is None


def test_installed_torch_is_kept():
    resolver = FakeResolver({})
    for gpu in (False, True):
        plan = _plan(resolver, torch_version="2.12.1+cpu", has_gpu=gpu)
        assert plan.action == "keep" and "2.12.1+cpu" in plan.message
    assert resolver.calls == []


def test_gpu_gets_pips_default_build():
    resolver = FakeResolver({})
    plan = _plan(resolver, has_gpu=True, index=OTHER_INDEX)
    assert (plan.action, plan.pip_args) == ("install", ("torch>=2.11",))
    assert resolver.calls == []


def test_cpu_with_a_clean_default_wheel_installs_it():
    resolver = FakeResolver({None: CPU_REPORT})
    plan = _plan(resolver)
    assert (plan.action, plan.pip_args) == ("install", (SPEC,))
    assert resolver.calls == [(SPEC, None)]  # the CPU index is not asked


def test_cpu_with_a_cuda_default_wheel_falls_back_to_the_cpu_index():
    resolver = FakeResolver({None: CUDA_REPORT, CPU_INDEX: CPU_REPORT})
    plan = _plan(resolver)
    assert (plan.action, plan.pip_args) == ("install", ("--index-url", CPU_INDEX, SPEC))
    assert CPU_INDEX in plan.message
    assert resolver.calls == [(SPEC, None), (SPEC, CPU_INDEX)]


def test_the_cpu_index_can_be_overridden():
    resolver = FakeResolver({None: CUDA_REPORT, OTHER_INDEX: CPU_REPORT})
    plan = _plan(resolver, cpu_index=OTHER_INDEX, spec="torch==2.12.0")
    assert plan.pip_args == ("--index-url", OTHER_INDEX, "torch==2.12.0")
    assert resolver.calls == [("torch==2.12.0", None), ("torch==2.12.0", OTHER_INDEX)]


@pytest.mark.parametrize("cpu_answer, said", [
    (torch_install.ResolveError("ERROR: Could not find a version that satisfies the requirement torch==2.13.0"),
     "Could not find a version"),
    (torch_install.ResolveError("ERROR: No matching distribution found for torch==2.13.0"), "No matching distribution"),
    (CUDA_REPORT, "CUDA build"),
    (_report(_item("sympy", "1.14.0")), "no torch"),
])
def test_cpu_with_no_cpu_build_anywhere_refuses(cpu_answer, said):
    resolver = FakeResolver({None: CUDA_REPORT, CPU_INDEX: cpu_answer})
    plan = _plan(resolver)
    assert plan.action == "refuse" and plan.pip_args == ()
    assert "pip's default index: its torch is a CUDA build (it brings nvidia-cublas-cu12" in plan.message
    assert f"{CPU_INDEX}: " in plan.message and said in plan.message
    assert "PLAIT_TORCH_INDEX" in plan.message and "install a CPU build of torch" in plan.message


def test_a_failing_default_index_is_reported_without_trying_the_cpu_index():
    resolver = FakeResolver({None: torch_install.ResolveError("ERROR: No matching distribution found for torch==9.9")})
    plan = _plan(resolver, spec="torch==9.9")
    assert plan.action == "refuse" and "No matching distribution" in plan.message
    assert resolver.calls == [("torch==9.9", None)]


def test_plait_torch_index_is_the_only_index_tried():
    resolver = FakeResolver({OTHER_INDEX: CPU_REPORT})
    plan = _plan(resolver, index=OTHER_INDEX)
    assert (plan.action, plan.pip_args) == ("install", ("--index-url", OTHER_INDEX, SPEC))
    assert resolver.calls == [(SPEC, OTHER_INDEX)]

    for answer in (CUDA_REPORT, torch_install.ResolveError("ERROR: Could not find a version")):
        resolver = FakeResolver({OTHER_INDEX: answer})
        plan = _plan(resolver, index=OTHER_INDEX)
        assert plan.action == "refuse" and f"PLAIT_TORCH_INDEX={OTHER_INDEX}" in plan.message
        assert resolver.calls == [(SPEC, OTHER_INDEX)]  # neither the default nor the CPU index


class FakeRun:
    """Stands in for subprocess.run: answers the torch import check, nvidia-smi and pip's dry runs
    (writing `reports[index]` where --report points), and records every command."""

    def __init__(self, *, torch_version=None, gpu=False, reports=None):
        self.torch_version, self.gpu, self.reports = torch_version, gpu, reports or {}
        self.calls = []

    def __call__(self, cmd, **kwargs):
        self.calls.append(list(cmd))
        if cmd[0] == "nvidia-smi":
            return subprocess.CompletedProcess(cmd, 0 if self.gpu else 9, "", "")
        if cmd[1] == "-c":
            if self.torch_version is None:
                return subprocess.CompletedProcess(cmd, 1, "", "ModuleNotFoundError: No module named 'torch'\n")
            return subprocess.CompletedProcess(cmd, 0, self.torch_version + "\n", "")
        assert cmd[1:3] == ["-m", "pip"] and "install" in cmd, cmd
        if "--dry-run" not in cmd:
            return subprocess.CompletedProcess(cmd, 0, "", "")
        index = cmd[cmd.index("--index-url") + 1] if "--index-url" in cmd else None
        answer = self.reports[index]
        if answer is None:
            return subprocess.CompletedProcess(
                cmd, 1, "", "WARNING: Retrying ...\nERROR: Could not find a version that satisfies the requirement "
                "torch==2.13.0 (from versions: none)\nERROR: No matching distribution found for torch==2.13.0\n")
        Path(cmd[cmd.index("--report") + 1]).write_text(json.dumps(answer))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    def installs(self):
        return [c[c.index("install") + 1:] for c in self.calls if "install" in c and "--dry-run" not in c]


def _main(run, env=None, gpu_driver=True):
    which = (lambda name: "/usr/bin/nvidia-smi") if gpu_driver else (lambda name: None)
    return torch_install.main(["--python", "venv/bin/python"], run=run, which=which, environ=env or {})


def test_main_installs_from_the_cpu_index_when_the_default_is_cuda(capsys):
    run = FakeRun(reports={None: CUDA_REPORT, CPU_INDEX: CPU_REPORT})
    assert _main(run, gpu_driver=False) == 0
    assert run.installs() == [["--index-url", CPU_INDEX, SPEC]]
    assert all(c[0] in ("venv/bin/python", "nvidia-smi") for c in run.calls)
    assert CPU_INDEX in capsys.readouterr().out


def test_main_refuses_with_status_1_and_installs_nothing(capsys):
    run = FakeRun(reports={None: CUDA_REPORT, CPU_INDEX: None})  # the CPU index cannot be resolved
    assert _main(run, gpu_driver=True) == 1  # nvidia-smi is there but lists no GPU
    assert run.installs() == []
    err = capsys.readouterr().err
    assert "PLAIT_TORCH_INDEX" in err and "No matching distribution found" in err


def test_main_environment_and_facts():
    run = FakeRun(reports={OTHER_INDEX: CPU_REPORT})
    assert _main(run, env={"PLAIT_TORCH_INDEX": OTHER_INDEX, "PLAIT_TORCH_SPEC": "torch==2.12.0"}) == 0
    assert run.installs() == [["--index-url", OTHER_INDEX, "torch==2.12.0"]]

    run = FakeRun(gpu=True)
    assert _main(run) == 0 and run.installs() == [["torch>=2.11"]]

    run = FakeRun(torch_version="2.13.0+cpu", gpu=True)
    assert _main(run) == 0 and run.installs() == []

    run = FakeRun(reports={None: CPU_REPORT})
    assert torch_install.main(["--python", "py", "--dry-run"], run=run, which=lambda n: None, environ={}) == 0
    assert run.installs() == []
