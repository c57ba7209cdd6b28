"""Megatron tensor parallelism and sequence parallelism over one mesh axis, with DTensor.

What is here:
- the layout as data: `TENSOR_PARALLEL_PLAN` and `SEQUENCE_PARALLEL_PLAN` map module-name
  patterns ("layers.*.attn.q_proj") to style names, and `STYLES` says what each name means in
  `torch.distributed.tensor.parallel` terms;
- `apply_tensor_parallel`, which turns the table into `parallelize_module` plans (one per block,
  one for the top-level modules) and applies them in place to the unmodified model;
- `loss_parallel_context` and `tp_cross_entropy`, the loss on vocabulary-sharded logits;

The layout (Megatron-LM, Shoeybi et al. 2019; sequence parallelism, Korthikanti et al. 2022):
q/k/v/gate/up are split by output features (column-wise: whole heads, whole MLP columns per rank),
o/down by input features (row-wise), so each attention and MLP sub-block costs one all-reduce
forward and one backward. The embedding is split by vocabulary rows and the output head by
vocabulary columns: logits stay sharded on V and the cross-entropy is computed without ever
gathering the full vocabulary (`loss_parallel`).

With sequence parallelism the norms and the residual stream are split along the sequence:
each all-reduce becomes a reduce-scatter (after o/down) and an all-gather (before q/k/v and
gate/up), the same bytes, but norm activations and the residual take 1/tp of the memory.

How a training step must call the loss (the backward of `loss_parallel` is a custom rule that is
only active inside the context, so `backward()` must run inside it too):

    with loss_parallel_context(tp_degree > 1):
        logits_BTV = model(tokens_BT)                # may also be outside the context
        loss = tp_cross_entropy(logits_BTV, targets_BT)
        (loss / accumulation_steps).backward()

`loss_parallel()` cannot be nested (leaving the inner one switches the rule off for the outer),
so take the context once per micro-batch, around both the loss and its backward.

Shape legend: B batch, T sequence, D hidden, V vocabulary, N = B*T tokens.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from plait.layout.rules import tensor_parallel_problem
from plait.model.sizes import ModelArgs

# The style names of the tables below. Each is built fresh per module: a ParallelStyle holds
# no per-module state today, but nothing promises that.
STYLES: dict[str, Callable[[], ParallelStyle]] = {
    # Split by output features; the input arrives whole (replicated) and the output stays local.
    "colwise": lambda: ColwiseParallel(),
    # Split by input features; the partial sums are all-reduced into a whole, replicated output.
    "rowwise": lambda: RowwiseParallel(),
    # RowwiseParallel on nn.Embedding shards the weight's rows, i.e. the vocabulary: each rank
    # looks up the tokens it owns (zeros elsewhere) and the all-reduce completes the rows.
    "vocab_embedding": lambda: RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
    # Logits stay a DTensor sharded on V (use_local_output=False) for `loss_parallel`.
    "vocab_head": lambda: ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
    # --- sequence parallel variants ---
    # Norm weights are replicated; the norm runs on this rank's slice of the sequence.
    "sequence_norm": lambda: SequenceParallel(),
    # One all-gather of the sequence for the whole sub-block rather than one per projection
    # (ColwiseParallel(input_layouts=Shard(1)) on q, k and v would gather three times).
    # The attention is called as attn(x_BTD, cos_TE, sin_TE, cache): only x is a DTensor.
    "gather_sequence_attn": lambda: PrepareModuleInput(
        input_layouts=(Shard(1), None, None, None), desired_input_layouts=(Replicate(), None, None, None)
    ),
    "gather_sequence": lambda: PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
    # Plain TP: mark the sub-block's (replicated) input as one DTensor, so the input gradients of
    # q, k and v (gate and up) add up as partial sums first and are all-reduced once, as
    # Megatron's fused projections do, instead of once per projection.
    "replicate_attn": lambda: PrepareModuleInput(
        input_layouts=(Replicate(), None, None, None), desired_input_layouts=(Replicate(), None, None, None)
    ),
    "replicate_input": lambda: PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),)),
    # The all-reduce becomes a reduce-scatter onto sequence slices. The output stays a DTensor
    # because the residual stream is a DTensor under sequence parallelism (see the embedding).
    "rowwise_to_sequence": lambda: RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
    # The embedding's output must stay a DTensor: Transformer.forward reads T from its shape to
    # build the rotary positions, and a local tensor would report T/tp (wrong cos/sin, and a
    # shape mismatch once attention sees the gathered sequence). A DTensor reports the global T.
    "vocab_embedding_to_sequence": lambda: RowwiseParallel(
        input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False
    ),
    "vocab_head_from_sequence": lambda: ColwiseParallel(
        input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False
    ),
}

# Plain tensor parallelism. Patterns match module names segment by segment ("*" is one segment);
# a pattern that matches nothing is skipped (gate_proj is absent from the GELU MLP).
TENSOR_PARALLEL_PLAN: dict[str, str] = {
    "embed": "vocab_embedding",
    "layers.*.attn": "replicate_attn",
    "layers.*.attn.q_proj": "colwise",
    "layers.*.attn.k_proj": "colwise",
    "layers.*.attn.v_proj": "colwise",
    "layers.*.attn.o_proj": "rowwise",
    "layers.*.mlp": "replicate_input",
    "layers.*.mlp.gate_proj": "colwise",
    "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise",
    "output": "vocab_head",
}

# Tensor + sequence parallelism: between the row-wise outputs and the column-wise inputs the
# activations are split along T (dim 1).
SEQUENCE_PARALLEL_PLAN: dict[str, str] = {
    "embed": "vocab_embedding_to_sequence",
    "layers.*.attn_norm": "sequence_norm",
    "layers.*.attn": "gather_sequence_attn",
    "layers.*.attn.q_proj": "colwise",
    "layers.*.attn.k_proj": "colwise",
    "layers.*.attn.v_proj": "colwise",
    "layers.*.attn.o_proj": "rowwise_to_sequence",
    "layers.*.mlp_norm": "sequence_norm",
    "layers.*.mlp": "gather_sequence",
    "layers.*.mlp.gate_proj": "colwise",
    "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise_to_sequence",
    "norm": "sequence_norm",
    "output": "vocab_head_from_sequence",
}


def tensor_parallel_plan(sequence_parallel: bool) -> dict[str, str]:
    """The layout table (module-name pattern -> style name) for TP, or TP with SP."""
    return dict(SEQUENCE_PARALLEL_PLAN if sequence_parallel else TENSOR_PARALLEL_PLAN)


def _matches(name: str, pattern: str) -> bool:
    parts, pattern_parts = name.split("."), pattern.split(".")
    return len(parts) == len(pattern_parts) and all(
        fnmatch.fnmatchcase(part, want) for part, want in zip(parts, pattern_parts)
    )


def build_parallelize_plan(module: nn.Module, table: Mapping[str, str], prefix: str = "") -> dict[str, ParallelStyle]:
    """The `parallelize_module` plan for `module`: its submodule names -> styles.

    `prefix` is the module's own name in the model ("layers.3."), so that the table's full-name
    patterns apply to a block taken on its own.
    """
    plan: dict[str, ParallelStyle] = {}
    for pattern, style in table.items():
        if style not in STYLES:
            raise ValueError(f"tensor-parallel plan: {pattern!r} has unknown style {style!r}; known: {sorted(STYLES)}")
        for name, _ in module.named_modules():
            if name and _matches(prefix + name, pattern):
                plan[name] = STYLES[style]()
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shard `model` (a `plait.model.Transformer`) in place over the 1-D mesh `tp_mesh`.

    Every rank must hold the same initial weights (same seed): the shards are cut from rank 0's
    copy. After this, the logits are a DTensor sharded on V: compute the loss with
    `tp_cross_entropy` inside `loss_parallel_context(True)`, backward included.

    Tied embeddings are supported: both the embedding (vocab-parallel rows) and the output head
    (column-wise) shard the (V, D) weight as Shard(0), so the two modules can share one DTensor
    parameter, and its gradient sums both uses as in the unsharded model.
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"apply_tensor_parallel needs a 1-D mesh (e.g. mesh['tp']), got {tp_mesh.ndim} dimensions")
    args: ModelArgs = model.args
    problem = tensor_parallel_problem(args, tp_mesh.size())  # validated before; for callers by hand
    if problem is not None:
        raise ValueError(problem.message)
    table = tensor_parallel_plan(sequence_parallel)

    # Blocks one by one (a pipeline stage may hold only some of them, keyed by their global index).
    for index, block in model.layers.items():
        parallelize_module(block, tp_mesh, build_parallelize_plan(block, table, prefix=f"layers.{index}."))
    top_table = {pattern: style for pattern, style in table.items() if not pattern.startswith("layers.")}
    top_plan = {
        name: style for name, style in build_parallelize_plan(model, top_table).items() if not name.startswith("layers.")
    }
    parallelize_module(model, tp_mesh, top_plan)

    tied = args.tie_embeddings and getattr(model, "embed", None) is not None and getattr(model, "output", None) is not None
    if tied:
        # parallelize_module registered a new Parameter on each module, which broke the tie.
        embed_w, output_w = model.embed.weight, model.output.weight
        assert embed_w.placements == output_w.placements == (Shard(0),), (embed_w.placements, output_w.placements)
        model.output.weight = embed_w
    _keep_gradient_placements(model)


def _keep_gradient_placements(model: nn.Module) -> None:
    """Make every DTensor gradient arrive with its parameter's placements.

    DTensor's autograd leaves two gradients in another layout than their parameter:
    - the vocab-parallel embedding (Shard(0)) gets a Replicate gradient: the backward of the
      sharded lookup is computed as a whole (V, D) on every rank. Redistributing to Shard(0) is a
      local slice (no communication) and keeps optimizer state and clipping on 1/tp of the rows.
    - norm weights under sequence parallelism (Replicate) get a Partial(sum) gradient: each rank
      saw only its slice of the sequence. Reducing it here, once per backward (an all-reduce of
      D numbers), rather than letting every optimizer op on the Partial gradient trigger its own.
    The hook runs on the gradient before accumulation, so accumulated .grad keeps the layout too.
    """

    def hook(param: DTensor) -> Callable[[torch.Tensor], torch.Tensor]:
        def to_param_layout(grad: torch.Tensor) -> torch.Tensor:
            if isinstance(grad, DTensor) and grad.placements != param.placements:
                return grad.redistribute(param.device_mesh, param.placements)
            return grad

        return to_param_layout

    for param in model.parameters():
        if isinstance(param, DTensor) and param.requires_grad:
            param.register_hook(hook(param))


def loss_parallel_context(tp_enabled: bool) -> AbstractContextManager[None]:
    """`loss_parallel()` when tensor parallelism is on, else a context that does nothing.

    Enter it once per micro-batch around both `tp_cross_entropy` and `backward()`; do not nest it.
    """
    return loss_parallel() if tp_enabled else contextlib.nullcontext()


def tp_cross_entropy(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32, for plain logits or logits sharded on V.

    With a DTensor (Shard(-1) over the TP axis) this must run inside `loss_parallel_context(True)`
    and so must the backward: each rank then computes its slice's max and sum-exp and the ranks
    all-reduce those (N)-sized vectors, never the (N, V) logits. Returns a plain scalar tensor
    (the local value of the replicated loss) so callers can log, scale and all-reduce it as in
    the unsharded case; its backward re-enters the DTensor graph.
    """
    # flatten(0, 1) keeps the vocabulary sharding: (B, T, V) Shard(2) -> (N, V) Shard(1).
    logits_NV = logits_BTV.float().flatten(0, 1)
    loss = F.cross_entropy(logits_NV, targets_BT.flatten())
    if isinstance(loss, DTensor):
        loss = loss.to_local()
    return loss


@torch.no_grad()
def clip_grad_norm_mixed(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global gradient-norm clipping when gradients mix DTensors (sharded or replicated on the
    tp axis) and plain tensors, which torch's clip_grad_norm_ refuses to stack together. Each
    gradient's norm is made whole first (a reduction over its mesh), then combined."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norms = []
    for g in grads:
        n = torch.linalg.vector_norm(g, 2.0, dtype=torch.float32)
        norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        # Scaling the local piece scales the whole, whatever its placement.
        (g._local_tensor if isinstance(g, DTensor) else g).mul_(coef.to(g.dtype))
    return total
