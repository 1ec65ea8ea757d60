"""Uncertainty of a table cell and whether two cells differ.

A cell is one configuration (a seed group) at one step budget under one protocol: the values of
its n seeds x_1..x_n. It is shown as

- n >= 2: the mean and a 95% Student t-interval over seeds, mean +- t_{0.975, n-1} s / sqrt(n)
  (s the sample standard deviation): the training-seed and sample uncertainty together;
- n = 1: the value and, when the run logged them, the 95% bootstrap bounds of the metric over its
  generated samples (``<metric>/ci95_low|high/steps_N``): the sample uncertainty only.

Two cells are compared with Welch's t-test (unequal variances) over seeds when both have at least
two seeds; otherwise by whether their 95% intervals (t or bootstrap) overlap -- a conservative
test (disjoint 95% intervals imply a difference at well under 5%) -- and not at all when a cell
has no interval. The column's best mean is tested against every other cell; the Welch p-values of
one column are Holm-adjusted, so "significant" holds for the whole column at 5%.

Paired differences: every method samples from the same fixed noise (``eval.noise_seed``) and seed
s of one method is compared with seed s of the baseline, d_s = x_s - b_s; the mean difference gets
the t-interval of the d_s. Pairing removes the variance the two share (the noise, the data order).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05


@dataclass
class Cell:
    seeds: list[str]
    values: np.ndarray
    ci_low: float = float("nan")  # bootstrap bounds, one seed only
    ci_high: float = float("nan")

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.n else float("nan")

    @property
    def sd(self) -> float:
        return float(np.std(self.values, ddof=1)) if self.n > 1 else float("nan")

    @property
    def half_width(self) -> float:
        """Half-width of the 95% t-interval over seeds (NaN for one seed)."""
        return t_half_width(self.values)

    @property
    def interval(self) -> tuple[float, float, str]:
        """(low, high, kind): kind ``t`` over seeds, ``bootstrap`` over samples, or ``""``."""
        if self.n > 1:
            h = self.half_width
            return self.mean - h, self.mean + h, "t"
        if self.n == 1 and np.isfinite(self.ci_low) and np.isfinite(self.ci_high):
            return self.ci_low, self.ci_high, "bootstrap"
        return float("nan"), float("nan"), ""


def t_half_width(values, level: float = 0.95) -> float:
    values = np.asarray(values, dtype=float)
    n = len(values)
    if n < 2:
        return float("nan")
    return float(stats.t.ppf(0.5 + level / 2, n - 1) * values.std(ddof=1) / np.sqrt(n))


@dataclass
class Comparison:
    other: str  # row label of the cell compared with the best
    test: str  # "welch" | "intervals" | "" (untested)
    p: float = float("nan")  # Welch p (Holm-adjusted after ``mark``)
    different: bool | None = None  # None: not tested


def compare(best: Cell, other: Cell) -> tuple[str, float, bool | None]:
    """(test, p, different) of two cells; see the module docstring for the choice of test."""
    if best.n >= 2 and other.n >= 2:
        if best.sd == 0 and other.sd == 0:  # the t statistic is undefined; the values are exact
            same = best.mean == other.mean
            return "welch", 1.0 if same else 0.0, not same
        p = float(stats.ttest_ind(best.values, other.values, equal_var=False).pvalue)
        return "welch", p, None  # decided after the Holm adjustment
    (lo1, hi1, k1), (lo2, hi2, k2) = best.interval, other.interval
    if k1 and k2:
        return "intervals", float("nan"), bool(hi1 < lo2 or hi2 < lo1)
    return "", float("nan"), None


def holm(p: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (monotone, capped at 1)."""
    order = np.argsort(p)
    m, adjusted, running = len(p), [0.0] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def mark(cells: dict[str, Cell], lower_is_better: bool) -> tuple[dict[str, str], list[Comparison]]:
    """Marks of one column: ``win`` (the best mean, significantly better than every other cell),
    ``tie`` (the best and every cell not significantly different from it), ``untested`` (the best
    mean when some comparison had no interval and none was a tie)."""
    filled = {r: c for r, c in cells.items() if c.n}
    if not filled:
        return {}, []
    pick = min if lower_is_better else max
    best = pick(filled, key=lambda r: filled[r].mean)
    comparisons = []
    for r, c in filled.items():
        if r != best:
            test, p, different = compare(filled[best], c)
            comparisons.append(Comparison(r, test, p, different))
    welch = [c for c in comparisons if c.test == "welch" and c.different is None]
    for c, p in zip(welch, holm([c.p for c in welch]), strict=True):
        c.p, c.different = p, p < ALPHA
    if not comparisons:  # a column of one cell: nothing to rank
        return {}, []
    ties = [c.other for c in comparisons if c.different is False]
    if ties:
        return {r: "tie" for r in [best, *ties]}, comparisons
    if all(c.different for c in comparisons):
        return {best: "win"}, comparisons
    return {best: "untested"}, comparisons


def paired(values: dict[str, float], baseline: dict[str, float]) -> Cell:
    """The per-seed differences ``values[s] - baseline[s]`` over the seeds both have."""
    common = sorted(set(values) & set(baseline))
    return Cell(common, np.array([values[s] - baseline[s] for s in common], dtype=float))
