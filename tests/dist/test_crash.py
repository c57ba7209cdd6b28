"""Crash recovery and the addresses a job listens on, tested on real jobs of the `debug` model.

- A 4-process job (FSDP, fp32, gloo on CPU) loses a worker to SIGKILL after its first checkpoint:
  torchrun restarts the worker group once, the group resumes from the newest checkpoint, the job
  exits 0, and its final weights and every step's loss are bit-identical to an uninterrupted run's.
- A job killed (the whole process group) while a checkpoint is being written resumes, when
  started again, from the previous complete one; the half-written temporary directory is not
  taken for a checkpoint.
- Everything a single-node job listens on (torchrun's agent, every worker) is a loopback address.
  This is checked on the uninterrupted run above, sampled from /proc while it runs; and, in this
  process, the stores `plait.launch_agent` starts: a new one on 127.0.0.1 for each round of the
  loopback rendezvous, and the multi-node rendezvous store that torch's own rendezvous reuses.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from plait.checkpoint import latest_checkpoint
from plait.checkpoint import iter_model_tensors
from plait.launch_agent import LOOPBACK, LoopbackRendezvous
from plait.report import read_metrics

from .layouts import BASE, plait_cli
from .processes import descendants, listening, start_plait, workers

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads processes and sockets from Linux's /proc")

NPROC, STEPS, EVERY = 4, 16, 4
# FSDP (ZeRO-3) over 4 ranks. DDP is not used here: its first step after any start all-reduces
# the gradients as one bucket and later steps in buckets rebuilt in backward order, so the step
# after a resume sums in another order than the uninterrupted run did (docs/training.md).
JOB = ["--nproc-per-node", str(NPROC), "--max-restarts", "1", *BASE, f"--train.steps={STEPS}",
       f"--checkpoint.every={EVERY}", "--run.progress=plain", "--parallel.dp_shard_degree=4", "--parallel.zero_stage=3"]
TIMEOUT = 300


def _wait(proc, timeout: float = TIMEOUT) -> int:
    try:
        return proc.wait(timeout=timeout)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return dict(iter_model_tensors(run_dir / "checkpoints" / f"step_{STEPS}"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted job, and what each of its processes listened on while it ran."""
    run_dir = tmp_path_factory.mktemp("crash") / "reference"
    log = run_dir.parent / "reference.log"
    proc = start_plait("train", *JOB, f"--run.dir={run_dir}", log=log)
    seen: dict[int, set] = {}
    worker_pids: set[int] = set()
    try:
        while proc.poll() is None:
            for pid in descendants(proc.pid):
                seen.setdefault(pid, set()).update(listening(pid))
            worker_pids.update(workers(proc.pid).values())
            time.sleep(0.05)
    finally:
        rc = _wait(proc)
    assert rc == 0, log.read_text()[-5000:]
    return run_dir, seen, worker_pids


def test_single_node_job_listens_on_loopback_only(uninterrupted):
    _, seen, worker_pids = uninterrupted
    assert len(worker_pids) == NPROC
    # Not vacuous: the agent's store and every worker's gloo connections were seen listening.
    assert all(seen.get(pid) for pid in worker_pids), {pid: seen.get(pid) for pid in worker_pids}
    assert any(seen[pid] for pid in seen if pid not in worker_pids), seen
    exposed = {pid: sorted(str(a) for a, _ in found if not a.is_loopback) for pid, found in seen.items()}
    assert not any(exposed.values()), f"listening beyond loopback: {exposed}"


def test_loopback_rendezvous_gives_each_round_a_new_loopback_store():
    """Each start of the worker group meets in a new store on 127.0.0.1, so a restarted group
    cannot read the previous group's keys (such as its workers' gloo addresses)."""
    import torch.distributed as dist

    rdzv = LoopbackRendezvous("test")
    first = rdzv.next_rendezvous()
    first.store.set("gloo/peer", "dead worker")
    second = rdzv.next_rendezvous()
    assert (first.rank, first.world_size, second.rank, second.world_size) == (0, 1, 0, 1)
    info_1, info_2 = first.bootstrap_store_info, second.bootstrap_store_info
    assert info_1.master_addr == info_2.master_addr == LOOPBACK and info_1.master_port != info_2.master_port
    ports = {info_1.master_port, info_2.master_port}
    ours = [(a, p) for a, p in listening(os.getpid()) if p in ports]
    assert {p for _, p in ours} == ports and all(a.is_loopback for a, _ in ours), ours
    # The workers' view: a client of the announced store (the agent's view is under the run id);
    # the previous round's keys are not in it.
    client = dist.TCPStore(LOOPBACK, info_2.master_port, is_master=False)
    client.set("test/x", "1")
    assert second.store.get("x") == b"1"
    assert first.store.check(["gloo/peer"]) and not second.store.check(["gloo/peer"])
    assert not client.check(["test/gloo/peer"])


