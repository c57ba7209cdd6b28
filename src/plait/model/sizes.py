"""Model shapes: `ModelArgs` and the named sizes (`debug` ... `405b`).

Pure Python, no torch: the planner and the config checks import this without building anything.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ModelArgs:
    """Everything that fixes the network's shape and its initialisation."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    # None: the tokenizer's vocabulary (padded), decided when the data is known.
    vocab: int | None
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    # None: 4*hidden for gelu; for swiglu 8/3*hidden rounded up to a multiple of 256 (Llama rule)
    ffn_hidden: int | None = None
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    # Llama-3 frequency scaling: factor 0 means off. The other three are Llama-3's constants.
    rope_scaling_factor: float = 0.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # Mixture of experts (0: dense MLP): experts per MoE block, experts per token, their SwiGLU
    # width (None: ffn_hidden), capacity factor (0: dropless) and balance-loss coefficient.
    moe_experts: int = 0
    moe_top_k: int = 2
    moe_ffn_hidden: int | None = None
    moe_capacity_factor: float = 0.0
    moe_aux_loss_coef: float = 0.01

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def ffn(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        if self.mlp == "gelu":
            return 4 * self.hidden
        return 256 * -(-(8 * self.hidden // 3) // 256)

    @property
    def moe_ffn(self) -> int:
        return self.moe_ffn_hidden if self.moe_ffn_hidden is not None else self.ffn

    def replace(self, **changes: object) -> "ModelArgs":
        return dataclasses.replace(self, **changes)


def _llama3(layers: int, hidden: int, heads: int, ffn: int, factor: float, tied: bool) -> ModelArgs:
    return ModelArgs(
        layers=layers, hidden=hidden, heads=heads, kv_heads=8, vocab=128256, ffn_hidden=ffn,
        tie_embeddings=tied, rope_theta=500000.0, rope_scaling_factor=factor,
    )


NAMED_SIZES: dict[str, ModelArgs] = {
    # For tests: ~0.1M parameters with the byte vocabulary.
    "debug": ModelArgs(layers=2, hidden=64, heads=4, kv_heads=2, vocab=None, ffn_hidden=192),
    # The default run: ~3.4M parameters, sized to train in minutes on a 2-core CPU.
    "tiny": ModelArgs(layers=4, hidden=256, heads=4, kv_heads=2, vocab=None, ffn_hidden=768),
    # Mixture-of-experts counterparts: `debug-moe` for tests (4 experts, top-2), `tiny-moe` for a
    # CPU (~5.6M parameters with the byte vocabulary, ~2.1M of them active per token).
    "debug-moe": ModelArgs(layers=2, hidden=64, heads=4, kv_heads=2, vocab=None, moe_experts=4, moe_ffn_hidden=128),
    "tiny-moe": ModelArgs(layers=4, hidden=256, heads=4, kv_heads=2, vocab=None, moe_experts=8, moe_ffn_hidden=192),
    # GPT-3 Small/Medium widths with Llama blocks and a GPT-2 sized (padded) vocabulary.
    "125m": ModelArgs(layers=12, hidden=768, heads=12, kv_heads=12, vocab=50304, tie_embeddings=True),
    "350m": ModelArgs(layers=24, hidden=1024, heads=16, kv_heads=16, vocab=50304, tie_embeddings=True),
    # Llama-3.2 1B and 3B.
    "1b": _llama3(16, 2048, 32, 8192, 32.0, tied=True),
    "3b": _llama3(28, 3072, 24, 8192, 32.0, tied=True),
    # Llama-3.1 8B, 70B and 405B (for planning; they do not fit on a laptop).
    "8b": _llama3(32, 4096, 32, 14336, 8.0, tied=False),
    "70b": _llama3(80, 8192, 64, 28672, 8.0, tied=False),
    "405b": _llama3(126, 16384, 128, 53248, 8.0, tied=False),
    # Mixtral 8x7B's shape (for planning): 8 SwiGLU experts of width 14336, top-2, ~46.7B
    # parameters, ~12.9B active per token (embedding included).
    "mixtral-8x7b": ModelArgs(
        layers=32, hidden=4096, heads=32, kv_heads=8, vocab=32000, rope_theta=1e6, moe_experts=8,
        moe_top_k=2, moe_ffn_hidden=14336,
    ),
}
