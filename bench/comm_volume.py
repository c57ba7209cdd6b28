"""Bytes on the wire per rank per step, measured next to the formula, for each parallel layout.

Each layout runs as a torchrun job of this script (`--worker`): the `debug` model (fp32) goes
through plait's own `apply_layout` and optimizer, takes one warm-up step, then one step (forward,
backward, optimizer) under `plait.measure.comm_counter.CommCounter`, and rank 0 reports. The
formulas (PAPERS.md; Psi = a rank's parameters (its tensor-parallel shards), 4 bytes each in
fp32; n = data-parallel ranks, t = tensor-parallel ranks; B s h = one rank's activations of one
layer, 4 bytes each):
  DDP, ZeRO-1, ZeRO-2:  2 (n-1)/n 4Psi      (one all-reduce, or reduce-scatter + all-gather;
                                          ZeRO-1 and DDP with TP are plait's zero1.py)
  ZeRO-3:       3 (n-1)/n 4Psi            (all-gather in forward and again in backward + reduce-scatter)
  TP, TP+SP:    (4 L + 2) 2 (t-1)/t B s h 4  (2 all-reduces per layer forward and 2 backward, plus
                                          the vocabulary-parallel embedding forward and the output
                                          head's input gradient; SP turns each into an equal-volume
                                          reduce-scatter/all-gather pair)
  DP x TP:      the sum of the two
Context parallelism (cp ranks; each holds T = s / cp tokens of the B sequences of its data rank;
H query heads, K key/value heads, E head dim, L layers; f = 2 passes of attention per step, the
forward and the backward, 3 with activation checkpointing, whose recompute runs the forward again):
  data part:    DDP over the dp x cp ranks, 2 (n cp - 1)/(n cp) 4Psi
  Ulysses:      f L (cp-1)/cp B T E (2H + 2K) 4   (per layer and pass 4 all-to-alls: q (H heads),
                                          k, v (K heads) sequence->heads and the output (H) back;
                                          the backward of each is the inverse all-to-all of its
                                          gradient, the same size; each sends (cp-1)/cp of it)
  ring:         L (f (cp-1) + cp) 2 B K T E 4   (point-to-point sends of the stacked k, v shard:
                                          cp-1 hops per forward pass, cp-1 again in backward, plus
                                          cp hops of its gradient accumulator, fp32, around the
                                          ring back to its owner)
Prints a table and writes JSON (default bench/out/comm_volume.json).

    python bench/comm_volume.py [--out FILE] [--only ulysses ring]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SEQ_LEN, BATCH = 64, 8  # global sequences per step
LAYOUTS = {
    "ddp x2": (2, ["--parallel.dp_replicate_degree=2"]),
    "zero1 x2": (2, ["--parallel.dp_shard_degree=2", "--parallel.zero_stage=1"]),
    "zero2 x2": (2, ["--parallel.dp_shard_degree=2", "--parallel.zero_stage=2"]),
    "zero3 x2": (2, ["--parallel.dp_shard_degree=2", "--parallel.zero_stage=3"]),
    "zero3 x4": (4, ["--parallel.dp_shard_degree=4", "--parallel.zero_stage=3"]),
    "tp x2": (2, ["--parallel.tp_degree=2"]),
    "tp x2 + sp": (2, ["--parallel.tp_degree=2", "--parallel.sequence_parallel=true"]),
    "ddp x2 + tp x2": (4, ["--parallel.dp_replicate_degree=2", "--parallel.tp_degree=2"]),
    "zero1 x2 + tp x2": (4, ["--parallel.dp_shard_degree=2", "--parallel.zero_stage=1", "--parallel.tp_degree=2"]),
    "ulysses cp2": (2, ["--parallel.cp_degree=2", "--parallel.cp_method=ulysses"]),
    "ulysses cp2 + ac": (2, ["--parallel.cp_degree=2", "--parallel.cp_method=ulysses",
                             "--train.activation_checkpointing=true"]),
    # The debug model's 2 key/value heads cannot be split 4 ways (Ulysses shards them): 4 here.
    "ulysses cp4, kv 4": (4, ["--parallel.cp_degree=4", "--parallel.cp_method=ulysses", "--model.kv_heads=4"]),
    "ring cp2": (2, ["--parallel.cp_degree=2", "--parallel.cp_method=ring"]),
    "ring cp4": (4, ["--parallel.cp_degree=4", "--parallel.cp_method=ring"]),
    "ring cp2 + ac": (2, ["--parallel.cp_degree=2", "--parallel.cp_method=ring", "--train.activation_checkpointing=true"]),
}


def formula(name: str, r: dict) -> float:
    """Bytes per rank per step for the layout `name` from the worker's result `r`."""
    n, t = r["dp"] * r["cp"], r["tp"]  # cp ranks average their gradients with the data-parallel ones
    psi = 4.0 * r["local_params"]
    data = (3 if name.startswith("zero3") else 2) * (n - 1) / n * psi
    activations = BATCH // r["dp"] * SEQ_LEN * r["hidden"] * 4.0  # a TP group shares its data rank's batch
    tensor = (4 * r["layers"] + 2) * 2 * (t - 1) / t * activations
    return data + tensor + context_formula(r)


def context_formula(r: dict) -> float:
    """Bytes a rank sends per step for context-parallel attention (the docstring's formulas):
    all-to-all for Ulysses, point-to-point sends for the ring; 0 without cp."""
    cp, method = r["cp"], r["cp_method"]
    if cp == 1:
        return 0.0
    b, tokens, e = BATCH // r["dp"], SEQ_LEN // cp, r["head_dim"]
    passes = 3 if r["activation_checkpointing"] else 2  # forward, backward (+ the recompute)
    if method == "ulysses":
        return passes * r["layers"] * (cp - 1) / cp * b * tokens * e * (2 * r["heads"] + 2 * r["kv_heads"]) * 4.0
    kv_shard = 2 * b * r["kv_heads"] * tokens * e * 4.0  # k and v stacked, fp32 (the gradient too)
    return r["layers"] * (passes * (cp - 1) + cp) * kv_shard