def test_host_store_binds_the_named_address_and_torch_reuses_it():
    """Several nodes: the store plait starts on the --rdzv-endpoint address is the one torch's c10d
    rendezvous then asks for (`multi_tenant=True`, the same port): no second server on every interface."""
    import torch.distributed as dist

    from plait.launch_agent import _is_address, bind_socket, store_on

    assert _is_address("127.0.0.1") and _is_address("::1") and not _is_address("head-node")
    ours = store_on(bind_socket(LOOPBACK, 0), multi_tenant=True)
    port = ours.port
    torchs = dist.TCPStore(LOOPBACK, port, is_master=True, multi_tenant=True)  # as c10d_rendezvous_backend creates it
    torchs.set("k", "v")
    assert ours.get("k") == b"v"
    found = [a for a, p in listening(os.getpid()) if p == port]
    assert found and all(a.is_loopback for a in found), found


def test_kill9_worker_restarts_resumes_and_matches(uninterrupted, tmp_path):
    ref_dir = uninterrupted[0]
    run_dir, log = tmp_path / "killed", tmp_path / "killed.log"
    # LOGLEVEL=INFO: torchrun logs its decision to restart the worker group at INFO.
    proc = start_plait("train", *JOB, f"--run.dir={run_dir}", log=log, env={"LOGLEVEL": "INFO"})
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (run_dir / "checkpoints" / f"step_{EVERY}").is_dir():  # renamed into place when complete
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-5000:]
            time.sleep(0.02)
        victim = workers(proc.pid).get(1)
        assert victim is not None and proc.poll() is None, "the job ended before a worker could be killed"
        os.kill(victim, signal.SIGKILL)
    finally:
        rc = _wait(proc)
    text = log.read_text()
    assert rc == 0, text[-5000:]
    # torchrun saw the worker die, and restarted the group (its own log lines).
    assert re.search(rf"failed \(exitcode: -9\) local_rank: 1 \(pid: {victim}\)", text), text[-5000:]
    assert re.search(r"Worker group FAILED\. 1/1 attempts left; will restart worker group", text), text[-5000:]
    resumed = re.findall(rf"resumed from {re.escape(str(run_dir / 'checkpoints'))}/step_(\d+) \(step (\d+),", text)
    assert len(resumed) == 1 and EVERY <= int(resumed[0][0]) < STEPS, resumed

    ref, got = _weights(ref_dir), _weights(run_dir)
    assert ref.keys() == got.keys()
    differ = [name for name in ref if not torch.equal(ref[name], got[name])]
    assert not differ, f"not bit-identical to the uninterrupted run: {differ}"
    # Replayed steps are logged twice in metrics.jsonl; the report keeps the newest line of each.
    losses = {r["step"]: r["loss"] for r in read_metrics(run_dir)["train"]}
    assert losses == {r["step"]: r["loss"] for r in read_metrics(ref_dir)["train"]}
    assert sorted(losses) == list(range(1, STEPS + 1))


def test_kill_during_save_resumes_from_previous_checkpoint(tmp_path):
    # One process, a checkpoint after each of 2 steps; 65,536 embedding rows make a checkpoint
    # ~100 MB, so a save lasts a fraction of a second and the kill can land inside it.
    run_dir, log = tmp_path / "run", tmp_path / "first.log"
    args = ["train", *BASE, "--train.steps=2", "--checkpoint.every=1", "--model.vocab=65536", "--train.seq_len=16",
            "--train.global_batch_tokens=64", "--train.micro_batch_size=4", "--run.progress=plain", f"--run.dir={run_dir}"]
    root = run_dir / "checkpoints"
    proc = start_plait(*args, log=log)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (root / ".tmp_step_2").exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-5000:]
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job, mid-save
    finally:
        _wait(proc)
    assert (root / ".tmp_step_2").exists() and not (root / "step_2").exists(), "the kill missed the save"
    assert latest_checkpoint(run_dir) == root / "step_1"

    out = plait_cli(*args)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"resumed from {root / 'step_1'} (step 1," in out.stdout, out.stdout[-3000:]
    assert latest_checkpoint(run_dir) == root / "step_2"
    assert not (root / ".tmp_step_2").exists()
    assert sorted(r["step"] for r in read_metrics(run_dir)["train"]) == list(range(1, 3))
