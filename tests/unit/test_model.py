"""The model: named sizes and parameter counts, shapes, init from seed, KV-cache decoding."""

from __future__ import annotations

import pytest
import torch

from plait.model import NAMED_SIZES, build_model, count_params, flops_per_token, generate, materialize, matmul_params
from plait.model.generate import new_caches
from plait.model.llama import rope_inv_freq


def small(**changes):
    return NAMED_SIZES["debug"].replace(vocab=256, **changes)


# Published parameter counts of the Llama shapes (and our own sizes' intended ranges).
@pytest.mark.parametrize(
    "name, low, high",
    [("debug", 0.05e6, 1e6), ("tiny", 2e6, 6e6), ("125m", 115e6, 135e6), ("350m", 330e6, 380e6),
     ("1b", 1.23e9, 1.24e9), ("3b", 3.20e9, 3.22e9), ("8b", 8.02e9, 8.04e9), ("70b", 70.5e9, 70.6e9),
     ("405b", 405.8e9, 405.9e9)],
)
def test_named_size_param_counts(name, low, high):
    args = NAMED_SIZES[name]
    args = args.replace(vocab=args.vocab or 256)
    assert low <= count_params(args).total <= high


@pytest.mark.parametrize("name", ["debug", "tiny"])
def test_count_matches_real_module(name):
    for tie in (False, True):
        for mlp in ("swiglu", "gelu"):
            args = NAMED_SIZES[name].replace(vocab=256, tie_embeddings=tie, mlp=mlp, ffn_hidden=None)
            model = build_model(args)  # meta: counting costs no memory
            assert sum(p.numel() for p in model.parameters()) == count_params(args).total


def test_large_sizes_build_on_meta_without_memory():
    model = build_model(NAMED_SIZES["70b"])
    assert next(model.parameters()).device.type == "meta"
    assert sum(p.numel() for p in model.parameters()) == count_params(NAMED_SIZES["70b"]).total


def test_forward_shape_and_seeded_init():
    args = small()
    a = materialize(build_model(args), "cpu", seed=7)
    b = materialize(build_model(args), "cpu", seed=7)
    c = materialize(build_model(args), "cpu", seed=8)
    tokens = torch.randint(0, 256, (3, 17))
    assert a(tokens).shape == (3, 17, 256)
    for (name, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(pa, pb), name
        if "norm" not in name:
            assert not torch.equal(pa, pc), name
    # Same parameter, same values, whatever else the model holds (pipeline stages rely on it).
    deeper = materialize(build_model(args.replace(layers=3)), "cpu", seed=7)
    assert torch.equal(deeper.layers["1"].attn.q_proj.weight, a.layers["1"].attn.q_proj.weight)
    # Residual projections are scaled down by sqrt(2 * layers).
    std_q = a.layers["0"].attn.q_proj.weight.std().item()
    std_o = a.layers["0"].attn.o_proj.weight.std().item()
    assert std_o == pytest.approx(std_q / 2, rel=0.15)


def test_tied_embeddings_stay_tied():
    model = materialize(build_model(small(tie_embeddings=True)), "cpu", seed=0)
    assert model.output.weight is model.embed.weight


def test_causal():
    model = materialize(build_model(small()), "cpu", seed=0)
    tokens = torch.randint(0, 256, (1, 12))
    changed = tokens.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 256
    torch.testing.assert_close(model(tokens)[:, :8], model(changed)[:, :8])


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_kv_cache_matches_full_forward(kv_heads):
    model = materialize(build_model(small(kv_heads=kv_heads)), "cpu", seed=0)
    tokens = torch.randint(0, 256, (2, 20))
    full = model(tokens)
    caches = new_caches(model, 2, 20)
    parts = [model(tokens[:, :9], caches=caches), model(tokens[:, 9:14], caches=caches)]
    parts += [model(tokens[:, i : i + 1], caches=caches) for i in range(14, 20)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_generate_greedy_equals_argmax_rollout():
    model = materialize(build_model(small()), "cpu", seed=0)
    prompt = [5, 6, 7]
    out = generate(model, prompt, 8, temperature=0)
    seq = list(prompt)
    for _ in range(8):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[3:]
    # Sampling is reproducible by seed and respects the vocabulary limit.
    a = generate(model, prompt, 16, temperature=1.0, top_k=0, seed=3, vocab_limit=100)
    assert a == generate(model, prompt, 16, temperature=1.0, top_k=0, seed=3, vocab_limit=100)
    assert all(t < 100 for t in a)


def test_rope_scaling_changes_only_low_frequencies():
    base = NAMED_SIZES["8b"].replace(rope_scaling_factor=0.0)
    scaled = NAMED_SIZES["8b"]
    plain, llama3 = rope_inv_freq(base), rope_inv_freq(scaled)
    assert torch.equal(plain[:8], llama3[:8])  # high frequencies kept
    torch.testing.assert_close(llama3[-1], plain[-1] / 8.0)  # lowest divided by the factor


def test_flops_per_token():
    args = NAMED_SIZES["8b"]
    n = matmul_params(args)
    assert flops_per_token(args, 4096) == 6 * n + 12 * 32 * 4096 * 4096
    # The 6N rule: within a few percent of 6 x total parameters for a big model at short length.
    assert flops_per_token(args, 128) == pytest.approx(6 * count_params(args).total, rel=0.07)
    assert flops_per_token(args, 4096, recompute=True) == pytest.approx(flops_per_token(args, 4096) * 8 / 6)


def test_model_package_has_no_distributed_import():
    import pathlib
    import re

    import plait.model

    root = pathlib.Path(plait.model.__file__).parent
    pattern = re.compile(r"^\s*(import|from)\s+torch\.distributed", re.MULTILINE)
    files = list(root.glob("*.py"))
    assert len(files) >= 4
    for path in files:
        assert not pattern.search(path.read_text()), path
