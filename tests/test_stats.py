"""bats_cli.studies.stats against values worked out by hand (shown in comments) or from published tables."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from bats_cli.studies.stats import (
    WILCOXON_MAX_M,
    _t_two_sided_p,
    binomial_se,
    bootstrap_ci,
    kendall_tau,
    mcnemar_exact,
    paired_comparison,
    paired_t,
    wilcoxon_exact_p,
)


def test_binomial_se():
    # 100·√(0.5·0.5/10000) = 100·0.005 = 0.5; 100·√(0.9·0.1/10000) = 100·0.003 = 0.3.
    assert binomial_se(50.0, 10_000) == pytest.approx(0.5)
    assert binomial_se(90.0, 10_000) == pytest.approx(0.3)
    assert binomial_se(100.0, 10) == 0.0
    for bad in [(50.0, 0), (-1.0, 100), (100.5, 100)]:
        with pytest.raises(ValueError):
            binomial_se(*bad)


def test_wilcoxon_all_positive_and_symmetric():
    # n = 5, all positive: only the all-+ and all-− assignments of 2^5 = 32 are as extreme: 2/32.
    assert wilcoxon_exact_p([1, 2, 3, 4, 5]) == pytest.approx(0.0625)
    assert wilcoxon_exact_p([-1, -2, -3, -4, -5]) == pytest.approx(0.0625)
    # Ranks 1..4, W+ = 1+4 = 5 = E (10/2): every assignment is as extreme.
    assert wilcoxon_exact_p([1, -2, -3, 4]) == 1.0
    # n = 6, W+ = 21 - 1 = 20 (rank 1 negative): |W+ - 10.5| ≥ 9.5 <=> W- ≤ 1: {}, {1} and the
    # mirror images: 4/64 = 0.0625.
    assert wilcoxon_exact_p([-1, 2, 3, 4, 5, 6]) == pytest.approx(4 / 64)


def test_wilcoxon_zeros_dropped_ties_averaged():
    # Zero dropped; |d| = 1, 1, 2, 2, 3 -> ranks 1.5, 1.5, 3.5, 3.5, 5 (sum 15, E = 7.5).
    # W+ = 1.5 + 3.5 + 3.5 + 5 = 13.5, |W+ - E| = 6 <=> W- ≤ 1.5 (subsets {}, {1.5}, {1.5'})
    # or W+ ≤ 1.5 (the same 3 mirrored): 6/32 = 0.1875.
    assert wilcoxon_exact_p([0, 1, -1, 2, 2, 3]) == pytest.approx(0.1875)
    assert wilcoxon_exact_p([0.0, 0.0]) == 1.0
    assert wilcoxon_exact_p([]) == 1.0
    # Differences of percentages carry float noise (0.3000000000000007 vs 0.29999999999999716):
    # still one tie, as [0.3, 0.3, 0.5] would be.
    noisy = [40.5 - 40.2, 41.0 - 40.7, 0.5]
    assert wilcoxon_exact_p(noisy) == wilcoxon_exact_p([0.3, 0.3, 0.5]) == pytest.approx(0.25)


def _brute_force_wilcoxon(diffs):
    """The definition itself: list all 2^m sign assignments over average ranks."""
    d = [x for x in diffs if x != 0]
    absd = sorted(abs(x) for x in d)
    rank = {v: (absd.index(v) + 1 + len(absd) - absd[::-1].index(v)) / 2 for v in absd}
    r = [rank[abs(x)] for x in d]
    mean = sum(r) / 2
    obs = abs(sum(ri for ri, x in zip(r, d) if x > 0) - mean)
    hits = sum(abs(sum(ri for ri, s in zip(r, signs) if s) - mean) >= obs - 1e-9
               for signs in itertools.product((0, 1), repeat=len(d)))
    return min(1.0, hits / 2 ** len(d))


def test_wilcoxon_matches_full_enumeration_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(40):
        d = rng.integers(-3, 4, size=int(rng.integers(1, 9))).astype(float)
        assert wilcoxon_exact_p(d) == pytest.approx(_brute_force_wilcoxon(d), abs=1e-12), d


def test_wilcoxon_refuses():
    with pytest.raises(ValueError, match="limit"):
        wilcoxon_exact_p(np.arange(1, WILCOXON_MAX_M + 2))
    with pytest.raises(ValueError, match="finite"):
        wilcoxon_exact_p([1.0, math.nan])


def test_paired_t_closed_forms():
    # [1, 2, 3]: mean 2, sd 1, se 1/√3, t = 2√3 = 3.4641; with 2 dof the t CDF is closed-form,
    # p = 1 - t/√(t²+2) = 1 - 3.4641/√14 = 0.0742.
    t, p = paired_t([1, 2, 3])
    assert t == pytest.approx(2 * math.sqrt(3))
    assert p == pytest.approx(1 - t / math.sqrt(t * t + 2)) and p == pytest.approx(0.0742, abs=1e-4)
    # [1, 3]: mean 2, sd √2, se 1, t = 2; 1 dof is Cauchy: p = 1 - (2/π)·atan 2 = 0.2952.
    t, p = paired_t([1, 3])
    assert t == pytest.approx(2.0) and p == pytest.approx(1 - 2 / math.pi * math.atan(2))
    t, p = paired_t([-1, -2, -3])
    assert t == pytest.approx(-2 * math.sqrt(3)) and p == pytest.approx(0.0742, abs=1e-4)


@pytest.mark.parametrize("t, dof, p", [(2.228, 10, 0.05), (2.776, 4, 0.05), (3.169, 10, 0.01),
                                       (12.706, 1, 0.05), (2.042, 30, 0.05), (1.96, 10**6, 0.05)])
def test_t_p_against_published_critical_values(t, dof, p):
    # Two-sided critical values of Student's t (standard tables, 3 decimals).
    assert _t_two_sided_p(t, dof) == pytest.approx(p, abs=2e-4)


def test_paired_t_degenerate():
    assert all(math.isnan(v) for v in paired_t([1.0]))
    assert all(math.isnan(v) for v in paired_t([0.0, 0.0, 0.0]))
    assert paired_t([2.0, 2.0]) == (math.inf, 0.0)
    assert paired_t([-0.5, -0.5, -0.5]) == (-math.inf, 0.0)
    # Float noise is not a spread: these are both 0.3.
    assert paired_t([40.5 - 40.2, 41.0 - 40.7]) == (math.inf, 0.0)


def test_bootstrap_deterministic_and_contains_mean():
    d = [0.9, 0.5, 1.2, 0.4, 0.8, 1.0, -0.2, 0.7]
    lo, hi = bootstrap_ci(d, seed=3)
    assert bootstrap_ci(d, seed=3) == (lo, hi)
    assert bootstrap_ci(d, seed=4) != (lo, hi)
    assert lo < np.mean(d) < hi and min(d) <= lo and hi <= max(d)
    assert bootstrap_ci(d, seed=3, level=0.5)[0] > lo  # a narrower level, a narrower interval


def test_bootstrap_by_hand():
    # [0, 1]: resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the 2.5% and
    # 97.5% quantiles are 0 and 1, and the 30% and 70% ones both 0.5.
    assert bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    assert bootstrap_ci([0.0, 1.0], level=0.4) == (0.5, 0.5)
    assert bootstrap_ci([2.5]) == (2.5, 2.5)
    for kwargs in [{"level": 1.0}, {"level": 0.0}, {"n_boot": 0}]:
        with pytest.raises(ValueError):
            bootstrap_ci([1.0, 2.0], **kwargs)
    with pytest.raises(ValueError):
        bootstrap_ci([])


A = [41.2, 40.9, 41.5, 40.8, 41.0, 41.3, 40.7, 41.1]
KEYS = {"a", "b", "n", "paired_diff_mean", "paired_diff_se", "ci95", "t", "t_p", "wilcoxon_p",
        "wins", "losses", "ties", "verdict", "significant"}


def test_paired_comparison_distinguishable():
    diffs = [0.9, 0.5, 1.2, 0.4, 0.8, 1.0, -0.2, 0.7]
    r = paired_comparison(A, [x - d for x, d in zip(A, diffs)], name_a="searched", name_b="random")
    assert set(r) == KEYS and json.loads(json.dumps(r)) == r
    assert (r["a"], r["b"], r["n"], r["wins"], r["losses"], r["ties"]) == ("searched", "random", 8, 7, 1, 0)
    # mean 5.3/8 = 0.6625; sd 0.43405 -> se 0.15346; t = 0.6625/0.15346 = 4.3172 (7 dof, p 0.0035).
    assert r["paired_diff_mean"] == pytest.approx(0.6625)
    assert r["paired_diff_se"] == pytest.approx(0.1535, abs=1e-4)
    assert r["t"] == pytest.approx(4.3172, abs=1e-4) and r["t_p"] == pytest.approx(0.003492, abs=1e-5)
    # One negative difference, the smallest |d| (rank 1): W- = 1, 4 of 256 assignments -> 1/64.
    assert r["wilcoxon_p"] == pytest.approx(0.01562, abs=1e-5)
    lo, hi = r["ci95"]
    assert 0 < lo < 0.6625 < hi
    assert r["verdict"] == (f"searched \u2212 random = +0.66 [+{lo:.2f}, +{hi:.2f}] points, paired, "
                            "n = 8, Wilcoxon p = 0.016, wins 7/8")
    assert r["significant"] is True


def test_all_wins_at_four_seeds_is_not_significant():
    # 4/4 wins: the bootstrap interval is above 0, but the exact Wilcoxon p is 2/16 = 0.125.
    r = paired_comparison([41.0, 40.0, 42.0, 43.0], [40.5, 39.0, 41.2, 42.9], name_a="searched", name_b="random")
    assert r["ci95"][0] > 0 and r["wilcoxon_p"] == pytest.approx(0.125)
    assert r["significant"] is False
    assert r["verdict"].endswith("wins 4/4, but Wilcoxon p = 0.12 ≥ 0.05: not distinguishable at this scale")


def test_paired_comparison_not_distinguishable():
    diffs = [0.9, -0.5, 1.2, -0.4, 0.8, -1.0, 0.2, -0.7]
    r = paired_comparison(A, [x - d for x, d in zip(A, diffs)], name_a="searched", name_b="random")
    lo, hi = r["ci95"]
    assert lo < 0 < hi and (r["wins"], r["losses"]) == (4, 4)
    assert r["verdict"] == (f"searched \u2212 random = +0.06 [\u2212{-lo:.2f}, +{hi:.2f}] points, "
                            "paired, n = 8: not distinguishable at this scale")


def test_paired_comparison_small_and_refusals():
    r = paired_comparison([41.2], [40.5], name_a="searched", name_b="random")
    assert set(r) == KEYS and r["verdict"] == "searched \u2212 random = +0.70 points, n = 1: no test"
    assert r["ci95"] is r["t"] is r["wilcoxon_p"] is None and r["wins"] == 1
    same = paired_comparison([41.0, 40.0], [41.0, 40.0], name_a="x", name_b="y")
    assert same["ties"] == 2 and same["t"] is None and same["wilcoxon_p"] == 1.0
    assert same["verdict"].endswith("not distinguishable at this scale")
    with pytest.raises(ValueError, match="same seeds"):
        paired_comparison([1.0, 2.0], [1.0], name_a="x", name_b="y")
    with pytest.raises(ValueError):
        paired_comparison([], [], name_a="x", name_b="y")
    with pytest.raises(ValueError, match="finite"):
        paired_comparison([1.0, math.nan], [1.0, 2.0], name_a="x", name_b="y")


def test_mcnemar_known_counts():
    # b = 10, c = 2: P(X ≤ 2), X ~ Bin(12, 1/2) = (1 + 12 + 66)/4096 = 79/4096; p = 2·that = 0.0386.
    labels = np.zeros(20, dtype=np.int64)
    pred_a = np.array([0] * 10 + [1] * 2 + [0] * 5 + [3] * 3)
    pred_b = np.array([1] * 10 + [0] * 2 + [0] * 5 + [2] * 3)
    r = mcnemar_exact(pred_a, pred_b, labels)
    assert r == {"a_only": 10, "b_only": 2, "p": pytest.approx(79 / 2048), "n_images": 20}
    assert r["p"] == pytest.approx(0.0386, abs=1e-4)
    # Swapping the networks swaps the counts, not p; b = c gives p = 1; no discordant image, 1.
    assert mcnemar_exact(pred_b, pred_a, labels)["p"] == r["p"]
    assert mcnemar_exact(pred_a, pred_a, labels) == {"a_only": 0, "b_only": 0, "p": 1.0, "n_images": 20}
    # b = 0, c = 5: 2·(1/32) = 0.0625.
    assert mcnemar_exact(np.ones(5, int), np.zeros(5, int), np.zeros(5, int))["p"] == pytest.approx(0.0625)
    with pytest.raises(ValueError, match="lengths"):
        mcnemar_exact(pred_a[:-1], pred_b, labels)


def test_kendall_exact():
    # Pairs of y = [3, 1, 2, 5, 4]: discordant (3,1), (3,2), (5,4); 7 of 10 concordant:
    # tau = (7 - 3)/10 = 0.4. S = 10 - 2·inversions, 3 inversions; |S| ≥ 4 <=> ≤ 3 or ≥ 7
    # inversions: Mahonian numbers for n = 5 are 1 4 9 15 20 22 20 15 9 4 1, so (29 + 29)/120.
    r = kendall_tau([1, 2, 3, 4, 5], [3, 1, 2, 5, 4])
    assert r == {"tau": pytest.approx(0.4), "p": pytest.approx(58 / 120), "n": 5, "method": "exact"}
    # Identical rankings of 4: only the identity and the reversal are as extreme: 2/24.
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40])["p"] == pytest.approx(2 / 24)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1])["tau"] == pytest.approx(-1.0)


def test_kendall_ties_normal():
    # x = [1, 2, 2, 3], y = [1, 2, 3, 3]: of 6 pairs one is tied in x, one in y, 4 concordant,
    # 0 discordant: tau-b = 4/√(5·5) = 0.8. var(S) = (4·3·13 - 2·1·9 - 2·1·9)/18 + (2·2)/(2·4·3)
    # = 6.6667 + 0.1667 = 6.8333 (the t(t-1)(t-2) term is 0 for pairs); z = 4/√6.8333 = 1.5302,
    # two-sided p = 2·(1 - Φ(1.5302)) = 0.1260.
    r = kendall_tau([1, 2, 2, 3], [1, 2, 3, 3])
    assert r["method"] == "normal" and r["tau"] == pytest.approx(0.8)
    assert r["p"] == pytest.approx(math.erfc(4 / math.sqrt(41 / 6) / math.sqrt(2)))
    assert r["p"] == pytest.approx(0.1260, abs=1e-4)


def test_kendall_degenerate_and_refusal():
    assert kendall_tau([1.0], [2.0]) == {"tau": None, "p": None, "n": 1, "method": "undefined"}
    assert kendall_tau([1, 1, 1], [1, 2, 3])["method"] == "undefined"
    with pytest.raises(ValueError):
        kendall_tau([1, 2, 3], [1, 2])
