"""The pipeline as data: which layers each stage holds, which rank runs it, and the rules a
pipeline config must meet. Pure Python over the model's shape (no torch.distributed), so the
config checks can use it before any worker starts.

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

from plait.model.sizes import ModelArgs

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zero-bubble")
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


def pipeline_problems(
    args: ModelArgs,
    pp_degree: int,
    schedule: str,
    pp_microbatches: int,
    virtual_stages: int,
    per_rank_sequences: int | None,
    micro_batch_size: int,
) -> list[str]:
    """What keeps this pipeline config from running, each with the field, the value and the fix.
    `per_rank_sequences` (sequences per step of one data-parallel rank) is None when the number
    of workers, and so the data-parallel degree, is not known yet."""
    problems: list[str] = []
    if schedule not in SCHEDULES:
        return [f"parallel.pp_schedule = {schedule!r} is not a schedule; use one of {', '.join(SCHEDULES)}"]
    if virtual_stages < 1:
        return [f"parallel.pp_virtual_stages = {virtual_stages} must be at least 1"]
    if pp_microbatches < 0:
        return [f"parallel.pp_microbatches = {pp_microbatches} must be >= 0 (0: derived from train.micro_batch_size)"]
    if schedule in SINGLE_CHUNK_SCHEDULES and virtual_stages != 1:
        problems.append(
            f"parallel.pp_virtual_stages = {virtual_stages} needs an interleaved schedule, but parallel.pp_schedule = "
            f"{schedule!r} runs one chunk per rank; set parallel.pp_schedule = \"interleaved-1f1b\" or pp_virtual_stages = 1"
        )
    if schedule == "interleaved-1f1b" and virtual_stages < 2:
        problems.append(
            "parallel.pp_schedule = \"interleaved-1f1b\" needs parallel.pp_virtual_stages >= 2 (model chunks per rank); "
            "set parallel.pp_virtual_stages = 2, or parallel.pp_schedule = \"1f1b\""
        )
    stages = pp_degree * virtual_stages
    if args.layers < stages:
        problems.append(
            f"model.layers = {args.layers} cannot fill parallel.pp_degree x pp_virtual_stages = {pp_degree} x "
            f"{virtual_stages} = {stages} stages of at least one layer; use model.layers >= {stages} or fewer stages"
        )
    if args.tie_embeddings:
        problems.append(
            "model.tie_embeddings = true with parallel.pp_degree > 1: the first and last pipeline stages would each "
            "need the shared embedding matrix, which plait does not yet keep in sync across stages; set "
            "model.tie_embeddings = false (or pick a model without tied embeddings)"
        )
    if per_rank_sequences is None:
        return problems
    m = pipeline_microbatches(pp_microbatches, per_rank_sequences, micro_batch_size, pp_degree)
    if per_rank_sequences % m:
        options = [d for d in range(1, per_rank_sequences + 1) if per_rank_sequences % d == 0 and d >= pp_degree]
        problems.append(
            f"parallel.pp_microbatches = {m} does not divide the {per_rank_sequences} sequences of a data-parallel "
            f"rank's step; pick one of {options}"
        )
    elif schedule != "gpipe" and m < pp_degree:
        # 1F1B needs a micro-batch for every stage to fill its steady phase (PyTorch refuses fewer),
        # and the interleaved schedules order their rounds by pp_degree micro-batches.
        problems.append(
            f"parallel.pp_schedule = {schedule!r} needs at least parallel.pp_degree = {pp_degree} micro-batches, "
            f"but a step has {m} (parallel.pp_microbatches = {pp_microbatches}, {per_rank_sequences} sequences per "
            f"data-parallel rank); set parallel.pp_microbatches = {pp_degree} or more (dividing {per_rank_sequences}), "
            f"or lower train.micro_batch_size"
        )
    elif schedule not in SINGLE_CHUNK_SCHEDULES and m % (m // pp_degree):
        # PyTorch's interleaved schedules run m // pp_degree rounds of equal size.
        problems.append(
            f"parallel.pp_schedule = {schedule!r} runs micro-batches in rounds of parallel.pp_degree = {pp_degree}: "
            f"parallel.pp_microbatches = {m} must be a multiple of the {m // pp_degree} rounds; use a multiple of "
            f"{pp_degree}"
        )
    return problems
