"""A Llama-style decoder: RMSNorm, rotary embeddings (optional Llama-3 scaling), grouped-query
attention through `scaled_dot_product_attention`, and a SwiGLU or GELU MLP or a mixture of
SwiGLU experts (`plait.model.moe`).

The model knows nothing of distribution (no torch.distributed here): parallelisms are applied to
it from outside (context parallelism swaps `Attention.attention_fn` and passes global positions). It is built on the meta device and then materialised with `materialize`, which
initialises every parameter from its own generator seeded by (seed, parameter name), so a
parameter gets the same values whichever rank or pipeline stage holds it.

Parameter names follow Hugging Face's Llama (q_proj, gate_proj, ...) so conversion is a renaming.

Shape legend: B batch, T sequence (this call), S keys (cache + this call), D hidden,
H query heads, K key/value heads, E head dim, F MLP hidden, V vocabulary.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from plait.model.moe import MoE
from plait.model.sizes import ModelArgs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the input dtype (as Llama does): the mean of squares of
        # bf16 activations loses too much precision.
        x32 = x_BTD.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x_BTD.dtype)


def rope_inv_freq(args: ModelArgs, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with Llama-3's scaling when it is on."""
    e = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, e, 2, dtype=torch.float64, device=device) / e))
    if args.rope_scaling_factor > 0:
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        low_wavelen = args.rope_original_max_len / args.rope_low_freq_factor
        high_wavelen = args.rope_original_max_len / args.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (args.rope_original_max_len / wavelen - args.rope_low_freq_factor) / (
            args.rope_high_freq_factor - args.rope_low_freq_factor
        )
        blended = (1 - smooth) * inv_freq / args.rope_scaling_factor + smooth * inv_freq
        inv_freq = torch.where(
            wavelen > low_wavelen,
            inv_freq / args.rope_scaling_factor,
            torch.where(wavelen < high_wavelen, inv_freq, blended),
        )
    return inv_freq.float()


def rope_cos_sin(inv_freq: torch.Tensor, positions_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (T, E), in fp32, for explicit (global) positions."""
    freqs_TE2 = positions_T.float()[:, None] * inv_freq[None, :]
    emb_TE = torch.cat([freqs_TE2, freqs_TE2], dim=-1)
    return emb_TE.cos(), emb_TE.sin()


def apply_rope(x_BHTE: torch.Tensor, cos_TE: torch.Tensor, sin_TE: torch.Tensor) -> torch.Tensor:
    # The "rotate half" convention of Hugging Face's Llama: pairs are (i, i + E/2).
    half = x_BHTE.shape[-1] // 2
    rotated = torch.cat([-x_BHTE[..., half:], x_BHTE[..., :half]], dim=-1)
    out = x_BHTE.float() * cos_TE + rotated.float() * sin_TE
    return out.to(x_BHTE.dtype)


@dataclass
class LayerCache:
    """Keys and values of one layer for incremental decoding; `length` entries are filled."""

    k_BKSE: torch.Tensor
    v_BKSE: torch.Tensor
    length: int = 0


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = args.heads, args.kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.hidden, args.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(args.hidden, args.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(args.hidden, args.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(args.heads * self.head_dim, args.hidden, bias=False)
        # Swapped in from outside for a sequence spread over several ranks (context parallelism):
        # (q_BHTE, k_BKTE, v_BKTE) -> causal out_BHTE. None: local attention below.
        self.attention_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def forward(
        self, x_BTD: torch.Tensor, cos_TE: torch.Tensor, sin_TE: torch.Tensor, cache: LayerCache | None = None
    ) -> torch.Tensor:
        b, t, _ = x_BTD.shape
        # Head counts come from the weights, not the config, so that a tensor-parallel shard
        # (fewer local heads) runs this same code.
        q_BHTE = self.q_proj(x_BTD).view(b, t, -1, self.head_dim).transpose(1, 2)
        k_BKTE = self.k_proj(x_BTD).view(b, t, -1, self.head_dim).transpose(1, 2)
        v_BKTE = self.v_proj(x_BTD).view(b, t, -1, self.head_dim).transpose(1, 2)
        q_BHTE = apply_rope(q_BHTE, cos_TE, sin_TE)
        k_BKTE = apply_rope(k_BKTE, cos_TE, sin_TE)
        if self.attention_fn is not None and cache is None:
            out_BHTE = self.attention_fn(q_BHTE, k_BKTE, v_BKTE)
            return self.o_proj(out_BHTE.transpose(1, 2).reshape(b, t, -1))

        causal = True
        mask = None
        if cache is not None:
            start = cache.length
            cache.k_BKSE[:, :, start : start + t] = k_BKTE
            cache.v_BKSE[:, :, start : start + t] = v_BKTE
            cache.length = start + t
            k_BKTE, v_BKTE = cache.k_BKSE[:, :, : start + t], cache.v_BKSE[:, :, : start + t]
            if start > 0:
                # New queries see every cached key and the new ones up to themselves.
                causal = False
                if t > 1:
                    mask = torch.ones(t, start + t, dtype=torch.bool, device=x_BTD.device).tril(start)
        groups = q_BHTE.shape[1] // k_BKTE.shape[1]
        if groups > 1:
            # Grouped-query attention: each key/value head serves `groups` query heads.
            k_BKTE = k_BKTE.repeat_interleave(groups, dim=1)
            v_BKTE = v_BKTE.repeat_interleave(groups, dim=1)
        out_BHTE = F.scaled_dot_product_attention(q_BHTE, k_BKTE, v_BKTE, attn_mask=mask, is_causal=causal and mask is None)
        return self.o_proj(out_BHTE.transpose(1, 2).reshape(b, t, -1))


class SwiGLU(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden, args.ffn, bias=False)
        self.up_proj = nn.Linear(args.hidden, args.ffn, bias=False)
        self.down_proj = nn.Linear(args.ffn, args.hidden, bias=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD))


class GeluMLP(nn.Module):
    """The GPT-2 / Megatron GPT MLP (without biases, as the rest of the model)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.up_proj = nn.Linear(args.hidden, args.ffn, bias=False)
        self.down_proj = nn.Linear(args.ffn, args.hidden, bias=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x_BTD), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(args.hidden, args.norm_eps)
        self.attn = Attention(args)
        self.mlp_norm = RMSNorm(args.hidden, args.norm_eps)
        if args.moe_experts > 0:
            self.mlp: nn.Module = MoE(args)
        else:
            self.mlp = SwiGLU(args) if args.mlp == "swiglu" else GeluMLP(args)

    def forward(
        self, x_BTD: torch.Tensor, cos_TE: torch.Tensor, sin_TE: torch.Tensor, cache: LayerCache | None = None
    ) -> torch.Tensor:
        h_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos_TE, sin_TE, cache)
        return h_BTD + self.mlp(self.mlp_norm(h_BTD))


