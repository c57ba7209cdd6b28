"""Which torch `scripts/setup.sh` installs into the virtual environment, and the install itself.

    python scripts/torch_install.py [--python VENV/bin/python] [--dry-run]

Standard library only: it runs before the environment has anything. The decision, in order:

  * a torch that `--python` can import is kept, never replaced;
  * on a machine with an NVIDIA driver (`nvidia-smi -L` works) pip's default build (CUDA) is installed;
  * otherwise $PLAIT_TORCH_SPEC (default torch==2.13.0) is installed as a CPU build. pip resolves it
    first (`install --dry-run --report`) and a resolution that brings any nvidia-* package is a
    CUDA build, which is refused: an unpinned or CUDA torch on a machine without a GPU is several
    GB of libraries it cannot use. With $PLAIT_TORCH_INDEX set, that index is the only one tried.
    Without it, the default index is tried first; if its wheel is the CUDA one (the default on
    Linux), PyTorch's CPU wheel index ($PLAIT_TORCH_CPU_INDEX, default below) is tried next, as
    uv's `--torch-backend=auto` does (a default index that fails, offline or without the version, is
    reported as it is). If nothing gives a CPU build, a message says what was tried
    and how to fix it, and the exit status is 1.

`plan_torch_install` is the decision over plain facts and a resolver that tests replace; `main`
gathers the facts (through `run`, also replaceable) and carries the plan out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

DEFAULT_SPEC = "torch==2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# What a machine with a GPU gets: pip's default build, whose CUDA libraries it can use.
GPU_REQUIREMENT = "torch>=2.11"
PIP_OPTIONS = ("--disable-pip-version-check", "-q")


class ResolveError(Exception):
    """pip could not resolve the requirement from an index (unreachable, no matching version, ...)."""


# (requirement, index URL or None for pip's configured default) -> pip's --report document
Resolve = Callable[[str, Optional[str]], dict]


@dataclass(frozen=True)
class Plan:
    action: str  # "keep", "install" or "refuse"
    message: str  # what setup prints (to stderr for "refuse")
    pip_args: tuple[str, ...] = ()  # for "install": the arguments after `pip install`


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def cuda_packages(report: dict) -> list[str]:
    """The nvidia-* packages (CUDA libraries) in a pip --report document."""
    names = [_normalise(item["metadata"]["name"]) for item in report.get("install", [])]
    return sorted(n for n in names if n.startswith("nvidia-"))


def resolved_torch(report: dict) -> Optional[str]:
    """The torch version a pip --report document would install, or None."""
    for item in report.get("install", []):
        if _normalise(item["metadata"]["name"]) == "torch":
            return item["metadata"]["version"]
    return None


def _try(resolve: Resolve, spec: str, index: Optional[str]) -> tuple[str, str]:
    """("cpu", "cuda" or "failed", what happened in words) for `spec` resolved from `index`."""
    try:
        report = resolve(spec, index)
    except ResolveError as e:
        return "failed", f"pip could not resolve it ({e})"
    cuda = cuda_packages(report)
    if cuda:
        shown = ", ".join(cuda[:2]) + (f" and {len(cuda) - 2} more" if len(cuda) > 2 else "")
        return "cuda", f"its torch is a CUDA build (it brings {shown})"
    version = resolved_torch(report)
    if version is None:
        return "failed", "pip resolved no torch from it"
    return "cpu", f"torch {version}"


def plan_torch_install(
    *,
    torch_version: Optional[str],
    has_gpu: bool,
    spec: str = DEFAULT_SPEC,
    index: Optional[str] = None,
    cpu_index: str = CPU_INDEX,
    resolve: Resolve,
) -> Plan:
    """What to do about torch, given the facts; `resolve` is called only on a machine without a GPU."""
    if torch_version is not None:
        return Plan("keep", f"plait setup: keeping the installed torch {torch_version}")
    if has_gpu:
        return Plan("install", "plait setup: NVIDIA GPU found, installing torch (CUDA build)", (GPU_REQUIREMENT,))

    # No GPU: only a CPU build of `spec` may be installed, and only from an index that has one.
    if index:
        kind, outcome = _try(resolve, spec, index)
        if kind == "cpu":
            return Plan("install", f"plait setup: no GPU found, installing the CPU build {spec} from {index}",
                        ("--index-url", index, spec))
        tried = [f"PLAIT_TORCH_INDEX={index}: {outcome}"]
    else:
        kind, outcome = _try(resolve, spec, None)
        if kind == "cpu":
            return Plan("install", f"plait setup: no GPU found, installing the CPU build {spec}", (spec,))
        tried = [f"pip's default index: {outcome}"]
        # Only a CUDA wheel sends us to the CPU index; a default index that fails (offline, no such
        # version) is reported as it is.
        if kind == "cuda":
            kind, outcome = _try(resolve, spec, cpu_index)
            if kind == "cpu":
                return Plan("install",
                            f"plait setup: no GPU found, and pip's default torch wheel here is the CUDA build;\n"
                            f"  installing the CPU build {spec} from {cpu_index}",
                            ("--index-url", cpu_index, spec))
            tried.append(f"{cpu_index}: {outcome}")
    message = "\n".join([
        f"plait setup: no GPU here, and no CPU build of {spec} was found:",
        *(f"  {line}" for line in tried),
        f"  Set PLAIT_TORCH_INDEX to a wheel index that has a CPU build of {spec} (PLAIT_TORCH_SPEC",
        "  picks another version), or install a CPU build of torch into the base Python first (this",
        "  environment sees it), then run this again.",
    ])
    return Plan("refuse", message)


Run = Callable[..., subprocess.CompletedProcess]


def pip_resolver(python: str, run: Run = subprocess.run) -> Resolve:
    """A resolver that asks `python -m pip` what `install spec` would bring, without installing."""

    def resolve(spec: str, index: Optional[str]) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "report.json"
            index_args = ["--index-url", index] if index else []
            cmd = [python, "-m", "pip", *PIP_OPTIONS, "install", "--dry-run", "--ignore-installed",
                   "--report", str(report), *index_args, spec]
            done = run(cmd, capture_output=True, text=True)
            if done.returncode != 0 or not report.exists():
                lines = [ln.strip() for ln in (done.stderr or "").splitlines() if ln.strip()]
                errors = [ln for ln in lines if ln.startswith("ERROR:")] or lines[-1:]
                raise ResolveError("; ".join(errors[:2]) or f"pip exited with status {done.returncode}")
            return json.loads(report.read_text())

    return resolve


def installed_torch(python: str, run: Run = subprocess.run) -> Optional[str]:
    """The version of the torch `python` imports, or None if it imports none."""
    done = run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
    if done.returncode != 0:
        return None
    return done.stdout.strip() or "(version unknown)"


def gpu_present(run: Run = subprocess.run, which: Callable[[str], Optional[str]] = shutil.which) -> bool:
    """An NVIDIA driver that lists at least one GPU."""
    if which("nvidia-smi") is None:
        return False
    try:
        return run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def main(
    argv: Optional[Sequence[str]] = None,
    *,
    run: Run = subprocess.run,
    which: Callable[[str], Optional[str]] = shutil.which,
    environ: Mapping[str, str] = os.environ,
) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="the environment's python (default: this one)")
    parser.add_argument("--dry-run", action="store_true", help="say what would be done, install nothing")
    args = parser.parse_args(argv)

    torch_version = installed_torch(args.python, run)
    plan = plan_torch_install(
        torch_version=torch_version,
        has_gpu=torch_version is None and gpu_present(run, which),
        spec=environ.get("PLAIT_TORCH_SPEC") or DEFAULT_SPEC,
        index=environ.get("PLAIT_TORCH_INDEX") or None,
        cpu_index=environ.get("PLAIT_TORCH_CPU_INDEX") or CPU_INDEX,
        resolve=pip_resolver(args.python, run),
    )
    if plan.action == "refuse":
        print(plan.message, file=sys.stderr)
        return 1
    print(plan.message, flush=True)
    if plan.action == "install" and not args.dry_run:
        return run([args.python, "-m", "pip", *PIP_OPTIONS, "install", *plan.pip_args]).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
