"""The bubble benchmark's replay of a schedule's compute order (bench/pipeline_bubble.py): with
fixed costs and free transfers it must give the textbook bubbles."""

from __future__ import annotations

from importlib import util
from pathlib import Path

import pytest

_spec = util.spec_from_file_location("pipeline_bubble", Path(__file__).resolve().parents[2] / "bench" / "pipeline_bubble.py")
bench = util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _calls(kinds: str, stage: int) -> list[tuple]:
    """(kind, stage, micro-batch) for a string of kinds, micro-batches in order per kind."""
    seen: dict[str, int] = {}
    out = []
    for k in kinds:
        out.append((k, stage, seen.get(k, 0)))
        seen[k] = seen.get(k, 0) + 1
    return out


def _one_f_one_b(p: int, m: int, r: int) -> str:
    warmup = min(m, p - r)  # PyTorch's Schedule1F1B: p - r forwards before the first backward
    kinds, forwards, backwards = "F" * warmup, warmup, 0
    while backwards < m:
        kinds += "B"
        backwards += 1
        if forwards < m:
            kinds += "F"
            forwards += 1
    return kinds


@pytest.mark.parametrize("p, m", [(2, 4), (4, 8), (4, 16)])
def test_gpipe_and_1f1b_orders_give_p_minus_1_over_m(p, m):
    gpipe = [_calls("F" * m + "B" * m, r) for r in range(p)]
    one_f_one_b = [_calls(_one_f_one_b(p, m, r), r) for r in range(p)]
    assert bench.scheduled_bubble(gpipe, p, 1) == pytest.approx((p - 1) / m)
    assert bench.scheduled_bubble(one_f_one_b, p, 1) == pytest.approx((p - 1) / m)


def test_zero_bubble_order_fills_with_weight_gradients():
    # PyTorch's ScheduleInterleavedZeroBubble at p = 2, m = 4, as the benchmark recorded it. With
    # F = I = W the ZB-H1 bubble is (p - 1)(F + I - W) over m (F + I + W): (p - 1) / (3 m).
    zb = [_calls("FFIWFIWFIWIW", 0), _calls("FIFIWFIWFIWW", 1)]
    assert bench.scheduled_bubble(zb, 2, 1) == pytest.approx(1 / 12)


def test_an_order_that_waits_on_itself_is_refused():
    with pytest.raises(AssertionError):
        bench.scheduled_bubble([_calls("BF", 0), _calls("FB", 1)], 2, 1)
