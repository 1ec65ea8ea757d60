"""Estimated vs measured wall time, per run: how good ``bench.plan``'s estimates were.

Each run records what ``bench.plan`` estimated for it when it started (tags ``plan/est_train_s``,
``plan/est_eval_s`` and ``plan/source``: the measured ``bench.perf`` record the rate came from, or
the assumed peak x utilisation) and what it measured (metrics ``budget/train_wall_s``, summed over
every start that trained, and ``budget/eval_wall_s``, over every start that evaluated). The ratio

    measured / estimated

is the factor to scale the next plan by: 1 is exact, 2 means the job took twice the estimate. A
run resumed after a stop re-records its estimate at each start; training estimates are always
of the whole training (a resumed run sums its measured training too), evaluation estimates of
every budget (an upper bound when some were reused). Runs from before estimates were recorded
have none and are counted, not guessed.
"""

from __future__ import annotations

import math

import pandas as pd

#: ``(estimate column, measured column, label)`` per phase, in the order they are printed.
PHASES = (("est_train_s", "train_wall_s", "training"), ("est_eval_s", "eval_wall_s", "evaluation"))


def _seconds(v) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return math.nan
    return x if math.isfinite(x) and x >= 0 else math.nan


def duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def ratio(measured: float, estimated: float) -> float:
    if not (math.isfinite(measured) and math.isfinite(estimated)) or estimated <= 0:
        return math.nan
    return measured / estimated


def estimate_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per finished run that recorded an estimate: its label, per phase the estimate,
    the measurement and their ratio (NaN where either is missing), and the estimate's source."""
    rows = []
    for _, r in runs.iterrows():
        if r.get("status") != "FINISHED":
            continue  # a failed or running job's time is not the job's cost
        est = {e: _seconds(r.get(e)) for e, _, _ in PHASES}
        if all(math.isnan(v) for v in est.values()):
            continue
        row = {"run": r.get("run_name") or r.get("run_id"), "method": r.get("method")}
        row |= {"size": r.get("size"), "seed": r.get("seed")}
        for e, m, label in PHASES:
            measured = _seconds(r.get(m))
            row[f"{label} estimated s"] = est[e]
            row[f"{label} measured s"] = measured
            row[f"{label} measured/estimated"] = ratio(measured, est[e])
        row["source"] = r.get("est_source") or ""
        rows.append(row)
    return pd.DataFrame(rows)


def summary(frame: pd.DataFrame, runs: pd.DataFrame) -> list[str]:
    """One sentence per phase (the median ratio and its range over the runs that have both
    numbers), and one naming the finished runs without an estimate."""
    out = []
    for _, _, label in PHASES:
        r = frame[f"{label} measured/estimated"].dropna() if not frame.empty else pd.Series()
        if r.empty:
            continue
        out.append(
            f"{label}: measured/estimated median {r.median():.2f}x over {len(r)} run(s) "
            f"(range {r.min():.2f}x to {r.max():.2f}x)"
        )
    finished = int((runs["status"] == "FINISHED").sum()) if "status" in runs else 0
    missing = finished - len(frame)
    if missing > 0:
        out.append(f"{missing} finished run(s) recorded no estimate (started before bench.plan)")
    return out


def table(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` for reading: durations as ``12 s`` / ``3.5 min`` / ``1.20 h``, ratios as ``0.85x``."""
    shown = frame.copy()
    for _, _, label in PHASES:
        for what in ("estimated", "measured"):
            shown[f"{label} {what} s"] = shown[f"{label} {what} s"].map(duration)
        shown[f"{label} measured/estimated"] = shown[f"{label} measured/estimated"].map(
            lambda x: "-" if not math.isfinite(x) else f"{x:.2f}x"
        )
    return shown.rename(columns=lambda c: c.replace(" s", "") if c.endswith(" s") else c)
