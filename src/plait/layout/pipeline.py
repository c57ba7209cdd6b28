"""The pipeline as data: the schedule names, which layers each stage holds, which rank runs it,
and how many micro-batches a step sends through. Pure Python over the model's shape, so the
config checks and the planner use it before any worker starts; the rules a pipeline layout must
meet are in `plait.layout.rules`.

A pipeline of `pp_degree` ranks with `pp_virtual_stages` model chunks per rank has
S = pp_degree x pp_virtual_stages stages. Stage s holds a contiguous run of layers, and is run by
rank s % pp_degree ("looped" placement: rank r holds stages r, r + p, r + 2p, ...), which is what
PyTorch's GPipe, 1F1B, interleaved 1F1B and interleaved zero-bubble schedules expect. The first
stage also holds the embedding, the last the final norm and the output head.

Balancing: the layers are cut to minimise the most expensive stage, where the embedding and the
output head count like layers (`part_costs`): with a large vocabulary the first and last stages
then get fewer transformer layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from plait.model.sizes import ModelArgs

# The schedules (PyTorch's GPipe, 1F1B, interleaved 1F1B and interleaved zero-bubble), named once:
# the config's `parallel.pp_schedule` and `Layout.pp_schedule` take this type.
Schedule = Literal["gpipe", "1f1b", "interleaved-1f1b", "zero-bubble"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)
# Schedules that run one model chunk per rank; the others run pp_virtual_stages chunks.
SINGLE_CHUNK_SCHEDULES = ("gpipe", "1f1b")


@dataclass(frozen=True)
class PartCosts:
    """Relative cost of the model's parts, in forward FLOPs per token (see `part_costs`)."""

    embedding: float
    layer: float
    head: float


def part_costs(args: ModelArgs, seq_len: int) -> PartCosts:
    """Forward FLOPs per token of each part, the unit in which stages are balanced.

    - a layer: 2 FLOPs per multiply-add over its weights, plus causal attention scores and their
      weighted sum (2 x 2 x T x hidden, halved by the causal mask);
    - the output head (with the final norm): 2 x hidden x vocabulary, the largest single matmul
      of a small model;
    - the embedding: a lookup costs no FLOPs, but its hidden x vocabulary weights, their gradient
      and optimizer state take memory and time in the optimizer step like a matrix of that size;
      it is counted at its parameter count (half a head's matmul), so a large vocabulary still
      pushes layers off the first stage.
    """
    h, f = args.hidden, args.ffn
    attn_weights = h * args.heads * args.head_dim * 2 + h * args.kv_heads * args.head_dim * 2
    mlp_weights = (3 if args.mlp == "swiglu" else 2) * h * f
    vocab = args.vocab or 0
    layer = 2.0 * (attn_weights + mlp_weights) + 2.0 * seq_len * h
    return PartCosts(embedding=float(h * vocab), layer=layer, head=2.0 * h * vocab)


def split_layers(num_layers: int, num_stages: int, costs: PartCosts) -> list[range]:
    """Contiguous layer ranges, one per stage, each at least one layer, minimising the cost of the
    most expensive stage (ties: the earliest cut that reaches the optimum, so the result is
    deterministic). Dynamic programming over (stages, layers): O(S L^2), trivial for real models."""
    if num_stages < 1 or num_layers < num_stages:
        raise ValueError(f"cannot split {num_layers} layers into {num_stages} stages of at least one layer")

    def stage_cost(first: int, end: int, stage: int) -> float:
        cost = (end - first) * costs.layer
        if stage == 0:
            cost += costs.embedding
        if stage == num_stages - 1:
            cost += costs.head
        return cost

    inf = float("inf")
    # best[s][i]: the lowest max-cost of putting layers [0, i) into stages 0..s-1; cut[s][i] the start of stage s-1.
    best = [[inf] * (num_layers + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (num_layers + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for i in range(s, num_layers - (num_stages - s) + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], stage_cost(j, i, s - 1))
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    ranges: list[range] = []
    end = num_layers
    for s in range(num_stages, 0, -1):
        start = cut[s][end]
        ranges.append(range(start, end))
        end = start
    return ranges[::-1]


@dataclass(frozen=True)
class PipelinePlan:
    """Stages of the pipeline and their placement on the `pp` axis."""

    pp_degree: int
    virtual_stages: int
    layers_of_stage: tuple[range, ...]

    @property
    def num_stages(self) -> int:
        return len(self.layers_of_stage)

    def stages_of_rank(self, pp_rank: int) -> list[int]:
        """The stage indices pipeline rank `pp_rank` runs, in order (looped placement)."""
        return list(range(pp_rank, self.num_stages, self.pp_degree))

    def describe(self) -> str:
        parts = [f"stage {s} (rank {s % self.pp_degree}): layers {r.start}-{r.stop - 1}" for s, r in enumerate(self.layers_of_stage)]
        return "; ".join(parts)


def build_pipeline_plan(args: ModelArgs, seq_len: int, pp_degree: int, virtual_stages: int) -> PipelinePlan:
    stages = pp_degree * virtual_stages
    ranges = split_layers(args.layers, stages, part_costs(args, seq_len))
    return PipelinePlan(pp_degree=pp_degree, virtual_stages=virtual_stages, layers_of_stage=tuple(ranges))


def pipeline_microbatches(pp_microbatches: int, per_rank_sequences: int, micro_batch_size: int, pp_degree: int = 1) -> int:
    """Micro-batches per step through the pipeline on one data-parallel rank: `pp_microbatches`
    when set, else the rank's sequences / train.micro_batch_size (one pipeline micro-batch per
    train micro-batch, the same split a run without pipeline makes). When that leaves fewer
    micro-batches than stages (a config written for one process, where one micro-batch is the
    fastest), the derived count rises to the smallest multiple of `pp_degree` that divides the
    rank's sequences: every schedule then fills its pipeline, and the step's tokens are unchanged."""
    if pp_microbatches > 0:
        return pp_microbatches
    m = max(1, per_rank_sequences // max(1, micro_batch_size))
    if m < pp_degree:
        fits = [d for d in range(pp_degree, per_rank_sequences + 1, pp_degree) if per_rank_sequences % d == 0]
        m = fits[0] if fits else m
    return m