class Transformer(nn.Module):
    """tokens (B, T) -> logits (B, T, V). Layers live in a ModuleDict keyed "0".."L-1" so that a
    pipeline stage can delete layers without renaming the others; a stage without the embedding
    or the output head has them set to None and passes hidden states through."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        if args.vocab is None:
            raise ValueError("ModelArgs.vocab must be set before building the model")
        self.args = args
        self.embed = nn.Embedding(args.vocab, args.hidden)
        self.layers = nn.ModuleDict({str(i): Block(args) for i in range(args.layers)})
        self.norm = RMSNorm(args.hidden, args.norm_eps)
        self.output = nn.Linear(args.hidden, args.vocab, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.embed.weight
        self.register_buffer("inv_freq", rope_inv_freq(args, device=self.embed.weight.device), persistent=False)

    def forward(
        self,
        tokens_BT: torch.Tensor,
        positions_T: torch.Tensor | None = None,
        caches: list[LayerCache] | None = None,
    ) -> torch.Tensor:
        """`positions_T` are global token positions (default 0..T-1, or after the cache)."""
        h_BTD = self.embed(tokens_BT) if self.embed is not None else tokens_BT
        t = h_BTD.shape[1]
        if positions_T is None:
            start = caches[0].length if caches else 0
            positions_T = torch.arange(start, start + t, device=h_BTD.device)
        cos_TE, sin_TE = rope_cos_sin(self.inv_freq, positions_T)
        for i, layer in enumerate(self.layers.values()):
            h_BTD = layer(h_BTD, cos_TE, sin_TE, caches[i] if caches else None)
        if self.norm is not None:
            h_BTD = self.norm(h_BTD)
        return self.output(h_BTD) if self.output is not None else h_BTD


def _param_seed(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@torch.no_grad()
def init_weights(model: Transformer, seed: int) -> None:
    """Initialise every parameter from a generator seeded by (seed, its name).

    Linear and embedding weights ~ N(0, init_std); the projections that write into the residual
    stream (o_proj, down_proj) use init_std / sqrt(2 * layers), as GPT-2 does, so the residual
    variance does not grow with depth. Norm weights are 1.
    """
    args = model.args
    residual_std = args.init_std / math.sqrt(2 * args.layers)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        # MoE experts' stacked down projections (`experts.down_proj`) write into the residual too.
        std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")) else args.init_std
        gen = torch.Generator(device="cpu").manual_seed(_param_seed(seed, name))
        values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
        param.copy_(values)
    model.inv_freq.copy_(rope_inv_freq(args, device=model.inv_freq.device))


def build_model(args: ModelArgs) -> Transformer:
    """The model on the meta device: no memory is used until `materialize`."""
    with torch.device("meta"):
        return Transformer(args)


def materialize(model: Transformer, device: torch.device | str, seed: int) -> Transformer:
    """Allocate the (meta) model on `device` and initialise it from `seed`."""
    model.to_empty(device=device)
    if model.args.tie_embeddings and model.output is not None and model.embed is not None:
        # to_empty() allocates each parameter separately; restore the tie.
        model.output.weight = model.embed.weight
    init_weights(model, seed)
    return model
