"""Statistics of "which wins": Wilson interval, exact McNemar, Holm, all-pairs top group."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline import metrics


def _mcnemar_by_hand(b: int, c: int) -> float:
    """Reference: two-sided exact binomial test of b successes in n = b + c trials with p = 1/2."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    return min(1.0, 2 * sum(math.comb(n, i) * 0.5 ** n for i in range(k + 1)))


@pytest.mark.parametrize("b, c, expected", [
    (0, 0, 1.0),
    (1, 0, 1.0),  # 2 * 1/2 = 1
    (5, 0, 0.0625),  # 2 * 1/32
    (6, 0, 0.03125),  # 2 * 1/64: the smallest n with p < 0.05 when one side is 0
    (2, 8, 0.109375),  # 2 * (1 + 10 + 45) / 1024
    (8, 2, 0.109375),  # symmetric
    (10, 10, 1.0),
    (3, 12, 0.03515625),  # 2 * (1 + 15 + 105 + 455) / 32768
])
def test_mcnemar_exact_matches_hand_computed_binomial(b, c, expected):
    assert metrics.mcnemar_exact(b, c) == pytest.approx(expected, abs=1e-12)
    assert metrics.mcnemar_exact(b, c) == pytest.approx(_mcnemar_by_hand(b, c), abs=1e-12)


def test_mcnemar_agrees_with_scipy_on_larger_counts():
    binomtest = pytest.importorskip("scipy.stats").binomtest
    for b, c in ((17, 31), (40, 41), (0, 25), (120, 80)):
        assert metrics.mcnemar_exact(b, c) == pytest.approx(binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_mcnemar_rejects_negative_counts():
    with pytest.raises(ValueError, match="discordant counts must be >= 0"):
        metrics.mcnemar_exact(-1, 3)


def test_wilson_interval_hand_computed():
    # 8 of 10: centre (0.8 + z²/20) / (1 + z²/10), half-width z sqrt(0.016 + z²/400) / (1 + z²/10).
    z = 1.959963984540054
    d = 1 + z * z / 10
    lo, hi = metrics.wilson_interval(8, 10)
    assert lo == pytest.approx((0.8 + z * z / 20 - z * math.sqrt(0.016 + z * z / 400)) / d)
    assert hi == pytest.approx((0.8 + z * z / 20 + z * math.sqrt(0.016 + z * z / 400)) / d)
    assert metrics.wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("raw, expected", [
    # Sorted p (m = 4): 0.01*4 = 0.04, 0.02*3 = 0.06, 0.03*2 = 0.06 (max with the previous), 0.5.
    ([0.03, 0.01, 0.5, 0.02], [0.06, 0.04, 0.5, 0.06]),
    # Capped at 1 and monotone: 0.001*3 = 0.003; 0.6*2 = 1.2 -> 1; 0.7*1 = 0.7 -> 1 (monotone).
    ([0.6, 0.7, 0.001], [1.0, 1.0, 0.003]),
    # Monotone without the cap: 0.4*2 = 0.8, then 0.45*1 = 0.45 -> 0.8.
    ([0.4, 0.45, 0.001], [0.8, 0.8, 0.003]),
    ([], []),
])
def test_holm_matches_hand_computed_values(raw, expected):
    assert metrics.holm(raw) == pytest.approx(expected, abs=1e-12)


def test_holm_rejects_values_outside_0_1():
    with pytest.raises(ValueError, match="p-values"):
        metrics.holm([0.2, 1.5])


def _correct(n_images: int, wrong_sets) -> np.ndarray:
    out = np.ones((len(wrong_sets), n_images), bool)
    for m, wrong in enumerate(wrong_sets):
        out[m, list(wrong)] = False
    return out


def test_four_methods_raw_winners_differ_from_holm_top_group():
    """A: all 12 right. B and C: wrong on images 0-5. D: wrong on 0-9.

    Pairs (b, c, raw p): A-B (6, 0, 1/32), A-C (6, 0, 1/32), A-D (10, 0, 1/512), B-C (0, 0, 1),
    B-D (4, 0, 1/8), C-D (4, 0, 1/8). Holm over m = 6 pairs, sorted p:
    1/512*6 = 0.01171875; 1/32*5 = 0.15625; 1/32*4 = 0.125 -> 0.15625; 1/8*3 = 0.375;
    1/8*2 = 0.25 -> 0.375; 1*1 = 1. At alpha 0.05 raw p would let A beat B, C and D (top group
    {A}); after Holm only A beats D: the top group is {A, B, C}, and its cheapest member is B
    (D is cheaper still, but significantly worse than A).
    """
    correct = _correct(12, [(), range(6), range(6), range(10)])
    res = metrics.pairwise_mcnemar(correct, ["A", "B", "C", "D"], alpha=0.05)
    got = {(res.names[t.i], res.names[t.j]): (t.b, t.c, t.p, t.p_adjusted) for t in res.tests}
    assert got == {
        ("A", "B"): (6, 0, 1 / 32, 0.15625), ("A", "C"): (6, 0, 1 / 32, 0.15625),
        ("A", "D"): (10, 0, 1 / 512, 0.01171875), ("B", "C"): (0, 0, 1.0, 1.0),
        ("B", "D"): (4, 0, 1 / 8, 0.375), ("C", "D"): (4, 0, 1 / 8, 0.375),
    }
    raw_top = [m for m in range(4) if not any(
        t.p <= 0.05 and t.b != t.c and m == (t.j if t.b > t.c else t.i) for t in res.tests)]
    assert raw_top == [0]
    assert res.top_group == [0, 1, 2]
    assert res.beaten_by == [[], [], [], [0]]
    assert [t.winner for t in res.tests] == [None, None, 0, None, None, None]
    costs = [100.0, 10.0, 20.0, 1.0]
    assert metrics.cheapest(res.top_group, costs, res.names) == 1
    # The matrices the heatmap draws: symmetric adjusted p, antisymmetric advantage.
    adj, adv = res.adjusted_matrix(), res.advantage_matrix()
    assert adj[3, 0] == adj[0, 3] == 0.01171875 and np.isnan(adj[2, 2])
    assert adv[0, 3] == 10 and adv[3, 0] == -10 and adv[1, 2] == 0


def test_top_group_is_everyone_when_nothing_differs_and_direction_follows_b_c():
    correct = _correct(20, [(0,), (1,)])
    res = metrics.pairwise_mcnemar(correct, ["x", "y"])
    assert res.top_group == [0, 1] and res.tests[0].winner is None
    # 2 methods: the second right where the first is wrong on 8 images -> p = 2/256, it wins.
    correct = _correct(20, [range(8), ()])
    res = metrics.pairwise_mcnemar(correct, ["x", "y"])
    assert (res.tests[0].b, res.tests[0].c) == (0, 8)
    assert res.tests[0].p_adjusted == pytest.approx(2 / 256) and res.tests[0].winner == 1
    assert res.top_group == [1] and res.test(1, 0) is res.tests[0]


def test_pairwise_checks_its_inputs():
    with pytest.raises(ValueError, match="alpha"):
        metrics.pairwise_mcnemar(np.ones((2, 3), bool), ["a", "b"], alpha=0)
    with pytest.raises(ValueError, match="shape"):
        metrics.pairwise_mcnemar(np.ones((3, 3), bool), ["a", "b"])
    assert metrics.cheapest([], [1.0]) is None
