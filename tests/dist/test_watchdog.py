"""The watchdog on a real job: freeze one worker of a 2-process CPU run with SIGSTOP; the other
rank's watchdog dumps its stacks, names the frozen rank as the one that did not arrive, and
exits non-zero, so torchrun ends the job instead of waiting on a collective for ten minutes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import plait

from .layouts import BASE

TIMEOUT_S = 5
FROZEN = 1


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after the command in parentheses
                found.append(int(entry.name))
    return found


def _workers(root: int) -> dict[int, int]:
    """rank -> pid of the processes under `root` whose environment torchrun gave a RANK."""
    ranks, todo = {}, [root]
    while todo:
        for child in _children(todo.pop()):
            todo.append(child)
            try:
                env = dict(x.split("=", 1) for x in (Path(f"/proc/{child}/environ").read_text().split("\0")) if "=" in x)
            except OSError:
                continue
            if "RANK" in env and "TORCHELASTIC_RUN_ID" in env:
                ranks[int(env["RANK"])] = child
    return ranks


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(condition, limit_s: float, what: str, log: Path, job: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + limit_s
    while not condition():
        assert job is None or job.poll() is None, f"the job ended early\n{log.read_text()[-5000:]}"
        assert time.monotonic() < end, f"{what} within {limit_s} s\n{log.read_text()[-5000:]}"
        time.sleep(0.2)


def _train_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")]
    return max((x["step"] for x in lines if x["kind"] == "train"), default=0)


def test_frozen_rank_is_named_and_job_exits(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "output.txt"
    args = [
        # No restart (the launcher's default is 1): the job must end with the watchdog's exit.
        "train", "--nproc-per-node", "2", "--max-restarts", "0", *BASE, "--parallel.dp_replicate_degree=2", f"--run.dir={run_dir}", "--train.steps=100000",
        "--checkpoint.save_final=false", f"--train.watchdog_timeout={TIMEOUT_S}",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(plait.__file__).parents[1])}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    with open(log, "w") as out:
        # A session of its own, so that whatever is left at the end can be killed as one group.
        job = subprocess.Popen([sys.executable, "-m", "plait", *args], stdout=out, stderr=subprocess.STDOUT,
                               env=env, start_new_session=True)
    try:
        _wait_for(lambda: _train_steps(run_dir) >= 3, 180, "the job did not log 3 steps", log, job)
        workers = _workers(job.pid)
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[FROZEN], signal.SIGSTOP)
        live = [pid for rank, pid in workers.items() if rank != FROZEN]
        # The live rank's deadline (TIMEOUT_S) plus its observation window (2 s) ends it; the
        # margin only absorbs a loaded machine; without the watchdog gloo would wait 10 minutes.
        _wait_for(lambda: not any(_running(pid) for pid in live), TIMEOUT_S + 60, "the live rank did not exit", log)
        # torchrun now SIGTERMs the frozen worker, which cannot act on it while stopped; it would
        # SIGKILL it after its 30 s grace. Do it now.
        os.kill(workers[FROZEN], signal.SIGKILL)
        job.wait(timeout=120)
    finally:
        try:
            os.killpg(job.pid, signal.SIGKILL)  # nothing is left behind, whatever happened above
        except ProcessLookupError:
            pass
        job.wait(timeout=30)
    text = log.read_text()
    assert job.returncode != 0, text[-3000:]
    report = [line for line in text.splitlines() if line.startswith("watchdog (rank 0): ") and "exiting with code" in line]
    assert len(report) == 1, text[-5000:]
    line = report[0]
    assert f"exceeded {TIMEOUT_S} s on rank 0" in line, line
    assert f"rank {FROZEN} did not arrive (no heartbeat for" in line, line
    assert "rank 0 waiting " in line, line
    # Rank 0 dumped every thread's Python stack, its main thread inside the training loop; the
    # frozen rank could not.
    assert "watchdog (rank 0): " in text and "Python stacks of every thread of rank 0:" in text
    dump = text.split("Python stacks of every thread of rank 0:", 1)[1]
    assert "most recent call first" in dump and "loop.py" in dump and "in _train" in dump
    assert f"Python stacks of every thread of rank {FROZEN}:" not in text
    assert "exitcode  : 124" in text or "exitcode: 124" in text, text[-3000:]  # torchrun's failure summary
