"""The planner's predictions next to published throughput of large training runs.

For each published row: the model shape, the hardware and the layout the authors state, turned
into a `Workload`, a `Layout` and a `Cluster` (`cluster_from_flags` with the table's default
links and matmul efficiency), then `estimate_time` and `estimate_memory` called directly (no
search, no per-row tuning). Prints one table and writes JSON.

    python bench/planner_published.py
    python bench/planner_published.py --json bench/out/planner_published.json

Sources (every row names its own):

- Megatron-LM, Narayanan et al., "Efficient Large-Scale Language Model Training on GPU Clusters
  Using Megatron-LM", SC 2021 (arXiv:2104.04473), Table 1: GPT models of 1.7B to 1T on Selene
  (DGX A100 80GB, 8 GPUs per node, 8 x 200 Gb/s HDR InfiniBand), sequence 2048, vocabulary 51,200,
  mixed precision, activation recomputation. Micro-batch sizes and virtual pipeline stages are
  not in the table; they come from the paper's own launch script, examples/sc21/run_table_1.sh of
  github.com/NVIDIA/Megatron-LM (MBS, --num-layers-per-virtual-pipeline-stage).
  The table's "achieved teraFLOP/s per GPU" counts the paper's Eq. 3, F = 96 B s l h^2 (1 +
  s/(6h) + V/(16 l h)) per iteration, which includes the recomputed forward; it is turned into
  tokens/s per GPU with that same formula, so predicted and published are compared in tokens/s.
- TorchTitan, github.com/pytorch/torchtitan docs/performance.md. (a) The December 2024 version
  (torch 1963fc8, torchtitan 9dec370): Llama 3.1 8B with FSDP on 8 and 128 H100s (Grand Teton: 8
  H100 per host on NVLink, 400 Gb/s RDMA per GPU, 96 GB HBM2e at a 500 W power limit), tables 1
  and 3, the rows without Float8. (b) The earlier version: Llama 3.1 405B with FSDP 16 x TP 8 on
  128 H100 (95 GB, HBM2e, lower TDP), no Float8; Llama 3 8B and 70B with FSDP on 64 A100 80GB.
  Sequence length 8192 (torchtitan's Llama 3 configs; the published MFU of each row is
  reproduced by 8192 and not by other lengths, see the `implied_mfu` column of the JSON).

How the rows map onto plait's vocabulary:

- GPT (Megatron): `ModelArgs(layers, hidden, heads, kv_heads=heads, vocab=51200, mlp="gelu",
  untied)`; plait's block differs in details that do not change the matmul FLOPs (RoPE instead
  of learned positions, RMSNorm instead of LayerNorm, no biases). Megatron's own GPT ties the
  output head to the embedding; untying only adds parameters (the head's matmul is counted
  either way), which plait's pipeline needs (it refuses tied embeddings with pp > 1).
- Llama (TorchTitan): plait's named sizes `8b`, `70b`, `405b` (the same shapes).
- FSDP -> ZeRO-3 over dp_shard with FSDP mixed precision (bf16 compute, fp32 gradient
  reduction, as torchtitan and plait's own sharded bf16 plans run); FSDP + TP -> ZeRO-3 with tp;
  Megatron's data parallelism (torch DDP or its own "local" DDP, one all-reduce of fp32 gradients
  per step) -> zero_stage 0 (bf16 under autocast).
  NOTE: plait itself refuses DDP with pp > 1, so the Megatron rows with a pipeline test the time
  model on the published layout, not a layout `plait train` would run (plait would use ZeRO-2/3,
  whose gradient reduce-scatter runs on every micro-batch); the "alternative" column shows that
  layout's prediction too.
- TorchTitan's selective activation checkpointing (per-op or every other layer) has no plait
  equivalent: it is mapped to no checkpointing (selective AC recomputes little; the memory of
  the row is then an upper bound), and full checkpointing is shown as the other bound in the
  "alternative" column; full AC -> activation_checkpointing.
- Megatron's fp16 and TorchTitan's bf16 both run at the bf16 peak (the same rate on A100/H100).
- Float8 rows are left out: the planner plans bf16 matmuls.

Not modelled, and visible in the ratios: kernel efficiency per shape (one matmul_efficiency per
device), the TorchTitan H100s' lower power limit, torch.compile, Megatron's fused kernels and
scatter/gather pipeline sends.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plait.hardware.profile import cluster_from_flags
from plait.model.flops import count_params, flops_per_token
from plait.model.sizes import NAMED_SIZES, ModelArgs
from plait.planner.memory import estimate_memory
from plait.planner.timing import estimate_time
from plait.layout import Layout, Workload

GIB = 2**30
MEGATRON = "Megatron-LM SC21 (arXiv:2104.04473) Table 1; MBS/virtual stages: NVIDIA/Megatron-LM examples/sc21/run_table_1.sh"
TITAN_NEW = "pytorch/torchtitan docs/performance.md (Dec 2024, torchtitan 9dec370)"
TITAN_OLD = "pytorch/torchtitan docs/performance.md (earlier version: 405B on 128 H100, Llama 3 on 64 A100)"


@dataclass
class Row:
    name: str
    source: str
    model: ModelArgs
    gpu: str
    gpus: int
    seq_len: int
    global_batch: int  # sequences
    layout: Layout
    published: float  # tokens/s/GPU, or TFLOP/s/GPU when `unit` says so
    unit: str = "tokens/s/GPU"  # or "TFLOP/s/GPU (Megatron Eq. 3)"
    published_mfu: float | None = None
    note: str = ""
    # Other layouts worth a prediction: what `plait train` would run instead of the published
    # layout, or the other bound of a mapping that has no exact plait equivalent.
    alternatives: dict[str, Layout] = field(default_factory=dict)


def gpt(layers: int, hidden: int, heads: int) -> ModelArgs:
    return ModelArgs(layers=layers, hidden=hidden, heads=heads, kv_heads=heads, vocab=51200, mlp="gelu", tie_embeddings=False)


def megatron_flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Megatron SC21 Eq. 3 divided by B s: 96 l h^2 (1 + s/(6h) + V/(16 l h)), with recompute."""
    l, h, v = args.layers, args.hidden, args.vocab
    return 96 * l * h * h * (1 + seq_len / (6 * h) + v / (16 * l * h))


