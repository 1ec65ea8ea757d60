"""The shortcut paper's comparison table: a row per method (per dataset and size), a column per
step budget, mean +- spread over seeds, the best value per column marked, budget columns beside,
and every empty cell saying why (failed with its reason, running, or not measured).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from reports.collect import Collected

HIGHER_IS_BETTER = ("precision", "recall", "density", "coverage")
ROW_KEYS = ("data", "size", "method")


def lower_is_better(metric: str) -> bool:
    return metric.split("/")[0] not in HIGHER_IS_BETTER


@dataclass
class Table:
    metric: str
    mean: pd.DataFrame  # rows x steps, NaN where missing
    spread: pd.DataFrame  # sample std over seeds (NaN for one seed)
    count: pd.DataFrame  # seeds per cell
    status: pd.DataFrame  # "" or why the cell is empty
    budget: pd.DataFrame  # rows x [train fwd-equivalents, train wall s, NFE note]
    best: dict  # steps -> row label of the best mean

    def cell(self, row, steps, fmt: str = "{:.2f}") -> tuple[str, bool]:
        """Text of one cell and whether it is the column's best."""
        if pd.isna(self.mean.loc[row, steps]):
            return self.status.loc[row, steps] or "not measured", False
        text = fmt.format(self.mean.loc[row, steps])
        if self.count.loc[row, steps] > 1:
            text += " ± " + fmt.format(self.spread.loc[row, steps])
        return text, self.best.get(steps) == row


def comparison(c: Collected, metric: str, row_keys: tuple[str, ...] = ROW_KEYS) -> Table:
    runs = c.runs.copy()
    runs["row"] = runs[list(row_keys)].astype(str).agg(" / ".join, axis=1)
    values = c.tidy[c.tidy["metric"] == metric].merge(runs[["run_id", "row"]], on="run_id")
    steps = sorted(values["steps"].unique().tolist())
    rows = sorted(runs["row"].unique().tolist())
    grouped = values.groupby(["row", "steps"])["value"]
    mean = grouped.mean().unstack().reindex(index=rows, columns=steps)
    spread = grouped.std(ddof=1).unstack().reindex(index=rows, columns=steps)
    count = grouped.count().unstack().reindex(index=rows, columns=steps).fillna(0).astype(int)

    status = pd.DataFrame("", index=rows, columns=steps, dtype=object)
    for row in rows:
        mine = runs[runs["row"] == row]
        failed = mine[mine["status"] == "FAILED"]
        running = mine[mine["status"] == "RUNNING"]
        for s in steps:
            if pd.notna(mean.loc[row, s]):
                continue
            if len(failed):
                status.loc[row, s] = "failed: " + (failed["reason"].iloc[0] or "no reason logged")
            elif len(running):
                status.loc[row, s] = "running"
            else:
                status.loc[row, s] = "not measured"

    pick = np.nanargmin if lower_is_better(metric) else np.nanargmax
    best = {s: rows[int(pick(mean[s].to_numpy()))] for s in steps if mean[s].notna().any()}

    budget = (
        runs.groupby("row")
        .agg(
            train_samples=("train_samples", "mean"),
            forward_equivalents=("forward_equivalents", "mean"),
            train_wall_s=("train_wall_s", "mean"),
            runs=("run_id", "count"),
        )
        .reindex(rows)
    )
    nfe = (
        values.groupby(["row", "steps"])["nfe"].first().unstack().reindex(index=rows, columns=steps)
    )
    budget["NFE"] = [
        ", ".join(f"{s}:{int(n)}" for s, n in nfe.loc[r].items() if pd.notna(n) and n != s)
        or "= steps"
        for r in rows
    ]
    return Table(metric, mean, spread, count, status, budget, best)


def protocol_line(c: Collected, metric: str) -> str:
    """What every number in a table was measured with, from the runs' tags."""
    r = c.runs

    def uniq(col):  # noqa: E306
        vals = sorted({str(v) for v in r[col].dropna() if str(v)}) if col in r else []
        return " | ".join(vals) or "unknown"

    extractor = (
        uniq("fid_extractor")
        if metric.startswith("fid")
        else (f"{uniq('extractor')} (weights {uniq('extractor_hash')})")
    )
    return (
        f"metric: {metric} ({'lower' if lower_is_better(metric) else 'higher'} is better); "
        f"samples per budget: {uniq('num_samples')}; reference: {uniq('reference')}; "
        f"extractor: {extractor}"
    )


def _rows(t: Table, bold) -> pd.DataFrame:
    out = pd.DataFrame(index=t.mean.index)
    for s in t.mean.columns:
        cells = [t.cell(r, s) for r in t.mean.index]
        out[f"{s} step" + ("s" if s > 1 else "")] = [bold(x) if b else x for x, b in cells]
    fmt = lambda v: "" if pd.isna(v) else f"{v:,.0f}"  # noqa: E731
    out["train fwd-equiv."] = [fmt(v) for v in t.budget["forward_equivalents"]]
    out["train wall (s)"] = [fmt(v) for v in t.budget["train_wall_s"]]
    out["NFE"] = t.budget["NFE"].values
    out["seeds"] = [int(t.count.loc[r].max()) for r in t.mean.index]
    out.index.name = "data / size / method"
    return out


def to_markdown(t: Table) -> str:
    return _rows(t, lambda x: f"**{x}**").to_markdown()


def to_html(t: Table) -> str:
    return _rows(t, lambda x: f"<b>{x}</b>").to_html(escape=False, classes="comparison", border=0)


def to_latex(t: Table) -> str:
    def bold(x):
        return "\\textbf{" + x + "}"

    df = _rows(t, bold).map(lambda x: str(x).replace("±", "$\\pm$").replace("_", "\\_"))
    df.index = [str(i).replace("_", "\\_") for i in df.index]
    return df.to_latex(escape=False, caption=f"{t.metric} per step budget", label="tab:fewstep")
