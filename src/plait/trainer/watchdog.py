"""A per-step watchdog: when a rank stalls, every rank dumps its Python stacks, the log names the
rank that did not arrive, and the job exits non-zero (so torchrun can stop or restart it).

The loop marks each step's start and end; each mark re-arms a deadline of `train.watchdog_timeout`
seconds. The first step after start-up or a rollback gets FIRST_STEP_FACTOR times as long
(compilation, lazy initialisation, the first collectives); the log, evaluation and save after a
step get a deadline of their own. Two daemon threads per rank:

- the heartbeat thread publishes this rank's position (step, phase and a beat counter) to the
  job's c10d TCPStore on every mark and at least every `poll_s`, over a client connection of its
  own: the process group's collectives are what hangs, so they cannot carry the news. It also
  watches the job's trip key.
- the timer thread checks the deadline and the trip key. When either fires it sets the trip key
  (every live rank then follows within a heartbeat, also those whose own deadline has not run
  out), dumps every thread's Python stack with faulthandler, reads all ranks' heartbeats twice, a
  window apart (a rank whose counter did not move and that did not answer the trip is stopped,
  dead or unreachable), logs one line naming the ranks that did not arrive, and leaves with
  os._exit(EXIT_CODE): the main thread is blocked inside a collective and cannot unwind.

One process has no store and no peers: the watchdog names rank 0 and exits all the same, so a
stuck run ends. The threads need the GIL: a main thread stuck in C code that holds it (rare:
torch's kernels and collectives release it) stops the watchdog too.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TextIO

# Like coreutils' `timeout`: the job ran out of time.
EXIT_CODE = 124
FIRST_STEP_FACTOR = 3
_TRIP_KEY = "watchdog/trip"
# Progress along the loop, for comparing ranks: start-up, in step s (2s), after step s (2s + 1), done.
_SETUP, _CLOSED = -1, 1 << 62


@dataclass
class Heartbeat:
    """What a rank publishes: where it is in the loop, and a counter that moves while it lives."""

    step: int = 0  # the step in progress ("step"), or the last one finished ("after", "closed")
    phase: str = "setup"  # "setup", "step", "after" (its log, evaluation, save) or "closed"
    beat: int = 0
    answered: bool = False  # it saw the trip and dumped its stacks: alive
    where: str = ""  # its main thread's innermost frame, filled in when it answers the trip
    error: str = ""  # the error it raised, when it failed and now waits to leave the job

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> Heartbeat:
        return cls(**json.loads(text))

    @property
    def progress(self) -> int:
        if self.phase == "setup":
            return _SETUP
        if self.phase == "closed":
            return _CLOSED
        return 2 * self.step + (self.phase == "after")

    def position(self) -> str:
        if self.phase == "setup":
            return "in start-up"
        if self.phase == "closed":
            return "past the last step"
        if self.phase == "after":
            return f"in the log, evaluation or save after step {self.step}"
        return f"in step {self.step}"

    def last_finished(self) -> int:
        return self.step - 1 if self.phase == "step" else self.step


@dataclass(frozen=True)
class Trip:
    """The deadline that ran out first: whose, in which step and phase, after how many seconds."""

    rank: int
    step: int
    phase: str
    seconds: float

    def what(self) -> str:
        if self.phase == "after":
            return f"the log, evaluation and save after step {self.step}"
        return f"step {self.step}" if self.phase == "step" else "start-up"


def format_ranks(ranks: list[int]) -> str:
    """ "rank 3", "ranks 0,2", "ranks 0-3,7": runs of three or more are shortened."""
    ranks = sorted(ranks)
    parts, i = [], 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        parts.append(f"{ranks[i]}-{ranks[j]}" if j - i >= 2 else ",".join(map(str, ranks[i:j + 1])))
        i = j + 1
    return ("rank " if len(ranks) == 1 else "ranks ") + ",".join(parts)


def _grouped(by_text: dict[str, list[int]]) -> list[str]:
    """ "ranks 0,2 TEXT" for each text, in the order of their lowest rank."""
    return [f"{format_ranks(ranks)} {text}" for text, ranks in sorted(by_text.items(), key=lambda kv: min(kv[1]))]


def stall_report(
    reporter: int, world_size: int, trip: Trip, records: dict[int, Heartbeat | None], silent: set[int],
    window_s: float, store_problem: str | None = None,
) -> str:
    """The one line a rank logs when the watchdog fires: which deadline ran out, which ranks did
    not arrive (and why we think so), which ones wait, and where."""
    head = f"watchdog (rank {reporter}): {trip.what()} exceeded {trip.seconds:g} s on rank {trip.rank}"
    tail = f"; exiting with code {EXIT_CODE}"
    if world_size == 1:
        mine = records.get(reporter) or Heartbeat()
        return f"{head}; rank 0 (the only process) did not finish it; its main thread is at {mine.where or 'unknown'}{tail}"
    if store_problem is not None:
        return (f"{head}; the other ranks' heartbeats could not be read ({store_problem}), so the rank that "
                f"stalled is unknown{tail}")
    # A rank that left the loop (finished, or raised and closed its watchdog) sets no pace.
    known = [rec for rec in records.values() if rec is not None and rec.phase != "closed"] or [Heartbeat()]
    front = max(rec.progress for rec in known)
    late: dict[str, list[int]] = {}
    waiting: dict[str, list[int]] = {}
    for rank in range(world_size):
        rec = records.get(rank)
        if rec is not None and rec.error:
            late.setdefault(f"failed ({rec.error}; its traceback is in its log)", []).append(rank)
        elif rec is not None and rec.phase == "closed":
            waiting.setdefault("left the training loop (it finished, or failed: see its own error)", []).append(rank)
        elif rec is None:
            late.setdefault("did not arrive (never reported: stuck in start-up, or it cannot reach the job's store)",
                            []).append(rank)
        elif rank in silent:
            late.setdefault(
                f"did not arrive (no heartbeat for {window_s:.0f} s: stopped, dead or unreachable; last seen "
                f"{rec.position()}, last finished step {rec.last_finished()})", []).append(rank)
        elif rec.progress < front:
            late.setdefault(f"did not arrive (alive, still {rec.position()})", []).append(rank)
        else:
            waiting.setdefault(f"waiting {rec.position()}", []).append(rank)
    if late:
        return "; ".join([head, *_grouped(late), *_grouped(waiting)]) + tail
    # Every rank is alive and equally far: a collective that never completes (or a step longer
    # than the timeout). Where each main thread is tells the odd one out.
    places: dict[str, list[int]] = {}
    for rank, rec in records.items():
        if rec is not None and rec.phase != "closed":
            places.setdefault(f"at {rec.where or 'unknown'}", []).append(rank)
    position = known[0].position()
    return (f"{head}; no rank is behind: all are alive and {position} (a collective that never completes, or a step "
            f"longer than train.watchdog_timeout); main threads: " + "; ".join(_grouped(places)) + tail)


def main_thread_position() -> str:
    """The main thread's innermost frame, and the innermost plait frame that led there."""
    frame = sys._current_frames().get(threading.main_thread().ident or -1)
    if frame is None:
        return "unknown"

    def name(f: Any) -> str:
        return f"{Path(f.f_code.co_filename).name}:{f.f_lineno} in {f.f_code.co_name}"

    text, ours = name(frame), frame
    while ours is not None and "plait" not in Path(ours.f_code.co_filename).parts:
        ours = ours.f_back
    if ours is not None and ours is not frame:
        text += f", from {name(ours)}"
    return text