def megatron_rows() -> list[Row]:
    # (params B, heads, hidden, layers, t, p, GPUs, batch, TFLOP/s, MBS, virtual stages)
    table = [
        ("1.7B", 24, 2304, 24, 1, 1, 32, 512, 137, 16, 1),
        ("3.6B", 32, 3072, 30, 2, 1, 64, 512, 138, 16, 1),
        ("7.5B", 32, 4096, 36, 4, 1, 128, 512, 142, 16, 1),
        ("18.4B", 48, 6144, 40, 8, 1, 256, 1024, 135, 8, 1),
        ("39.1B", 64, 8192, 48, 8, 2, 512, 1536, 138, 4, 1),
        ("76.1B", 80, 10240, 60, 8, 4, 1024, 1792, 140, 2, 3),  # 5 layers per virtual stage
        ("145.6B", 96, 12288, 80, 8, 8, 1536, 2304, 148, 2, 2),  # 5
        ("310.1B", 128, 16384, 96, 8, 16, 1920, 2160, 155, 1, 2),  # 3
        ("529.6B", 128, 20480, 105, 8, 35, 2520, 2520, 163, 1, 3),  # 1
        ("1008B", 160, 25600, 128, 8, 64, 3072, 3072, 163, 1, 1),
    ]
    rows = []
    for name, heads, hidden, layers, t, p, n, batch, tflops, mbs, v in table:
        d = n // (t * p)
        schedule = "1f1b" if v == 1 else "interleaved-1f1b"
        # Data parallelism without ZeRO runs over dp_replicate in plait (zero_stage 0 needs
        # dp_shard = 1); with pp > 1 plait needs ZeRO-2/3 over dp_shard instead.
        layout = Layout(pp=p, dp_replicate=d, tp=t, zero_stage=0, micro_batch_size=mbs, activation_checkpointing=True,
                        pp_schedule=schedule, pp_virtual_stages=v)
        alternatives = {"ZeRO-2, as plait runs pp": layout.replace(dp_replicate=1, dp_shard=d, zero_stage=2,
                                                                  mixed_precision=True)} if p > 1 else {}
        rows.append(Row(f"GPT {name}", MEGATRON, gpt(layers, hidden, heads), "a100-80", n, 2048, batch, layout,
                        float(tflops), unit="TFLOP/s/GPU (Megatron Eq. 3)", alternatives=alternatives,
                        note="DDP, full recompute" + (f", interleaved v={v}" if v > 1 else "")))
    return rows


def titan_rows() -> list[Row]:
    n = NAMED_SIZES
    rows = []
    for gpus, batch, eager, compiled, table in ((8, 16, 5762, 6667, "table 1"), (128, 256, 5605, 6514, "table 3")):
        layout = Layout(dp_shard=gpus, zero_stage=3, mixed_precision=True, micro_batch_size=2, activation_checkpointing=False)
        for label, value in (("eager", eager), ("compile", compiled)):
            rows.append(Row(f"Llama3.1 8B {label}", f"{TITAN_NEW}, {table}", n["8b"], "h100", gpus, 8192, batch,
                            layout, float(value), note="FSDP, selective AC -> none; 500 W H100s",
                            alternatives={"full AC": layout.replace(activation_checkpointing=True)}))
    rows.append(Row("Llama3.1 405B", TITAN_OLD, n["405b"], "h100", 128, 8192, 32,
                    Layout(dp_shard=16, tp=8, zero_stage=3, mixed_precision=True, sequence_parallel=True,
                           micro_batch_size=2, activation_checkpointing=True),
                    109.0, published_mfu=0.290, note="FSDP 16 x TP 8 (+SP, torchtitan's TP plan), full AC; 95 GB lower-TDP H100s"))
    titan_8b = Layout(dp_shard=64, zero_stage=3, mixed_precision=True, micro_batch_size=1, activation_checkpointing=False)
    rows.append(Row("Llama3 8B", TITAN_OLD, n["8b"], "a100-80", 64, 8192, 64, titan_8b, 2973.0, published_mfu=0.582,
                    note="FSDP, selective op AC -> none",
                    alternatives={"full AC": titan_8b.replace(activation_checkpointing=True)}))
    rows.append(Row("Llama3 70B", TITAN_OLD, n["70b"], "a100-80", 64, 8192, 64,
                    Layout(dp_shard=64, zero_stage=3, mixed_precision=True, micro_batch_size=1, activation_checkpointing=True),
                    331.0, published_mfu=0.517, note="FSDP, full AC"))
    return rows


