"""Pipeline parallelism without processes: the stage split and its cost model, the model's
pass-through when a stage lacks the embedding or the head, and every pipeline config error."""

from __future__ import annotations

import copy

import pytest
import torch

from plait.config import ConfigError
from plait.validation import build_config
from plait.model import ModelArgs, build_model, materialize
from plait.layout.pipeline import build_pipeline_plan, part_costs, pipeline_microbatches, split_layers


def _args(vocab: int, layers: int = 8) -> ModelArgs:
    return ModelArgs(layers=layers, hidden=64, heads=4, kv_heads=2, vocab=vocab, ffn_hidden=192)


def _sizes(ranges: list[range]) -> list[int]:
    return [len(r) for r in ranges]


def test_split_covers_every_layer_once_in_order():
    ranges = split_layers(10, 4, part_costs(_args(256, 10), 64))
    assert [i for r in ranges for i in r] == list(range(10))
    assert all(len(r) >= 1 for r in ranges)


def test_small_vocabulary_splits_layers_evenly():
    # The embedding and head of a 64-word vocabulary weigh little next to a layer.
    assert _sizes(split_layers(8, 4, part_costs(_args(64), 64))) == [2, 2, 2, 2]


def test_large_vocabulary_pushes_layers_off_first_and_last_stages():
    costs = part_costs(_args(50_000), 64)
    # With hidden 64 a layer is ~0.1M FLOPs/token and the head ~6.4M: the head alone outweighs
    # many layers, so the last stage keeps one layer and the others share the rest.
    assert costs.head > 10 * costs.layer
    sizes = _sizes(split_layers(8, 4, costs))
    assert sizes[-1] == 1
    assert sizes[0] < max(sizes[1:-1])
    # A moderate vocabulary: the ends get fewer layers than the middle, but not the minimum.
    moderate = part_costs(_args(2048, 12), 64)
    sizes = _sizes(split_layers(12, 4, moderate))
    assert sizes[0] < sizes[1] and sizes[-1] < sizes[-2], sizes


def test_split_refuses_more_stages_than_layers():
    with pytest.raises(ValueError, match="cannot split 2 layers into 4 stages"):
        split_layers(2, 4, part_costs(_args(64, 2), 64))


def test_looped_placement_of_virtual_stages():
    plan = build_pipeline_plan(_args(64), 64, pp_degree=2, virtual_stages=2)
    assert plan.num_stages == 4
    assert plan.stages_of_rank(0) == [0, 2] and plan.stages_of_rank(1) == [1, 3]
    assert "stage 3 (rank 1)" in plan.describe()


def test_microbatches_default_to_train_micro_batches():
    assert pipeline_microbatches(0, 32, 16) == 2
    assert pipeline_microbatches(0, 16, 16) == 1
    assert pipeline_microbatches(8, 32, 16) == 8
    # Derived counts below the stage count rise to the smallest multiple of pp dividing the batch.
    assert pipeline_microbatches(0, 32, 32, pp_degree=2) == 2
    assert pipeline_microbatches(0, 12, 32, pp_degree=4) == 4
    assert pipeline_microbatches(0, 10, 32, pp_degree=4) == 1  # none fits: left for the config check to refuse


def test_stages_pass_hidden_states_through():
    """A model with the other stage's layers deleted and its embedding or head set to None runs
    as a stage: two stages in a row compute the full model's logits."""
    args = _args(64, layers=4)
    full = materialize(build_model(args), "cpu", seed=1)
    first, last = copy.deepcopy(full), copy.deepcopy(full)
    for key in ("2", "3"):
        del first.layers[key]
    first.norm, first.output = None, None
    for key in ("0", "1"):
        del last.layers[key]
    last.embed = None
    tokens_BT = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    hidden_BTD = first(tokens_BT)
    assert hidden_BTD.shape == (2, 16, 64)
    torch.testing.assert_close(last(hidden_BTD), full(tokens_BT), rtol=0, atol=0)


@pytest.mark.parametrize(
    "override, world, expected",
    [
        ("--parallel.pp_degree=2 --parallel.pp_virtual_stages=2", None,
         "parallel.pp_virtual_stages = 2 needs an interleaved schedule, but parallel.pp_schedule = \"1f1b\""),
        ("--parallel.pp_degree=2 --parallel.pp_schedule=interleaved-1f1b --model.layers=4", None,
         "needs parallel.pp_virtual_stages >= 2 (model chunks per rank); set parallel.pp_virtual_stages = 2"),
        ("--parallel.pp_degree=4", None,
         "model.layers = 2 cannot fill parallel.pp_degree x pp_virtual_stages = 4 x 1 = 4 stages"),
        ("--parallel.pp_degree=2 --model.tie_embeddings=true", None,
         "parallel.pp_degree = 2 with tied embeddings (model.tie_embeddings = true)"),
        ("--parallel.pp_degree=2 --parallel.pp_microbatches=-1", None, "parallel.pp_microbatches = -1 must be >= 0"),
        ("--parallel.pp_degree=2 --parallel.pp_virtual_stages=0", None, "parallel.pp_virtual_stages = 0 must be at least 1"),
        ("--parallel.pp_degree=2 --parallel.pp_schedule=zero-bubble --train.compile=true", None,
         "train.compile = true with parallel.pp_schedule = \"zero-bubble\""),
        ("--parallel.pp_schedule=zerobubble", None, "zero-bubble"),
        ("--parallel.pp_degree=2 --parallel.pp_microbatches=5", 2,
         "parallel.pp_microbatches = 5 does not divide the 32 sequences of a data-parallel rank's step; pick one of"),
        ("--parallel.pp_degree=2 --parallel.pp_microbatches=1", 2,
         "parallel.pp_schedule = \"1f1b\" needs at least parallel.pp_degree = 2 micro-batches per step, but a "
         "data-parallel rank's 32 sequences at train.micro_batch_size = 32 make 1; set parallel.pp_microbatches = 2"),
        ("--parallel.pp_degree=4 --model.layers=8 --parallel.pp_virtual_stages=2 --parallel.pp_schedule=interleaved-1f1b "
         "--train.global_batch_tokens=4608 --parallel.pp_microbatches=9", 4,
         "runs micro-batches in rounds of parallel.pp_degree = 4: the 9 micro-batches per step must split into 2 equal rounds"),
        ("--parallel.pp_degree=2 --parallel.dp_replicate_degree=2 --parallel.pp_microbatches=2", 4,
         "parallel.pp_degree = 2 with data parallelism needs parallel.zero_stage = 2 or 3"),
    ],
)
def test_pipeline_errors_name_field_and_fix(override, world, expected):
    base = ["--model.name=debug"]
    with pytest.raises(ConfigError) as info:
        build_config(None, base + override.split(" "), world_size=world)
    assert expected in str(info.value)


def test_pipeline_layouts_that_validate():
    debug = ["--model.name=debug", "--train.micro_batch_size=16"]
    build_config(None, debug + ["--parallel.pp_degree=2"], world_size=2)
    build_config(None, debug + ["--parallel.pp_degree=2", "--parallel.pp_schedule=gpipe", "--train.micro_batch_size=32"], world_size=2)
    build_config(None, debug + ["--parallel.pp_degree=2", "--parallel.pp_schedule=interleaved-1f1b",
                                "--parallel.pp_virtual_stages=2", "--model.layers=4"], world_size=2)
    build_config(None, debug + ["--parallel.pp_degree=2", "--parallel.dp_shard_degree=2", "--parallel.zero_stage=3",
                                "--parallel.tp_degree=2", "--parallel.pp_microbatches=2"], world_size=8)
