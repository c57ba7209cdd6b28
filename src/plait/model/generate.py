"""Sampling with a key/value cache: the prompt runs once, then one token per forward.

Shape legend: B batch, T tokens, K key/value heads, S cache length, E head dim, V vocabulary.
"""

from __future__ import annotations

import torch

from plait.model.llama import LayerCache, Transformer


def new_caches(model: Transformer, batch: int, max_len: int) -> list[LayerCache]:
    args = model.args
    param = next(model.parameters())
    shape = (batch, args.kv_heads, max_len, args.head_dim)
    return [
        LayerCache(
            k_BKSE=torch.zeros(shape, dtype=param.dtype, device=param.device),
            v_BKSE=torch.zeros(shape, dtype=param.dtype, device=param.device),
        )
        for _ in model.layers
    ]


def sample_next(logits_BV: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy when temperature is 0; otherwise sample from the top-k of softmax(logits / T)."""
    if temperature <= 0:
        return logits_BV.argmax(dim=-1, keepdim=True)
    logits_BV = logits_BV.float() / temperature
    if 0 < top_k < logits_BV.shape[-1]:
        kth = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    probs_BV = torch.softmax(logits_BV, dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator)


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    stop_id: int | None = None,
    vocab_limit: int | None = None,
) -> list[int]:
    """New token ids after `prompt_ids` (the prompt is not repeated). `vocab_limit` masks padded
    embedding rows that the tokenizer cannot decode; `stop_id` ends sampling early."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompt = prompt_ids or ([stop_id] if stop_id is not None else [0])
    caches = new_caches(model, 1, len(prompt) + max_new_tokens)
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens_BT = torch.tensor([prompt], dtype=torch.long, device=device)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits_BV = model(tokens_BT, caches=caches)[:, -1, :]
        if vocab_limit is not None and vocab_limit < logits_BV.shape[-1]:
            logits_BV[:, vocab_limit:] = float("-inf")
        next_B1 = sample_next(logits_BV, temperature, top_k, generator)
        token = int(next_B1.item())
        if stop_id is not None and token == stop_id:
            break
        out.append(token)
        tokens_BT = next_B1
    model.train(was_training)
    return out
