"""Interleaved rounds: timings on a shared, noisy machine that a burst of load cannot skew.

Timing rows one after another (A A A, B B B, C C C) lets a burst of load from another process land
on one row: on a shared 2-core machine that once printed a shortcut/flow-matching step-time ratio
of 11.6 (the FLOP ratio is 1.17). ``bench.perf`` therefore times its rows in rounds,
A B C, A B C, ..., and summarises them robustly:

* a row's time is the **median** over rounds, with its **spread** = IQR / median (the
  interquartile range, 75th minus 25th percentile, relative to the median);
* a ratio between two rows is the **median of the per-round ratios** (paired rounds): a burst that
  slows one round slows both rows of that round's pair alike, or, if it hits only one of them, moves
  one per-round ratio, which the median ignores;
* a row or ratio whose spread exceeds a threshold is **flagged** as too noisy to trust, never
  silently printed as if it were.

The clock is passed in (``interleave(timers, rounds)``: each timer returns the seconds of its own
block), so the scheduling and the statistics are tested with a fake clock, never with timings.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass


def interleave(
    timers: Mapping[str, Callable[[int], float]], rounds: int
) -> tuple[dict[str, list[float]], dict[str, BaseException]]:
    """Seconds of each timer's block in each round, calling the timers in rounds A B C, A B C, ...

    ``timers[name](round)`` runs and times one block of that row and returns its seconds. A timer
    that raises is dropped from the remaining rounds and its exception returned in the second
    dict, so one failing row (e.g. out of memory) does not cost the others their samples."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: need >= 1")
    out: dict[str, list[float]] = {name: [] for name in timers}
    failed: dict[str, BaseException] = {}
    for r in range(rounds):
        for name, timer in timers.items():
            if name in failed:
                continue
            try:
                out[name].append(float(timer(r)))
            except Exception as e:  # noqa: BLE001 -- reported per row by the caller
                failed[name] = e
    return out, failed


def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default, 'linear'), without numpy."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass(frozen=True)
class Summary:
    """Median and relative spread of one row's (or one ratio's) per-round values."""

    median: float
    spread: float  # IQR / median; 0 with a single round (no spread measurable)
    n: int

    def noisy(self, max_spread: float) -> bool:
        return self.spread > max_spread


def summary(xs: list[float]) -> Summary:
    if not xs:
        raise ValueError("no samples to summarise")
    med = statistics.median(xs)
    iqr = quantile(xs, 0.75) - quantile(xs, 0.25)
    return Summary(med, iqr / abs(med) if med else float("inf"), len(xs))


def paired_ratio(a: list[float], b: list[float]) -> Summary:
    """Median (and spread) of the per-round ratios ``a[r] / b[r]``: both rows timed in round r."""
    if len(a) != len(b):
        raise ValueError(f"paired rounds need equal counts, got {len(a)} and {len(b)}")
    return summary([x / y for x, y in zip(a, b, strict=True)])
