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


# --------------------------------------------------------------------------- effect sizes, every seed


def test_newcombe_paired_interval_matches_the_published_worked_example():
    # Fagerland, Lydersen & Laake (2017), Statistical Analysis of Contingency Tables, ch. 8: complete
    # response before and after consolidation therapy (Cavo et al. 2012), table [[59, 6], [16, 80]]:
    # Newcombe's square-and-add (hybrid score, Newcombe 1998 method 10) interval -0.0621 (-0.1186 to -0.0046).
    low, high = metrics.paired_difference_ci(59, 6, 16, 80)
    assert (round(low, 4), round(high, 4)) == (-0.1186, -0.0046)
    # Swapping the two methods mirrors the interval.
    assert metrics.paired_difference_ci(59, 16, 6, 80) == pytest.approx((-high, -low))


def _coverage(n: int, p10: float, p01: float, p11: float, interval) -> float:
    """Exact coverage of ``interval`` at one parameter point: sum over every 2x2 table of n images."""
    theta = p10 - p01
    p00 = 1 - p10 - p01 - p11
    total = 0.0
    for a in range(n + 1):
        for b in range(n + 1 - a):
            for c in range(n + 1 - a - b):
                d = n - a - b - c
                prob = (math.factorial(n) / (math.factorial(a) * math.factorial(b) * math.factorial(c)
                                             * math.factorial(d)) * p11 ** a * p10 ** b * p01 ** c * p00 ** d)
                low, high = interval(a, b, c, d)
                total += prob * (low <= theta <= high)
    return total


def _wald(a, b, c, d, z=1.959963984540054):
    n = a + b + c + d
    theta = (b - c) / n
    half = z * math.sqrt(max(0.0, ((b + c) / n - theta ** 2) / n))
    return theta - half, theta + half


@pytest.mark.parametrize("p10, p01, p11", [(0.1, 0.02, 0.8), (0.15, 0.1, 0.6), (0.1, 0.0, 0.85),
                                           (0.2, 0.05, 0.6)])
def test_newcombe_paired_interval_holds_its_level_at_small_counts_where_wald_does_not(p10, p01, p11):
    # Independent reference: the exact coverage over every possible table of 20 images.
    newcombe = _coverage(20, p10, p01, p11, metrics.paired_difference_ci)
    wald = _coverage(20, p10, p01, p11, _wald)
    assert newcombe >= 0.95 > 0.925 > wald


@pytest.mark.parametrize("seed", range(6))
def test_sign_flip_exact_matches_brute_force_enumeration(seed):
    rng = np.random.default_rng(seed)
    d = rng.integers(-4, 5, size=11)
    observed = abs(d.sum())
    signs = np.array(np.meshgrid(*[[-1, 1]] * d.size)).reshape(d.size, -1).T
    expected = np.mean(np.abs(signs @ np.abs(d)) >= observed)
    assert metrics.sign_flip_exact(d) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("b, c", [(0, 0), (3, 1), (9, 0), (25, 8)])
def test_sign_flip_on_one_seed_each_is_the_exact_mcnemar_test(b, c):
    d = [1] * b + [-1] * c + [0] * 7
    assert metrics.sign_flip_exact(d) == metrics.mcnemar_exact(b, c)
    # The same on a scaled integer grid (as with several seeds) gives the same p-value.
    assert metrics.sign_flip_exact([3 * x for x in d]) == pytest.approx(metrics.mcnemar_exact(b, c))


def test_difference_averages_every_seed_and_is_the_difference_of_mean_accuracies():
    rng = np.random.default_rng(0)
    first = rng.random((3, 50)) < 0.8
    second = rng.random(50) < 0.7
    diff = metrics.difference(first, second)
    assert diff.diff == pytest.approx(first.mean() - second.mean())
    assert sum(diff.table) == pytest.approx(50) and diff.low < diff.diff < diff.high
    # One seed each: the table is the integer 2x2 table, the p-value McNemar's.
    one = metrics.difference(first[0], second)
    b, c = int(np.sum(first[0] & ~second)), int(np.sum(~first[0] & second))
    assert one.table[1:3] == (b, c) and one.p == metrics.mcnemar_exact(b, c)
    assert (one.low, one.high) == metrics.paired_difference_ci(*one.table)


def test_noninferior_sample_size_by_the_paired_formula():
    z = 1.959963984540054 + 0.8416212335729143
    assert metrics.noninferior_sample_size(0.1, 0.03) == math.ceil(z * z * 0.1 / 0.03 ** 2)
    assert metrics.noninferior_sample_size(0.1, 0.03, gap=-0.01) == math.ceil(z * z * (0.1 - 1e-4) / 0.02 ** 2)
    assert metrics.noninferior_sample_size(0.1, 0.03, gap=-0.05) is None  # beyond the margin: no size
    with pytest.raises(ValueError, match="margin 0 must lie"):
        metrics.noninferior_sample_size(0.1, 0)


def test_pairwise_seeds_uses_every_seed_where_the_lowest_would_decide_otherwise():
    # Row A: one seed, right on 80 of 100 images. Row B: three seeds; seed 0 alone is 12 images worse
    # than A with none the other way (McNemar: A beats it), seeds 1 and 2 are 4 images better.
    a = np.zeros(100, bool)
    a[:80] = True
    b = np.tile(a, (3, 1))
    b[0, :12] = False
    b[1:, 80:84] = True
    lowest = metrics.pairwise_mcnemar(np.array([a, b[0]]), ["A", "B"])
    assert lowest.beaten_by == [[], [0]]
    every = metrics.pairwise_seeds([a, b], ["A", "B"])
    assert every.beaten_by == [[], []] and every.top_group == [0, 1]
    assert b.mean() > a.mean() - 0.02  # B's mean is close to A's: 1 image behind on average
