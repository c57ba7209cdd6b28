"""Context parallelism: per-rank activation memory and step time as the sequence grows.

For each cp_degree (1: one process, plain attention; > 1: that many gloo workers on this machine
running the context-parallel attention) and each sequence length, the `debug` model (fp32,
byte vocabulary) runs forward and backward on one sequence (batch 1). Activation memory is
counted exactly: every tensor autograd saves for backward passes through
`torch.autograd.graph.saved_tensors_hooks`, and the bytes of the distinct storages are added up
(parameters excluded: they are weights, not activations). The step time is the median of
`--steps` forward+backward passes after one warm-up, the slowest rank's. The CPU's cores are
shared by the workers (torch threads = cores / cp, at least 1), so on a small machine the times
show the cost of the exchanges, not a speed-up.

  python bench/context_parallel.py [--seq-lens 1024 4096 16384] [--degrees 1 2 4] [--method ring]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from plait.model import NAMED_SIZES, build_model, materialize  # noqa: E402

DEBUG = NAMED_SIZES["debug"].replace(vocab=256)


def saved_activation_bytes(model: torch.nn.Module, step) -> tuple[int, object]:
    """Bytes of the distinct storages autograd saves for backward during `step()` (the forward),
    parameters excluded; returns them and what `step` returned."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    return sum(storages.values()), out


def measure(seq_len: int, steps: int, mesh, method: str) -> dict:
    """One rank's numbers for one sequence length."""
    from plait.parallel.context_parallel import apply_context_parallel, context_sharding

    model = materialize(build_model(DEBUG), "cpu", seed=0)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, DEBUG.vocab, (1, seq_len + 1), generator=gen)
    inputs_BT, targets_BT, extra = tokens[:, :-1], tokens[:, 1:], {}
    if mesh is not None:
        apply_context_parallel(model, mesh, method)
        inputs_BT, targets_BT, extra["positions_T"] = context_sharding(mesh, method).split(inputs_BT, targets_BT)

    def forward() -> torch.Tensor:
        logits_BTV = model(inputs_BT, **extra)
        return F.cross_entropy(logits_BTV.flatten(0, 1), targets_BT.flatten())

    saved, loss = saved_activation_bytes(model, forward)
    loss.backward()  # the warm-up
    times = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        if mesh is not None:
            dist.barrier()
        start = time.perf_counter()
        forward().backward()
        times.append(time.perf_counter() - start)
    return {"saved_bytes": saved, "step_s": statistics.median(times), "tokens": inputs_BT.shape[1]}


def _worker(rank: int, cp: int, threads: int, store: str, args: argparse.Namespace, out_path: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=cp,
                            timeout=datetime.timedelta(minutes=5))
    mesh = init_device_mesh("cpu", (cp,), mesh_dim_names=("cp",))
    rows = []
    for seq_len in args.seq_lens:
        mine = measure(seq_len, args.steps, mesh, args.method)
        every: list = [None] * cp
        dist.all_gather_object(every, mine)
        rows.append({"seq_len": seq_len, "per_rank": every})
    if rank == 0:
        Path(out_path).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()


def run_degree(cp: int, args: argparse.Namespace, cores: int) -> list[dict]:
    threads = max(1, cores // cp)
    if cp == 1:
        torch.set_num_threads(threads)
        return [{"seq_len": n, "per_rank": [measure(n, args.steps, None, args.method)]} for n in args.seq_lens]
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(cp, threads, os.path.join(tmp, "store"), args, out_path), nprocs=cp, join=True)
        return json.loads(Path(out_path).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--degrees", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--method", choices=["ring", "ulysses"], default="ring")
    parser.add_argument("--steps", type=int, default=2, help="timed forward+backward passes (after one warm-up)")
    parser.add_argument("--json", default="bench/out/context_parallel.json")
    args = parser.parse_args()
    cores = os.cpu_count() or 1

    results = []
    single: dict[int, int] = {}
    print(f"debug model, fp32, batch 1, {args.method} attention for cp > 1, {cores} CPU cores")
    print(f"{'cp':>3} {'seq_len':>8} {'tokens/rank':>12} {'saved MiB/rank':>15} {'vs cp=1':>8} {'step s':>8}")
    for cp in args.degrees:
        for row in run_degree(cp, args, cores):
            n = row["seq_len"]
            saved = max(r["saved_bytes"] for r in row["per_rank"])
            if cp == 1:
                single[n] = saved
            ratio = single[n] / saved if n in single else None
            step_s = max(r["step_s"] for r in row["per_rank"])
            results.append({
                "cp_degree": cp, "method": args.method if cp > 1 else "none", "seq_len": n,
                "tokens_per_rank": row["per_rank"][0]["tokens"], "saved_bytes_per_rank": saved,
                "saved_bytes_each_rank": [r["saved_bytes"] for r in row["per_rank"]],
                "single_over_cp": ratio, "step_s": step_s,
            })
            shown = f"{ratio:.2f}x" if ratio else "-"
            print(f"{cp:>3} {n:>8} {row['per_rank'][0]['tokens']:>12} {saved / 2**20:>15.1f} {shown:>8} {step_s:>8.2f}", flush=True)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": "debug", "dtype": "fp32", "cores": cores, "rows": results}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
