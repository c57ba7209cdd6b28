"""The ranking harness: Spearman's correlation with ties, and the overrides it trains a layout with."""

from __future__ import annotations

import pytest

from plait.config import Config, set_value
from plait.hardware.profile import cluster_from_flags
from plait.measure.step_time import layout_overrides, ranks, spearman
from plait.validation import build_config
from plait.planner import workload_from_config
from plait.planner.search import enumerate_layouts


def test_ranks_average_ties():
    assert ranks([3.0, 1.0, 2.0]) == [3.0, 1.0, 2.0]
    assert ranks([1.0, 2.0, 2.0, 5.0]) == [1.0, 2.5, 2.5, 4.0]
    assert ranks([7.0, 7.0, 7.0]) == [2.0, 2.0, 2.0]


def test_spearman_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # One swapped pair among 5: 1 - 6 * 2 / (5 * 24) = 0.9.
    assert spearman([1, 2, 3, 4, 5], [1, 3, 2, 4, 5]) == pytest.approx(0.9)
    # With ties it is the Pearson correlation of the average ranks: ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4).
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / (4.5 * 5.0) ** 0.5)
    with pytest.raises(ValueError, match="equal length"):
        spearman([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="no ranking"):
        spearman([1, 1, 1], [1, 2, 3])


def test_layout_overrides_are_what_plait_train_accepts():
    cfg = Config()
    set_value(cfg, "model.name", "tiny")
    workload = workload_from_config(cfg, 128, 8, "fp32")
    cluster = cluster_from_flags(2, 2, "cpu")
    layouts = list(enumerate_layouts(workload, cluster))
    assert len(layouts) > 20
    for layout in layouts[::5]:
        built = build_config(None, ["--model.name=tiny", "--train.device=cpu", "--train.dtype=fp32",
                                    *layout_overrides(layout, workload)], world_size=2)
        assert built.parallel.tp_degree == layout.tp and built.parallel.pp_degree == layout.pp
        assert built.train.micro_batch_size == layout.micro_batch_size
        assert built.train.global_batch_tokens == workload.global_batch_tokens