def tp_local_numel(p) -> int:  # noqa: ANN001
    """Elements of `p` on one rank of its tensor-parallel group (FSDP's sharding left out: the
    data-parallel formulas count whole parameters)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(p, DTensor):
        return p.numel()
    names = p.device_mesh.mesh_dim_names or ()
    shards = [p.device_mesh.size(i) for i, (name, pl) in enumerate(zip(names, p.placements)) if name == "tp" and pl.is_shard()]
    return p.numel() // (shards[0] if shards else 1)


def worker(overrides: list[str]) -> None:
    import torch
    import torch.distributed as dist

    from plait.measure.comm_counter import CommCounter
    from plait.model import build_model, count_params, materialize
    from plait.parallel.apply import apply_layout, build_layout_optimizer
    from plait.parallel.context_parallel import context_sharding
    from plait.parallel.mesh import build_mesh
    from plait.parallel.tensor_parallel import loss_parallel_context, tp_cross_entropy
    from plait.validation import build_config, resolve_model_args, resolve_run

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    cfg = build_config(None, ["--model.name=debug", f"--train.seq_len={SEQ_LEN}",
                              f"--train.global_batch_tokens={SEQ_LEN * BATCH}", *overrides], world_size=world)
    lay = resolve_run(cfg, world).layout
    mesh = build_mesh(lay, torch.device("cpu"))
    args = resolve_model_args(cfg.model, 256)
    model = apply_layout(materialize(build_model(args), "cpu", 0), mesh, SEQ_LEN)
    optimizer = build_layout_optimizer(model, cfg.optim, mesh)
    per_rank = BATCH // lay.dp
    gen = torch.Generator().manual_seed(mesh.dp_rank())
    tp = lay.tp > 1
    cp = context_sharding(mesh.submesh("cp"), lay.cp_method) if lay.cp > 1 else None

    def step() -> None:
        tokens = torch.randint(0, 256, (per_rank, SEQ_LEN + 1), generator=gen)
        inputs, targets, extra = tokens[:, :-1], tokens[:, 1:], {}
        if cp is not None:  # this rank's tokens of each sequence, as the training loop does
            inputs, targets, extra["positions_T"] = cp.split(inputs, targets)
        with loss_parallel_context(tp):
            loss = tp_cross_entropy(model(inputs, **extra), targets)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: lazy initialisation of FSDP and DDP
    with CommCounter() as counter:
        step()
    if dist.get_rank() == 0:
        local = sum(tp_local_numel(p) for p in model.parameters())
        print("RESULT " + json.dumps({**counter.summary(), "params": count_params(args).total, "local_params": local,
                                      "dp": lay.dp, "tp": lay.tp, "cp": lay.cp,
                                      "cp_method": cfg.parallel.cp_method,
                                      "activation_checkpointing": cfg.train.activation_checkpointing,
                                      "layers": args.layers, "hidden": args.hidden, "heads": args.heads,
                                      "kv_heads": args.kv_heads, "head_dim": args.head_dim}), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/out/comm_volume.json")
    parser.add_argument("--only", nargs="+", metavar="PREFIX", help="layouts whose name starts with one of these")
    parser.add_argument("--worker", nargs=argparse.REMAINDER)
    a = parser.parse_args()
    if a.worker is not None:
        worker(a.worker)
        return 0
    layouts = {k: v for k, v in LAYOUTS.items() if not a.only or any(k.startswith(x) for x in a.only)}
    rows = []
    print(f"{'layout':<18}{'ranks':>6}{'measured B/rank':>17}{'formula B/rank':>16}{'ratio':>8}  by kind (calls)")
    for name, (n, overrides) in layouts.items():
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               __file__, "--worker", *overrides]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            print(f"{name}: failed\n{out.stderr[-2000:]}")
            return 1
        result = json.loads(lines[0][len("RESULT "):])
        expected = formula(name, result)
        measured = result["wire_bytes"]
        kinds = ", ".join(f"{k} {v['calls']}" for k, v in result["by_kind"].items())
        print(f"{name:<18}{n:>6}{measured:>17,.0f}{expected:>16,.0f}{measured / expected:>8.3f}  {kinds}")
        row = {"layout": name, "ranks": n, "measured_wire_bytes": measured, "formula_wire_bytes": expected,
               "ratio": measured / expected, **result}
        if result["cp"] > 1:  # the attention's own traffic: all-to-alls (Ulysses) or sends (ring)
            row["context_measured_bytes"] = sum(result["by_kind"].get(k, {}).get("wire_bytes", 0) for k in ("all_to_all", "send"))
            row["context_formula_bytes"] = context_formula(result)
        rows.append(row)
    context_rows = [r for r in rows if "context_measured_bytes" in r]
    if context_rows:
        print("\ncontext-parallel attention alone (all-to-all or send bytes per rank per step)")
        print(f"{'layout':<18}{'ranks':>6}{'measured B/rank':>17}{'formula B/rank':>16}{'ratio':>8}")
        for r in context_rows:
            m, f = r["context_measured_bytes"], r["context_formula_bytes"]
            print(f"{r['layout']:<18}{r['ranks']:>6}{m:>17,.0f}{f:>16,.0f}{m / f:>8.3f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"benchmark": "comm_volume", "date": time.strftime("%Y-%m-%d"),
                                       "seq_len": SEQ_LEN, "global_batch": BATCH, "rows": rows}, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
