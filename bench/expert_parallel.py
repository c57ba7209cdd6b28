"""All-to-all bytes of expert parallelism per rank per step, measured next to the formula.

Each layout runs as a torchrun job of this script (`--worker`): the `debug-moe` model (fp32,
4 experts, top-2, dropless) goes through plait's own `apply_layout` and optimizer, takes one
warm-up step, then one step (forward, backward, optimizer) under
`plait.measure.comm_counter.CommCounter`, which counts an uneven all-to-all as the bytes that
leave the rank. Rank 0 reports. Per MoE layer and step a rank runs four token all-to-alls
(dispatch and combine in forward, their reverses in backward) of equal size, and one exchange of
the per-expert counts (forward only). With N tokens on the rank, k experts per token, hidden h,
4 bytes, ep ranks and X experts:
  uniform routing:  4 x N k h 4 x (ep-1)/ep            per layer
  routing counted:  2 (S + R) h 4, S = assignments this rank sends to experts on other ranks,
                    R = assignments it receives from them (dispatch and the backward of combine
                    send S rows, combine and the backward of dispatch send R rows); both read
                    from the per-expert counts the layers routed, not from the collectives
  counts exchange:  X 8 (ep-1)/ep                     per layer (int64 counts)
Both formula columns include the counts exchange. The measured all-to-all bytes should equal
"counted" exactly; "uniform" is the planning formula, off by how uneven the router is. FSDP and balance-loss traffic are not in these columns.
Prints a table and writes JSON (default bench/out/expert_parallel.json).

    python bench/expert_parallel.py [--out FILE]
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
    "ep2, fsdp x2": (2, ["--parallel.dp_shard_degree=2", "--parallel.zero_stage=3", "--parallel.ep_degree=2"]),
    "ep2, fsdp x4": (4, ["--parallel.dp_shard_degree=4", "--parallel.zero_stage=3", "--parallel.ep_degree=2"]),
    "ep4, fsdp x4": (4, ["--parallel.dp_shard_degree=4", "--parallel.zero_stage=3", "--parallel.ep_degree=4"]),
}


def worker(overrides: list[str]) -> None:
    import torch
    import torch.distributed as dist

    from plait.measure.comm_counter import CommCounter
    from plait.model import build_model, materialize, moe_layers
    from plait.parallel.apply import apply_layout, build_layout_optimizer
    from plait.parallel.mesh import build_mesh
    from plait.parallel.tensor_parallel import tp_cross_entropy
    from plait.validation import build_config, resolve_model_args, resolve_run

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    cfg = build_config(None, ["--model.name=debug-moe", f"--train.seq_len={SEQ_LEN}",
                              f"--train.global_batch_tokens={SEQ_LEN * BATCH}", *overrides], world_size=world)
    mesh = build_mesh(resolve_run(cfg, world).layout, torch.device("cpu"))
    args = resolve_model_args(cfg.model, 256)
    model = apply_layout(materialize(build_model(args), "cpu", 0), mesh, SEQ_LEN)
    optimizer = build_layout_optimizer(model, cfg.optim, mesh)
    per_rank = BATCH // mesh.layout.dp
    gen = torch.Generator().manual_seed(mesh.dp_rank())
    ep = mesh.layout.ep
    ep_group_ranks = dist.get_process_group_ranks(mesh.ep_mesh()["ep"].get_group())
    local = args.moe_experts // ep

    routed: list[list[int]] = []  # per MoE layer: this rank's assignments per expert

    def record_counts(module, inputs) -> None:  # noqa: ANN001
        routed.append(inputs[1].tolist())

    for moe in moe_layers(model):
        moe.experts.register_forward_pre_hook(record_counts)

    def step() -> None:
        tokens = torch.randint(0, 256, (per_rank, SEQ_LEN + 1), generator=gen)
        loss = tp_cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
        loss = loss + sum(m.aux_loss for m in moe_layers(model))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: lazy initialisation of FSDP
    routed.clear()
    with CommCounter() as counter:
        step()
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, routed)  # outside the counter
    me = ep_group_ranks.index(dist.get_rank())
    mine = slice(me * local, (me + 1) * local)  # the experts this rank holds
    sent = [sum(c) - sum(c[mine]) for c in routed]
    received = [sum(sum(every[q][layer][mine]) for q in ep_group_ranks if q != dist.get_rank())
                for layer in range(len(routed))]
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({**counter.summary(), "sent_assignments": sent, "received_assignments": received,
                                      "tokens": per_rank * SEQ_LEN,
                                      "top_k": args.moe_top_k, "hidden": args.hidden, "experts": args.moe_experts,
                                      "layers": args.layers, "ep": ep}), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()


def formulas(r: dict) -> tuple[float, float, float]:
    """(uniform, counted, counts exchange) bytes per rank per step."""
    ep, layers, h = r["ep"], r["layers"], r["hidden"]
    uniform = layers * 4 * r["tokens"] * r["top_k"] * h * 4 * (ep - 1) / ep
    counted = sum(2 * (s + q) * h * 4 for s, q in zip(r["sent_assignments"], r["received_assignments"]))
    counts = layers * r["experts"] * 8 * (ep - 1) / ep
    return uniform + counts, counted + counts, counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/out/expert_parallel.json")
    parser.add_argument("--worker", nargs=argparse.REMAINDER)
    a = parser.parse_args()
    if a.worker is not None:
        worker(a.worker)
        return 0
    rows = []
    print(f"{'layout':<14}{'ranks':>6}{'measured a2a B':>16}{'counted':>16}{'ratio':>7}"
          f"{'uniform':>12}{'ratio':>7}  all-to-all calls")
    for name, (n, overrides) in LAYOUTS.items():
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               __file__, "--worker", *overrides]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            print(f"{name}: failed\n{out.stderr[-2000:]}")
            return 1
        result = json.loads(lines[0][len("RESULT "):])
        uniform, counted, counts = formulas(result)
        a2a = result["by_kind"].get("all_to_all", {"calls": 0, "wire_bytes": 0.0})
        measured = a2a["wire_bytes"]
        print(f"{name:<14}{n:>6}{measured:>16,.0f}{counted:>16,.0f}{measured / counted:>7.3f}"
              f"{uniform:>12,.0f}{measured / uniform:>7.3f}  {a2a['calls']}")
        rows.append({"layout": name, "ranks": n, "measured_all_to_all_bytes": measured,
                     "formula_counted_bytes": counted, "formula_uniform_bytes": uniform,
                     "ratio_counted": measured / counted, "ratio_uniform": measured / uniform, **result})
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"benchmark": "expert_parallel", "date": time.strftime("%Y-%m-%d"),
                                       "seq_len": SEQ_LEN, "global_batch": BATCH, "rows": rows}, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
