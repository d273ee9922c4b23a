"""Statistics for comparing networks in ablation studies (stdlib + numpy; no torch, no scipy).

Seeds are paired: run ``i`` of network A and run ``i`` of network B share a seed, so the unit of
comparison is the per-seed difference ``a[i] - b[i]``. ``paired_comparison`` reports it with a
bootstrap interval, a paired t test, an exact Wilcoxon signed-rank test and the win count, and a
one-line verdict. ``mcnemar_exact`` compares two networks image by image on one test set,
``binomial_se`` gives the sampling error of a single top-1, ``kendall_tau`` compares rankings.

Exact tests count the null distribution by dynamic programming over the ranks instead of
listing every sign assignment or permutation: the counts (hence p) are the same as a full
enumeration's, at polynomial cost.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Exact Wilcoxon works in doubled ranks (integers) whose total is m(m+1): the DP costs O(m^3).
WILCOXON_MAX_M = 500
# Kendall's exact null (no ties) is used up to this n, as scipy's kendalltau(method="auto") does.
KENDALL_EXACT_MAX_N = 33
# |d| are compared for ties at 12 significant digits: 40.5-40.2 and 41.0-40.7 differ in float noise.
_TIE_DIGITS = 12
_MINUS = "\u2212"


# The level of every two-sided test in a verdict.
ALPHA = 0.05

def _as_finite(values: Sequence[float], what: str) -> np.ndarray:
    """``values`` as a 1-D float array; refuses NaN / inf (a missing run is not a number)."""
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D sequence, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}: values must be finite")
    return arr


def binomial_se(top1_percent: float, n_images: int) -> float:
    """Standard error, in percentage points, of a top-1 measured on ``n_images``: 100·√(p(1−p)/n)."""
    if n_images <= 0:
        raise ValueError(f"n_images must be positive, got {n_images}")
    if not 0.0 <= top1_percent <= 100.0:
        raise ValueError(f"top1_percent must be in [0, 100], got {top1_percent}")
    p = top1_percent / 100.0
    return 100.0 * math.sqrt(p * (1.0 - p) / n_images)


def _doubled_ranks(abs_values: np.ndarray) -> np.ndarray:
    """2 × the average ranks (1-based) of ``abs_values``: integers even when ties share a rank."""
    keys = [float(f"{v:.{_TIE_DIGITS}g}") for v in abs_values]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    ranks = np.zeros(len(keys), dtype=np.int64)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and keys[order[j + 1]] == keys[order[i]]:
            j += 1
        # Positions i..j (0-based) share the average rank ((i+1)+(j+1))/2; doubled: i+j+2.
        for k in range(i, j + 1):
            ranks[order[k]] = i + j + 2
        i = j + 1
    return ranks


def wilcoxon_exact_p(diffs: Sequence[float]) -> float:
    """Two-sided exact Wilcoxon signed-rank p of paired differences (zeros dropped, ties averaged).

    Under the null each nonzero difference is + or − with probability 1/2 independently; over
    those 2^m equally likely sign assignments p = P(|W+ − E| ≥ |w+ − E|), E = (sum of ranks)/2.
    This is 2·min(lower, upper tail) capped at 1 (the null is symmetric), as in scipy's exact
    test, but conditional on the observed tied ranks. Zeros are dropped before ranking (Wilcoxon's
    method, scipy's ``zero_method="wilcox"``); no nonzero difference gives 1.0. More than
    ``WILCOXON_MAX_M`` nonzero differences raise ValueError (no normal approximation here).
    """
    d = _as_finite(diffs, "diffs")
    d = d[d != 0.0]
    m = len(d)
    if m == 0:
        return 1.0
    if m > WILCOXON_MAX_M:
        raise ValueError(f"exact Wilcoxon over {m} nonzero differences (the limit is {WILCOXON_MAX_M})")
    ranks = _doubled_ranks(np.abs(d))
    total = int(ranks.sum())
    # dist[s] = P(sum of doubled ranks of the positive differences == s), built one rank at a time.
    dist = np.zeros(total + 1)
    dist[0] = 1.0
    for r in ranks:
        shifted = np.zeros_like(dist)
        shifted[r:] = dist[: total + 1 - r]
        dist = 0.5 * (dist + shifted)
    observed = int(ranks[d > 0].sum())
    deviation = np.abs(2 * np.arange(total + 1) - total)
    p = float(dist[deviation >= abs(2 * observed - total)].sum())
    return min(1.0, p)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes §6.4)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    dd = 1.0 - qab * x / qap
    dd = 1.0 / (dd if abs(dd) > tiny else tiny)
    h = dd
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        dd = 1.0 + aa * dd
        dd = 1.0 / (dd if abs(dd) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= dd * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        dd = 1.0 + aa * dd
        dd = 1.0 / (dd if abs(dd) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = dd * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def _betainc(a: float, b: float, x: float, y: float) -> float:
    """Regularized incomplete beta I_x(a, b); ``y`` = 1 − x, passed in so it keeps its precision."""
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log(y))
    front = math.exp(log_front)
    # The continued fraction converges fast only on this side; use the symmetry I_x(a,b) = 1 − I_{1−x}(b,a).
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, y) / b


def _t_two_sided_p(t: float, dof: float) -> float:
    """P(|T| ≥ |t|) for Student's t with ``dof`` degrees of freedom: I_{ν/(ν+t²)}(ν/2, 1/2)."""
    if math.isinf(t):
        return 0.0
    return min(1.0, _betainc(dof / 2.0, 0.5, dof / (dof + t * t), t * t / (dof + t * t)))


def paired_t(diffs: Sequence[float]) -> tuple[float, float]:
    """Paired t statistic of ``diffs`` (mean / (sd/√n), sd with n−1) and its two-sided p (n−1 dof).

    Degenerate inputs: n < 2 gives (nan, nan); zero variance gives (±inf, 0.0) for a nonzero mean
    and (nan, nan) when every difference is 0. A spread below 1e-12 of the largest |d| counts as
    zero (float noise from subtracting percentages, not a measured spread).
    """
    d = _as_finite(diffs, "diffs")
    n = len(d)
    if n < 2:
        return math.nan, math.nan
    mean = float(d.mean())
    sd = float(d.std(ddof=1))
    scale = float(np.abs(d).max())
    if sd <= 1e-12 * scale:
        if abs(mean) <= 1e-12 * scale:
            return math.nan, math.nan
        return math.copysign(math.inf, mean), 0.0
    t = mean / (sd / math.sqrt(n))
    return t, _t_two_sided_p(t, n - 1)


def bootstrap_ci(diffs: Sequence[float], *, seed: int = 0, n_boot: int = 10000,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``diffs``; the same seed gives the same interval.

    Resamples ``n_boot`` times with replacement (numpy ``Generator(PCG64(seed))``) and takes the
    (1−level)/2 and (1+level)/2 quantiles (linear interpolation) of the resampled means. With few
    seeds it is optimistic: n all-positive differences always give an interval above 0.
    """
    d = _as_finite(diffs, "diffs")
    if len(d) == 0:
        raise ValueError("bootstrap_ci needs at least one difference")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    rng = np.random.Generator(np.random.PCG64(seed))
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


def _r4(x: float) -> float | None:
    """4 decimals for JSON; nan / inf (an undefined statistic) become None."""
    return round(float(x), 4) if math.isfinite(x) else None


def _p4(p: float) -> float | None:
    """4 significant digits (a p of 3e-6 must not round to 0); nan becomes None."""
    return float(f"{p:.4g}") if math.isfinite(p) else None


def _signed(x: float) -> str:
    """``+0.71`` / ``−0.40`` (typographic minus), 2 decimals; a value rounding to 0 shows as +0.00."""
    r = round(x, 2)
    return f"{_MINUS if r < 0 else '+'}{abs(r):.2f}"


def _p_text(p: float) -> str:
    """p at 2 significant digits (0.02, 0.0078), '< 0.001' below that."""
    return "< 0.001" if p < 0.001 else f"= {p:.2g}"


def paired_comparison(a: Sequence[float], b: Sequence[float], *, name_a: str, name_b: str,
                      seed: int = 0) -> dict:
    """Compare per-seed values ``a`` and ``b`` (same seed order) through their differences a − b.

    Keys: ``a``, ``b`` (names), ``n``, ``paired_diff_mean``, ``paired_diff_se`` (sd/√n),
    ``ci95`` ([lo, hi], percentile bootstrap, ``seed``), ``t``, ``t_p``, ``wilcoxon_p``, ``wins``
    (a > b), ``losses``, ``ties``, ``verdict``. Undefined statistics are None (n = 1: se, ci95, t,
    t_p and wilcoxon_p; zero spread: t is None when every difference is 0). The verdict gives the
    interval and, when it excludes 0, the Wilcoxon p and the wins; otherwise it says the two are
    not distinguishable at this scale.
    """
    va = _as_finite(a, name_a)
    vb = _as_finite(b, name_b)
    if len(va) != len(vb):
        raise ValueError(f"{name_a} has {len(va)} values and {name_b} {len(vb)}: pairs need the same seeds")
    n = len(va)
    if n == 0:
        raise ValueError("paired_comparison needs at least one pair")
    d = va - vb
    mean = float(d.mean())
    wins, losses = int((va > vb).sum()), int((va < vb).sum())
    label = f"{name_a} {_MINUS} {name_b}"
    result: dict = {"a": name_a, "b": name_b, "n": n, "paired_diff_mean": _r4(mean),
                    "paired_diff_se": None, "ci95": None, "t": None, "t_p": None,
                    "wilcoxon_p": None, "wins": wins, "losses": losses, "ties": n - wins - losses}
    if n < 2:
        result["verdict"] = f"{label} = {_signed(mean)} points, n = 1: no test"
        result["significant"] = False
        return result
    lo, hi = bootstrap_ci(d, seed=seed, level=0.95)
    t, t_p = paired_t(d)
    w_p = wilcoxon_exact_p(d)
    result.update(paired_diff_se=_r4(float(d.std(ddof=1)) / math.sqrt(n)), ci95=[_r4(lo), _r4(hi)],
                  t=_r4(t), t_p=_p4(t_p), wilcoxon_p=_p4(w_p))
    head = f"{label} = {_signed(mean)} [{_signed(lo)}, {_signed(hi)}] points, paired, n = {n}"
    # "Distinguishable" needs both the interval and the exact test: with few seeds every win gives a
    # bootstrap interval above 0, while the smallest possible Wilcoxon p is 2 / 2^n (0.125 at n = 4).
    if (lo > 0.0 or hi < 0.0) and w_p < ALPHA:
        result["verdict"] = f"{head}, Wilcoxon p {_p_text(w_p)}, wins {wins}/{n}"
    elif lo > 0.0 or hi < 0.0:
        result["verdict"] = (f"{head}, wins {wins}/{n}, but Wilcoxon p {_p_text(w_p)} ≥ {ALPHA:g}: "
                             "not distinguishable at this scale")
    else:
        result["verdict"] = f"{head}: not distinguishable at this scale"
    result["significant"] = bool((lo > 0.0 or hi < 0.0) and w_p < ALPHA)
    return result


def _binom_half_cdf(k: int, n: int) -> float:
    """P(X ≤ k) for X ~ Bin(n, 1/2), exact in integers (one rounding, at the division)."""
    term, total = 1, 0
    for i in range(k + 1):
        total += term
        term = term * (n - i) // (i + 1)
    return total / (1 << n)


def mcnemar_exact(pred_a, pred_b, labels) -> dict:
    """Exact McNemar test of two networks' predictions on the same images.

    b = images A gets right and B wrong (``a_only``), c = the reverse (``b_only``); two-sided
    p = min(1, 2·P(X ≤ min(b, c))), X ~ Bin(b + c, 1/2); p = 1.0 when b + c = 0.
    Returns {"a_only", "b_only", "p", "n_images"}.
    """
    pa, pb, y = (np.asarray(x) for x in (pred_a, pred_b, labels))
    if pa.ndim != 1 or pb.ndim != 1 or y.ndim != 1:
        raise ValueError("predictions and labels must be 1-D arrays")
    if not len(pa) == len(pb) == len(y):
        raise ValueError(f"lengths differ: pred_a {len(pa)}, pred_b {len(pb)}, labels {len(y)}")
    right_a, right_b = pa == y, pb == y
    b = int((right_a & ~right_b).sum())
    c = int((~right_a & right_b).sum())
    p = min(1.0, 2.0 * _binom_half_cdf(min(b, c), b + c)) if b + c else 1.0
    return {"a_only": b, "b_only": c, "p": p, "n_images": int(len(y))}


def _tie_sums(values: np.ndarray) -> tuple[int, int, int]:
    """Σ t(t−1), Σ t(t−1)(t−2), Σ t(t−1)(2t+5) over groups of t equal values."""
    _, counts = np.unique(values, return_counts=True)
    t = counts.astype(np.int64)
    return int((t * (t - 1)).sum()), int((t * (t - 1) * (t - 2)).sum()), int((t * (t - 1) * (2 * t + 5)).sum())


def _inversion_counts(n: int) -> list[int]:
    """Number of permutations of n items with k inversions, k = 0..n(n−1)/2 (Mahonian numbers)."""
    counts = [1]
    for m in range(2, n + 1):
        # Inserting item m adds 0..m−1 inversions: a sliding-window sum of width m.
        new = [0] * (len(counts) + m - 1)
        window = 0
        for k in range(len(new)):
            window += counts[k] if k < len(counts) else 0
            window -= counts[k - m] if 0 <= k - m < len(counts) else 0
            new[k] = window
        counts = new
    return counts


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> dict:
    """Kendall's tau-b of x and y (ties handled) with a two-sided p.

    ``method`` says which p: "exact" (no ties and n ≤ KENDALL_EXACT_MAX_N: the permutation null,
    counted by inversions, p = P(|S| ≥ |s|)), or "normal" (z = S/√var(S) with the tie-corrected
    variance, no continuity correction; as scipy's kendalltau). n < 2 or a constant x or y: tau
    and p are None, method "undefined".
    """
    vx = _as_finite(x, "x")
    vy = _as_finite(y, "y")
    if len(vx) != len(vy):
        raise ValueError(f"x has {len(vx)} values and y {len(vy)}")
    n = len(vx)
    undefined = {"tau": None, "p": None, "n": n, "method": "undefined"}
    if n < 2:
        return undefined
    sx = np.sign(vx[:, None] - vx[None, :])
    sy = np.sign(vy[:, None] - vy[None, :])
    upper = np.triu_indices(n, 1)
    s = int((sx * sy)[upper].sum())  # concordant − discordant pairs
    pairs = n * (n - 1) // 2
    tx1, tx2, tx3 = _tie_sums(vx)
    ty1, ty2, ty3 = _tie_sums(vy)
    n_x, n_y = pairs - tx1 // 2, pairs - ty1 // 2  # pairs not tied in x, in y
    if n_x == 0 or n_y == 0:
        return undefined
    tau = s / math.sqrt(n_x * n_y)
    if tx1 == 0 and ty1 == 0 and n <= KENDALL_EXACT_MAX_N:
        counts = _inversion_counts(n)
        # S = pairs − 2·inversions; count permutations at least as far from 0 as observed.
        hit = sum(c for k, c in enumerate(counts) if abs(pairs - 2 * k) >= abs(s))
        p, method = min(1.0, hit / math.factorial(n)), "exact"
    else:
        var = ((n * (n - 1) * (2 * n + 5) - tx3 - ty3) / 18.0
               + tx1 * ty1 / (2.0 * n * (n - 1))
               + (tx2 * ty2 / (9.0 * n * (n - 1) * (n - 2)) if n > 2 else 0.0))
        p = math.erfc(abs(s) / math.sqrt(var) / math.sqrt(2.0)) if var > 0 else math.nan
        method = "normal"
    return {"tau": tau, "p": min(1.0, p) if math.isfinite(p) else None, "n": n, "method": method}


__all__ = ["KENDALL_EXACT_MAX_N", "WILCOXON_MAX_M", "binomial_se", "bootstrap_ci", "kendall_tau",
           "mcnemar_exact", "paired_comparison", "paired_t", "wilcoxon_exact_p"]