def predict(row: Row, layout: Layout) -> dict[str, Any]:
    cluster = cluster_from_flags(row.gpus, None, row.gpu)
    assert layout.world == row.gpus, (row.name, layout.short(), layout.world, row.gpus)
    workload = Workload(model=row.model, seq_len=row.seq_len, global_batch_sequences=row.global_batch)
    time = estimate_time(workload, layout, cluster)
    memory = estimate_memory(workload, layout)
    tokens_per_s = workload.global_batch_tokens / time.step_s / row.gpus
    return {
        "tokens_per_s_per_gpu": tokens_per_s,
        "step_s": time.step_s,
        "time_parts_s": dict(time.parts),
        "memory_bytes_per_gpu": memory.total,
        "memory_parts": dict(memory.parts),
        "fits": memory.total <= cluster.device.memory_bytes,
        "device_memory_bytes": cluster.device.memory_bytes,
    }


def evaluate(row: Row) -> dict[str, Any]:
    pred = predict(row, row.layout)
    model_fpt = flops_per_token(row.model, row.seq_len)  # 6N + attention, no recompute (MFU)
    peak = cluster_from_flags(row.gpus, None, row.gpu).device.peak_flops["bf16"]
    if row.unit.startswith("TFLOP"):
        per_token = megatron_flops_per_token(row.model, row.seq_len)
        published_tokens = row.published * 1e12 / per_token
        predicted_published_unit = pred["tokens_per_s_per_gpu"] * per_token / 1e12
    else:
        published_tokens = row.published
        predicted_published_unit = pred["tokens_per_s_per_gpu"]
    out = {
        "row": row.name, "source": row.source, "gpu": row.gpu, "gpus": row.gpus, "seq_len": row.seq_len,
        "global_batch_sequences": row.global_batch, "params": count_params(row.model).total,
        "layout": row.layout.short(), "parallel": row.layout.parallel_section(), "train": row.layout.train_section(),
        "note": row.note, "unit": row.unit, "published": row.published, "published_mfu": row.published_mfu,
        "published_tokens_per_s_per_gpu": published_tokens,
        "implied_mfu": published_tokens * model_fpt / peak,
        "predicted": predicted_published_unit,
        "predicted_mfu": pred["tokens_per_s_per_gpu"] * model_fpt / peak,
        "ratio": pred["tokens_per_s_per_gpu"] / published_tokens,
        **{f"predicted_{k}": v for k, v in pred.items()},
    }
    out["alternatives"] = {}
    for label, layout in row.alternatives.items():
        alt = predict(row, layout)
        out["alternatives"][label] = {"layout": layout.short(), "ratio": alt["tokens_per_s_per_gpu"] / published_tokens, **alt}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=Path("bench/out/planner_published.json"))
    args = parser.parse_args()
    results = [evaluate(row) for row in megatron_rows() + titan_rows()]
    header = (f"{'row':<20} {'hardware':<14} {'layout':<44} {'published':>10} {'predicted':>10} {'ratio':>6} "
              f"{'mem GiB':>8} {'fits':>5}  alternative: ratio, mem GiB")
    print(header)
    print("-" * len(header))
    for r in results:
        alt_text = "; ".join(f"{label}: {a['ratio']:.2f}, {a['memory_bytes_per_gpu'] / GIB:.1f}"
                             for label, a in r["alternatives"].items())
        unit = " TF" if r["unit"].startswith("TFLOP") else " t/s"
        print(f"{r['row']:<20} {r['gpus']:>4} x {r['gpu']:<7} {r['layout']:<44} {r['published']:>7.0f}{unit:<3} "
              f"{r['predicted']:>7.0f}{unit:<3} {r['ratio']:>6.2f} {r['predicted_memory_bytes_per_gpu'] / GIB:>8.1f} "
              f"{'yes' if r['predicted_fits'] else 'no':>5}  {alt_text}")
    ratios = [r["ratio"] for r in results]
    print(f"\nratio predicted/published (tokens/s/GPU): min {min(ratios):.2f}, max {max(ratios):.2f}, "
          f"geometric mean {_geomean(ratios):.2f} over {len(ratios)} rows")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")


def _geomean(xs: list[float]) -> float:
    product = 1.0
    for x in xs:
        product *= x
    return product ** (1 / len(xs))


if __name__ == "__main__":
    main()
