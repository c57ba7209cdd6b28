"""The watchdog inside one process: the report names the right ranks, a deadline fires (its own
or another rank's, through the store), close() disarms it, and a stuck single process exits.
The multi-process run with a frozen worker is tests/dist/test_watchdog.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch.distributed as dist

import plait
from plait.trainer.watchdog import EXIT_CODE, Heartbeat, Trip, Watchdog, format_ranks, stall_report


def test_format_ranks():
    assert format_ranks([3]) == "rank 3"
    assert format_ranks([2, 0]) == "ranks 0,2"
    assert format_ranks([0, 1, 2, 3, 7, 8]) == "ranks 0-3,7,8"


def test_report_names_who_did_not_arrive():
    trip = Trip(rank=0, step=7, phase="step", seconds=20)
    records = {
        0: Heartbeat(step=7, phase="step", beat=9),
        1: Heartbeat(step=7, phase="step", beat=4),  # silent: frozen in step 7
        2: Heartbeat(step=6, phase="after", beat=8),  # alive, but still saving after step 6
        3: Heartbeat(step=7, phase="step", beat=9),
        4: None,  # never reported
        5: Heartbeat(step=9, phase="closed", beat=2),  # left the loop: sets no pace
        6: Heartbeat(step=7, phase="step", beat=9, error="RuntimeError: CUDA out of memory"),  # raised alone
    }
    line = stall_report(3, 7, trip, records, silent={1}, window_s=2)
    assert line.startswith("watchdog (rank 3): step 7 exceeded 20 s on rank 0; ")
    assert "rank 1 did not arrive (no heartbeat for 2 s: stopped, dead or unreachable; last seen in step 7, last finished step 6)" in line
    assert "rank 2 did not arrive (alive, still in the log, evaluation or save after step 6)" in line
    assert "rank 4 did not arrive (never reported" in line
    assert "ranks 0,3 waiting in step 7" in line
    assert "rank 5 left the training loop" in line
    assert "rank 6 failed (RuntimeError: CUDA out of memory; its traceback is in its log)" in line
    assert line.endswith(f"exiting with code {EXIT_CODE}")


def test_report_when_no_rank_is_behind():
    trip = Trip(rank=1, step=3, phase="after", seconds=5)
    records = {r: Heartbeat(step=3, phase="after", beat=5, answered=True, where="graph.py:1 in wait") for r in (0, 2)}
    records[1] = Heartbeat(step=3, phase="after", beat=5, answered=True, where="loader.py:9 in next_batch")
    line = stall_report(0, 3, trip, records, silent=set(), window_s=2)
    assert "the log, evaluation and save after step 3 exceeded 5 s on rank 1" in line
    assert "no rank is behind" in line and "did not arrive" not in line
    assert "ranks 0,2 at graph.py:1 in wait; rank 1 at loader.py:9 in next_batch" in line
    single = stall_report(0, 1, Trip(0, 2, "step", 5), {0: Heartbeat(step=2, phase="step", where="x.py:1 in f")}, set(), 2)
    assert "rank 0 (the only process) did not finish it; its main thread is at x.py:1 in f" in single


def test_deadline_fires_and_the_trip_reaches_the_other_ranks(tmp_path):
    """Ranks 0 and 2 are watchdogs over one in-memory store; rank 1 reported step 7 once and
    went silent. Rank 0's deadline runs out; rank 2's (longer) has not, yet it follows through
    the store's trip key. Both dump their stacks and name rank 1."""
    store = dist.HashStore()
    exits: list[tuple[int, int]] = []
    log = open(tmp_path / "stderr.txt", "w+")  # faulthandler writes to a real file descriptor
    dogs = [
        Watchdog(timeout, rank, 3, lambda: dist.PrefixStore("run/0/", store),
                 exit_process=lambda code, rank=rank: exits.append((rank, code)), stream=log)
        for rank, timeout in ((0, 1.0), (2, 10.0))
    ]
    dist.PrefixStore("run/0/", store).set("watchdog/rank1", Heartbeat(step=7, phase="step", beat=3).to_json())
    try:
        for dog in dogs:
            dog.step_started(6)  # the first step's longer allowance goes here
            dog.step_finished(6)
            dog.step_started(7)
        end = time.monotonic() + 30
        while len(exits) < 2 and time.monotonic() < end:
            time.sleep(0.1)
    finally:
        for dog in dogs:
            dog.close()
    log.seek(0)
    text = log.read()
    assert sorted(exits) == [(0, EXIT_CODE), (2, EXIT_CODE)], text[-3000:]
    lines = [x for x in text.splitlines() if "exiting with code" in x]
    assert len(lines) == 2, text[-3000:]
    for line in lines:
        assert "step 7 exceeded 1 s on rank 0" in line, line  # rank 2 reports rank 0's deadline
        assert "rank 1 did not arrive (no heartbeat for" in line, line
        assert "ranks 0,2 waiting in step 7" in line, line
    assert "Python stacks of every thread of rank 2:" in text and "most recent call first" in text


def test_close_disarms_and_zero_is_off():
    exits: list[int] = []
    dog = Watchdog(1.0, exit_process=exits.append)
    dog.step_started(1)
    dog.step_finished(1)
    dog.step_started(2)  # a 1 s deadline
    dog.close()
    time.sleep(1.5)
    assert exits == [] and not any(t.is_alive() for t in dog._threads)
    off = Watchdog(0, exit_process=exits.append)
    off.step_started(1)
    off.close()
    assert off._threads == [] and exits == []


STUCK = """
import time
from plait.trainer.watchdog import Watchdog

def wait_for_data_that_never_comes():
    time.sleep(120)

dog = Watchdog(1.0)
dog.step_started(1)
dog.step_finished(1)
dog.step_started(2)
wait_for_data_that_never_comes()
"""


def test_stuck_single_process_exits_naming_rank_0():
    env = {**os.environ, "PYTHONPATH": str(Path(plait.__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", STUCK], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == EXIT_CODE, out.stderr[-3000:]
    assert "watchdog (rank 0): step 2 exceeded 1 s on rank 0; Python stacks of every thread of rank 0:" in out.stderr
    assert 'line 6 in wait_for_data_that_never_comes' in out.stderr  # the main thread's stack, from faulthandler
    assert ("rank 0 (the only process) did not finish it; its main thread is at <string>:6 in "
            "wait_for_data_that_never_comes") in out.stderr