class Watchdog:
    """Deadlines per step for one rank; `timeout_s` 0 makes every method a no-op.

    `connect` opens the job's key-value store (None: a single process, or no store to be had);
    `exit_process` and `stream` are os._exit and stderr, replaceable so the logic can be tested
    inside one process."""

    def __init__(
        self, timeout_s: float, rank: int = 0, world_size: int = 1, connect: Callable[[], Any] | None = None,
        *, exit_process: Callable[[int], Any] = os._exit, stream: TextIO | None = None,
    ) -> None:
        self.timeout_s = float(timeout_s)
        self.rank, self.world_size = rank, world_size
        # Four store writes per poll at most, and a rank is silent after ten polls without a beat.
        self.poll_s = min(max(self.timeout_s / 50, 0.1), 2.0)
        self.window_s = max(10 * self.poll_s, 2.0)
        self._connect, self._exit, self._stream = connect, exit_process, stream
        self._lock = threading.Lock()
        self._beat = Heartbeat()
        self._deadline: float | None = None
        self._allowance = 0.0
        self._first = True
        self._own_trip: Trip | None = None
        self._seen_trip: Trip | None = None
        self._store: Any = None
        self._store_problem: str | None = None
        self._error: BaseException | None = None
        self._wake, self._stop = threading.Event(), threading.Event()
        self._threads: list[threading.Thread] = []
        if self.timeout_s > 0:
            for target, name in ((self._heartbeats, "plait-watchdog-heartbeat"), (self._watch, "plait-watchdog-timer")):
                thread = threading.Thread(target=target, name=name, daemon=True)
                thread.start()
                self._threads.append(thread)

    # The main thread's side: a few attribute writes and an Event.set per mark.

    def step_started(self, step: int) -> None:
        allowance = self.timeout_s * (FIRST_STEP_FACTOR if self._first else 1)
        self._first = False
        self._mark(step, "step", allowance)

    def step_finished(self, step: int) -> None:
        self._mark(step, "after", self.timeout_s)

    def pause(self) -> None:
        """Start-up again (after a rollback): no deadline until the next step starts, and that
        step counts as a first one."""
        self._first = True
        self._mark(0, "setup", None)

    def close(self) -> None:
        """Stop watching (the loop is over, or it raised); publishes "closed" and ends the threads."""
        if not self._threads or self._stop.is_set():
            return
        with self._lock:
            self._beat.phase, self._deadline = "closed", None
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=max(2 * self.poll_s, 1.0))

    def note_error(self, err: BaseException) -> None:
        """This rank raised and is leaving: stay armed (it may now wait on ranks blocked in a
        collective), and tell the others why, should the deadline run out."""
        if not self._threads:
            return
        with self._lock:
            self._beat.error = f"{type(err).__name__}: {err}"[:300]
            self._error = err
        self._wake.set()

    def _mark(self, step: int, phase: str, allowance: float | None) -> None:
        if not self._threads:
            return
        with self._lock:
            self._beat.step, self._beat.phase = step, phase
            self._deadline = None if allowance is None else time.monotonic() + allowance
            self._allowance = allowance or 0.0
        self._wake.set()

    # The heartbeat thread: store I/O only, so a store that does not answer blocks nothing else.

    def _heartbeats(self) -> None:
        if self._connect is not None:
            try:
                self._store = self._connect()
            except Exception as err:  # the job runs on; the report says why peers are unknown
                self._store_problem = f"cannot connect to the job's store: {type(err).__name__}: {err}"
        key = f"watchdog/rank{self.rank}"
        own_trip_written = False
        while True:
            with self._lock:
                self._beat.beat += 1
                payload = self._beat.to_json()
            store = self._store
            if store is not None:
                try:
                    store.set(key, payload)
                    if self._own_trip is not None and not own_trip_written:
                        store.set(_TRIP_KEY, json.dumps(dataclasses.asdict(self._own_trip)))
                        own_trip_written = True
                    elif self._seen_trip is None and self._own_trip is None and store.check([_TRIP_KEY]):
                        self._seen_trip = Trip(**json.loads(store.get(_TRIP_KEY)))
                except Exception as err:
                    self._store_problem = f"{type(err).__name__}: {err}"
            if self._stop.is_set():
                return  # after publishing the final record
            self._stop.wait(self.poll_s / 4)  # however fast the steps, at most four writes per poll
            self._wake.wait(self.poll_s * 3 / 4)
            self._wake.clear()

    # The timer thread.

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                deadline, allowance = self._deadline, self._allowance
                step, phase = self._beat.step, self._beat.phase
            trip = self._seen_trip
            if trip is None and deadline is not None and time.monotonic() > deadline:
                trip = self._own_trip = Trip(rank=self.rank, step=step, phase=phase, seconds=allowance)
                self._wake.set()
            if trip is not None and not self._stop.is_set():
                self._expire(trip)
                return

    def _expire(self, trip: Trip) -> None:
        """Dump, report, exit; whatever fails on the way, the process still exits."""
        out = self._stream if self._stream is not None else sys.stderr
        head = f"watchdog (rank {self.rank}): {trip.what()} exceeded {trip.seconds:g} s on rank {trip.rank}"
        try:
            with self._lock:
                self._beat.where, self._beat.answered = main_thread_position(), True
            self._wake.set()
            try:
                out.write(f"{head}; Python stacks of every thread of rank {self.rank}:\n")
                out.flush()
                faulthandler.dump_traceback(file=out, all_threads=True)
                if self._error is not None:  # it would be lost: os._exit ends the process before Python prints it
                    out.write(f"watchdog (rank {self.rank}): this rank raised, and then waited for the others:\n")
                    out.write("".join(traceback.format_exception(self._error)))
                out.flush()
            except (OSError, ValueError, AttributeError):  # no file descriptor: the report line still goes out
                pass
            try:
                line = self._report(trip)
            except Exception as err:
                line = (f"{head}; the other ranks' heartbeats could not be read ({type(err).__name__}: {err}); "
                        f"exiting with code {EXIT_CODE}")
            out.write(line + "\n")
            out.flush()
        finally:
            self._exit(EXIT_CODE)

    def _report(self, trip: Trip) -> str:
        with self._lock:
            mine = {self.rank: dataclasses.replace(self._beat)}
        if self.world_size == 1:
            return stall_report(self.rank, 1, trip, mine, set(), self.window_s)
        if self._store is None:
            problem = self._store_problem or "this job has no key-value store to read them from"
            return stall_report(self.rank, self.world_size, trip, mine, set(), self.window_s, problem)
        # Read in a thread of its own: a store that stopped answering must not keep this rank alive.
        found: dict[str, Any] = {}

        def observe() -> None:
            first = self._read_all()
            time.sleep(self.window_s)
            second = self._read_all()
            found["silent"] = {
                rank for rank, rec in second.items()
                if rank != self.rank and rec is not None and first.get(rank) is not None
                and rec.beat == first[rank].beat and not rec.answered and rec.phase != "closed"  # type: ignore[union-attr]
            }
            found["records"] = second

        reader = threading.Thread(target=observe, name="plait-watchdog-reader", daemon=True)
        reader.start()
        reader.join(self.window_s + 15.0)
        if "records" not in found:
            problem = self._store_problem or f"the job's store did not answer within {self.window_s + 15:.0f} s"
            return stall_report(self.rank, self.world_size, trip, mine, set(), self.window_s, problem)
        records = found["records"]
        records[self.rank] = mine[self.rank]  # our own is current, whatever the store holds
        return stall_report(self.rank, self.world_size, trip, records, found["silent"], self.window_s)

    def _read_all(self) -> dict[int, Heartbeat | None]:
        keys = [f"watchdog/rank{r}" for r in range(self.world_size)]
        store = self._store
        if store.check(keys):  # one round trip when every rank has reported (the usual case)
            return {r: Heartbeat.from_json(v) for r, v in enumerate(store.multi_get(keys))}
        return {r: Heartbeat.from_json(store.get(k)) if store.check([k]) else None for r, k in enumerate(keys)}


def start_watchdog(timeout_s: float, rank: int, world_size: int) -> Watchdog:
    """The watchdog of this worker: over the job's store when torchrun started several workers."""
    from plait.parallel.job import job_store_address

    address = job_store_address() if world_size > 1 else None
    if address is None:
        return Watchdog(timeout_s, rank, world_size)

    def connect() -> Any:
        import torch.distributed as dist

        client = dist.TCPStore(address.host, address.port, is_master=False, wait_for_workers=False,
                               timeout=timedelta(seconds=30))
        return dist.PrefixStore(address.prefix, client)

    return Watchdog(timeout_s, rank, world_size, connect)
