"""Mixture of experts: the router, capacity drops, the balance loss on a hand-made example,
parameter and FLOP counts, and a short single-process training run with router metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch

import plait
from plait.config import ConfigError
from plait.validation import build_config
from plait.model import NAMED_SIZES, build_model, count_params, flops_per_token, materialize, matmul_params
from plait.model.moe import MoE, capacity_keep, moe_layers, route

DEBUG_MOE = NAMED_SIZES["debug-moe"].replace(vocab=256)


def test_router_weights_sum_to_one_and_pick_the_largest():
    logits = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    probs, weights, experts = route(logits, 2)
    torch.testing.assert_close(weights.sum(-1), torch.ones(50))
    torch.testing.assert_close(probs, torch.softmax(logits, -1))
    assert torch.equal(experts, logits.topk(2, dim=-1).indices)
    # Mixtral's renormalised top-k equals a softmax over the chosen logits.
    torch.testing.assert_close(weights, torch.softmax(logits.gather(1, experts), -1))


def test_capacity_serves_first_choices_first():
    # One sequence of 4 tokens, 2 experts, top-2, capacity factor 0.5: ceil(0.5 * 4 * 2 / 2) = 2
    # slots per expert. First choices in token order: 0, 0, 0, 1; then second choices 1, 1, 1, 0.
    experts = torch.tensor([[[0, 1], [0, 1], [0, 1], [1, 0]]])
    keep = capacity_keep(experts, 2, 0.5)
    expected = torch.tensor([[[True, True], [True, False], [False, False], [True, False]]])
    assert torch.equal(keep, expected)
    assert capacity_keep(experts, 2, 0.0).all()  # dropless


def test_drops_are_counted_and_dropped_tokens_pass_through():
    layer = _layer(moe_capacity_factor=0.25, moe_experts=4, moe_top_k=2)
    x = torch.randn(3, 8, DEBUG_MOE.hidden, generator=torch.Generator().manual_seed(1))
    out = layer(x)
    _, _, experts = route(x.reshape(-1, x.shape[-1]) @ layer.router.weight.t(), 2)
    keep = capacity_keep(experts.view(3, 8, 2), 4, 0.25)
    assert layer.stats[-1].item() == (~keep).sum().item() > 0
    # A token whose every assignment was dropped gets nothing from the MoE (residual only).
    none_kept = ~keep.any(-1)
    assert none_kept.any()
    assert torch.equal(out[none_kept], torch.zeros_like(out[none_kept]))
    assert layer.stats[:-1].sum().item() == 3 * 8 * 2  # counts are before capacity


def test_balance_loss_equals_formula_on_hand_example():
    # hidden 2, 2 experts, top-1, router = identity: the logits are the tokens themselves.
    layer = MoE(DEBUG_MOE.replace(hidden=2, moe_experts=2, moe_top_k=1, moe_ffn_hidden=3, moe_aux_loss_coef=0.5))
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(2))
        for p in layer.experts.parameters():
            p.zero_()
    tokens = [[2.0, 0.0], [1.0, 0.0], [0.0, 3.0]]  # experts chosen: 0, 0, 1
    layer(torch.tensor([tokens]))
    probs = [[math.exp(a) / (math.exp(a) + math.exp(b)), math.exp(b) / (math.exp(a) + math.exp(b))] for a, b in tokens]
    f = [2 / 3, 1 / 3]
    p_mean = [sum(p[i] for p in probs) / 3 for i in range(2)]
    expected = 0.5 * 2 * (f[0] * p_mean[0] + f[1] * p_mean[1])
    assert layer.aux_loss.item() == pytest.approx(expected, rel=1e-6)
    # Counts summed over (here: two identical) data-parallel ranks leave the fractions unchanged.
    layer.count_reduce = lambda stats: stats * 2
    layer(torch.tensor([tokens]))
    assert layer.aux_loss.item() == pytest.approx(expected, rel=1e-6)


def test_moe_block_gets_gradients_everywhere():
    model = materialize(build_model(DEBUG_MOE), "cpu", seed=0)
    tokens = torch.randint(0, 256, (2, 17))
    loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    (loss + sum(layer.aux_loss for layer in moe_layers(model))).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert model.layers["0"].mlp.experts.gate_proj.shape == (4, 128, 64)  # stacked [experts, F, D]


def test_moe_under_bf16_autocast_close_to_fp32():
    model = materialize(build_model(DEBUG_MOE), "cpu", seed=0)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = model(tokens)
    half.float().sum().backward()  # the fp32 combine takes bf16 expert outputs
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max().item() < 0.05 * full.abs().max().item()


@pytest.mark.parametrize("name", ["debug-moe", "tiny-moe", "mixtral-8x7b"])
def test_param_count_holds_every_expert(name):
    args = NAMED_SIZES[name].replace(vocab=NAMED_SIZES[name].vocab or 256)
    assert sum(p.numel() for p in build_model(args).parameters()) == count_params(args).total  # meta: free


def test_flops_count_active_experts_only():
    args = NAMED_SIZES["mixtral-8x7b"]
    d, v, f, layers = 4096, 32000, 14336, 32
    attn = 2 * d * d + 2 * d * 1024  # 32 query heads and 8 key/value heads of 128
    assert count_params(args).total == layers * (attn + 8 * 3 * d * f + d * 8 + 2 * d) + 2 * v * d + d
    active = layers * (attn + 2 * 3 * d * f + d * 8) + v * d  # top-2 experts, router, output head
    assert matmul_params(args) == active
    assert flops_per_token(args, 4096) == 6 * active + 12 * layers * d * 4096
    assert 46.5e9 < count_params(args).total < 46.9e9 and 12.6e9 < active < 13.0e9  # Mixtral's published 46.7B / 12.9B


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["--model.moe_experts=-1"], "model.moe_experts = -1 must be >= 0 (0: dense MLP)"),
        (["--model.name=debug-moe", "--model.moe_top_k=5"], "model.moe_top_k = 5 must be between 1 and model.moe_experts = 4"),
        (["--model.name=debug-moe", "--model.moe_ffn_hidden=0"], "model.moe_ffn_hidden = 0 must be at least 1"),
        (["--model.name=debug-moe", "--model.moe_capacity_factor=-1"], "model.moe_capacity_factor = -1.0 must be >= 0 (0: dropless"),
        (["--model.name=debug-moe", "--model.moe_aux_loss_coef=-0.1"], "model.moe_aux_loss_coef = -0.1 must be >= 0"),
        (["--model.name=debug-moe", "--model.mlp=gelu"], "experts are SwiGLU; set model.mlp = \"swiglu\""),
        (["--model.name=debug-moe", "--train.compile=true"], "train.compile = true with a mixture-of-experts model"),
        (["--model.name=debug-moe", "--parallel.tp_degree=2"], "parallel.tp_degree = 2 with a mixture-of-experts model"),
    ],
)
def test_moe_config_errors(overrides, expected):
    with pytest.raises(ConfigError) as err:
        build_config(None, overrides)
    assert expected in str(err.value)


@pytest.mark.parametrize(
    "overrides, world, expected",
    [
        (["--parallel.ep_degree=0"], 1, "parallel.ep_degree = 0 must be at least 1"),
        (["--parallel.ep_degree=2", "--parallel.dp_shard_degree=2", "--parallel.zero_stage=3"], 2,
         "parallel.ep_degree = 2 spreads experts, but the model is dense (model.moe_experts = 0)"),
        (["--model.name=debug-moe", "--parallel.ep_degree=2", "--parallel.dp_shard_degree=3", "--parallel.zero_stage=3",
          "--train.global_batch_tokens=6144"], 3,
         "parallel.ep_degree = 2 must divide parallel.dp_shard_degree x cp_degree = 3 x 1"),
        (["--model.name=debug-moe", "--parallel.ep_degree=2", "--parallel.dp_shard_degree=-1", "--parallel.zero_stage=3",
          "--train.global_batch_tokens=6144"], 3,
         "parallel.ep_degree = 2 must divide parallel.dp_shard_degree x cp_degree = 3 x 1 (experts are spread over those ranks)"),
        (["--model.name=debug-moe", "--parallel.ep_degree=8", "--parallel.dp_shard_degree=8", "--parallel.zero_stage=3"], 8,
         "parallel.ep_degree = 8 must divide model.moe_experts = 4"),
        (["--model.name=debug-moe", "--parallel.ep_degree=2", "--parallel.dp_shard_degree=2", "--parallel.zero_stage=1"], 2,
         "parallel.ep_degree = 2 needs parallel.zero_stage = 2 or 3, not 1"),
        (["--model.name=debug-moe", "--parallel.ep_degree=2", "--parallel.dp_shard_degree=2", "--parallel.zero_stage=3",
          "--parallel.cpu_offload=true"], 2, "parallel.cpu_offload = true with parallel.ep_degree = 2 is not in this version of plait; set parallel.cpu_offload = false"),
    ],
)
def test_expert_parallel_config_errors(overrides, world, expected):
    with pytest.raises(ConfigError) as err:
        build_config(None, overrides, world_size=world)
    assert expected in str(err.value)


def test_expert_parallel_layouts_accepted():
    build_config(None, ["--model.name=debug-moe", "--parallel.ep_degree=2", "--parallel.dp_shard_degree=2",
                        "--parallel.zero_stage=3"], world_size=2)
    build_config(None, ["--model.name=debug-moe", "--parallel.ep_degree=2", "--parallel.dp_shard_degree=4",
                        "--parallel.zero_stage=2", "--parallel.dp_replicate_degree=2"], world_size=8)
    build_config(None, ["--model.name=debug-moe", "--parallel.dp_replicate_degree=2"], world_size=2)  # MoE with DDP


def test_moe_trains_and_reports_router_stats(tmp_path):
    from tests.unit.test_train import small_config, train_lines

    run_dir = tmp_path / "moe"
    plait.train(small_config(run_dir, "--model.name=debug-moe", "--train.steps=12", "--model.moe_capacity_factor=1.0",
                             "--checkpoint.every=0"))
    lines = train_lines(run_dir)
    assert lines[-1]["loss"] < lines[0]["loss"] - 0.3
    for line in lines:
        assert 1.0 <= line["moe_load_max"] <= 4.0
        assert 0.0 < line["moe_drop_rate"] < 0.5  # capacity 1.0 with uneven routing drops some
        assert 0.0 < line["aux_loss"] < 0.1  # coefficient 0.01 x 2 layers x (1 when even .. 4)
    config = (run_dir / "config.toml").read_text()
    assert "moe_experts = 4" in config and "moe_capacity_factor = 1.0" in config
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["params"] == count_params(DEBUG_MOE).total


def _layer(**changes) -> MoE:
    torch.manual_seed(0)
    layer = MoE(DEBUG_MOE.replace(**changes))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.3)
    return layer
