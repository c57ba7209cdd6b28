"""Parameter counts and training FLOPs per token, computed from the shape alone (no tensors).

FLOPs follow the convention of PAPERS.md (PaLM / Megatron MFU): a matmul of an m x n weight costs
2mn FLOPs per token forward and twice that backward, so 6 x (matmul parameters) per token, plus
attention scores and values: 12 * layers * hidden * seq_len per token (forward + backward, causal
masking not discounted, as the papers count it). The input embedding is a lookup, not a matmul,
so its parameters are not in the 6N term; a tied output head is (its matmul is real).

Mixture of experts: the parameter count holds every expert (plus the router); FLOPs count only
the top-k experts a token goes through (plus the router), i.e. the active parameters. Capacity
drops are not discounted (the planned cost of a step, not of one batch's routing).
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.model.sizes import ModelArgs


@dataclass(frozen=True)
class ParamCount:
    total: int
    embedding: int
    output: int  # 0 when tied to the embedding
    per_layer: int
    norms: int


def mlp_params(args: ModelArgs, active: bool = False) -> int:
    """One block's MLP weights: dense, or MoE with all experts (or, `active`, the top-k a token
    uses) plus the router."""
    d = args.hidden
    if args.moe_experts > 0:
        experts = args.moe_top_k if active else args.moe_experts
        return experts * 3 * d * args.moe_ffn + d * args.moe_experts
    return 3 * d * args.ffn if args.mlp == "swiglu" else 2 * d * args.ffn


def count_params(args: ModelArgs) -> ParamCount:
    assert args.vocab is not None, "resolve the vocabulary before counting"
    d, e = args.hidden, args.head_dim
    attn = d * args.heads * e * 2 + d * args.kv_heads * e * 2
    mlp = mlp_params(args)
    per_layer_norms = 2 * d
    per_layer = attn + mlp + per_layer_norms
    embedding = args.vocab * d
    output = 0 if args.tie_embeddings else args.vocab * d
    norms = args.layers * per_layer_norms + d
    total = embedding + output + args.layers * per_layer + d
    return ParamCount(total=total, embedding=embedding, output=output, per_layer=per_layer, norms=norms)


def matmul_params(args: ModelArgs) -> int:
    """Parameters multiplied every token: attention and MLP weights (for MoE the active experts
    and the router) plus the output head."""
    pc = count_params(args)
    head = args.vocab * args.hidden  # tied or not, the head is one V x D matmul
    inactive = mlp_params(args) - mlp_params(args, active=True)
    return args.layers * (pc.per_layer - 2 * args.hidden - inactive) + head


def flops_per_token(args: ModelArgs, seq_len: int, recompute: bool = False) -> float:
    """Training FLOPs per token (forward + backward). With `recompute` (full activation
    checkpointing) the forward runs twice: 8N instead of 6N, as Megatron's 96 vs 72 factor."""
    n = matmul_params(args)
    attention = 12 * args.layers * args.hidden * seq_len
    factor = 8 if recompute else 6
    return factor * n + attention * factor / 6
