"""The shortcut paper's comparison table: a row per configuration (data / size / method, runs
differing only in seed pooled), a column per step budget and protocol, the mean and a 95%
interval per cell (``reports.significance``), the winner marked only when it is significant, the
tied group marked otherwise, budget columns beside, and every empty cell saying why (failed with
its reason, running, or not measured).

A column holds numbers measured under one protocol: when the runs of one step budget were
evaluated differently (sample count, reference, extractor, decoder, recipe, metrics version) the
budget is split into one column per protocol (``4 steps [B]``) with a legend of what differs, or
the report is refused (``protocols=refuse``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial

import pandas as pd

from bench.errors import UserError
from reports.collect import Collected, _str, describe_differences
from reports.significance import Cell, Comparison, mark, paired

HIGHER_IS_BETTER = ("precision", "recall", "density", "coverage")
ROW_KEYS = ("data", "size", "method")
PROTOCOL_POLICIES = ("split", "refuse")


def lower_is_better(metric: str) -> bool:
    return metric.split("/")[0] not in HIGHER_IS_BETTER


def fmt(v: float) -> str:
    """Two decimals, or two significant digits for values below 0.01 (an FD of 1e-6 must not
    print as 0.00)."""
    if pd.isna(v):
        return ""
    return f"{v:.2f}" if v == 0 or abs(v) >= 0.01 else f"{v:.2g}"


@dataclass
class Column:
    key: str  # "4 steps" or "4 steps [B]"
    steps: int
    protocol: str  # json of the protocol its numbers were measured under
    tag: str = ""  # "" when the budget has one protocol, else "A", "B", ...


@dataclass
class Table:
    metric: str
    rows: list[str]
    columns: list[Column]
    cells: dict  # (row, column key) -> Cell
    status: dict  # (row, column key) -> why the cell is empty
    marks: dict  # (row, column key) -> "win" | "tie" | "untested"
    comparisons: dict  # (column key, block) -> [Comparison]
    budget: pd.DataFrame  # rows x [train fwd-equivalents, train wall s, NFE note]
    legend: list[str] = field(default_factory=list)  # protocol letters and what differs
    groups: dict = field(default_factory=dict)  # row -> seed group id
    blocks: dict = field(default_factory=dict)  # row -> its block (data / size): ranked together

    @property
    def best(self) -> dict:
        """Column key -> row marked as the (significant or untested) best."""
        return {c: r for (r, c), m in self.marks.items() if m in ("win", "untested")}

    def cell(self, row: str, col: str) -> tuple[str, str]:
        """Text of one cell and its mark (``win``, ``tie``, ``untested`` or ``""``)."""
        c = self.cells.get((row, col))
        if c is None or not c.n:
            return self.status.get((row, col)) or "not measured", ""
        low, high, kind = c.interval
        text = fmt(c.mean)
        if kind == "t":
            text += " ± " + fmt(c.half_width)
        elif kind == "bootstrap":
            text += f" [{fmt(low)}, {fmt(high)}]"
        if c.n < self.seeds(row):
            text += f" (n={c.n})"
        return text, self.marks.get((row, col), "")

    def seeds(self, row: str) -> int:
        return max([c.n for (r, _), c in self.cells.items() if r == row] or [0])


def cell_frame(c: Collected, metric: str, row_keys: tuple[str, ...] = ROW_KEYS) -> pd.DataFrame:
    """Every run's value of ``metric`` with its row label, seed group and column key."""
    runs = c.runs.copy()
    keys = list(row_keys)
    runs["row"] = runs[keys].map(lambda v: _str(v) or "-").agg(" / ".join, axis=1)
    runs["block"] = (
        runs[[k for k in ("data", "size") if k in keys]].map(_str).agg(" / ".join, axis=1)
    )
    # Two seed groups behind one row label (same method, other hyper-parameters): tell them apart.
    per_row = runs.groupby("row")["group"].nunique()
    clash = runs["row"].isin(per_row[per_row > 1].index)
    runs.loc[clash, "row"] = runs.loc[clash, "row"] + " [" + runs.loc[clash, "group"].str[-6:] + "]"
    values = c.tidy[c.tidy["metric"] == metric].drop(columns=["row"], errors="ignore")
    values = values.merge(runs[["run_id", "row", "block"]], on="run_id")
    return runs, values


def columns_of(values: pd.DataFrame, policy: str) -> tuple[list[Column], list[str]]:
    """One column per (steps, protocol); a protocol letter and legend where a budget has two."""
    if policy not in PROTOCOL_POLICIES:
        raise UserError(
            f"protocols={policy!r} is not allowed; choose one of {', '.join(PROTOCOL_POLICIES)}"
        )
    columns, legend = [], []
    for steps in sorted(values["steps"].unique()):
        protocols = sorted(values[values["steps"] == steps]["protocol"].unique())
        name = f"{steps} step" + ("s" if steps > 1 else "")
        if len(protocols) == 1:
            columns.append(Column(name, int(steps), protocols[0]))
            continue
        diffs = describe_differences([json.loads(p) for p in protocols])
        if policy == "refuse":
            raise UserError(
                f"the {name} results were measured under {len(protocols)} protocols "
                f"({'; '.join(diffs)}); filter the runs to one protocol or use protocols=split"
            )
        for i, (p, d) in enumerate(zip(protocols, diffs, strict=True)):
            tag = chr(ord("A") + i)
            columns.append(Column(f"{name} [{tag}]", int(steps), p, tag))
            legend.append(f"{name} [{tag}]: {d}")
    if legend:
        legend.insert(
            0,
            "PROTOCOLS DIFFER: these budgets were measured under more than one protocol and are "
            "split into one column per protocol (never compare across the letters)",
        )
    return columns, legend


def comparison(
    c: Collected, metric: str, row_keys: tuple[str, ...] = ROW_KEYS, protocols: str = "split"
) -> Table:
    runs, values = cell_frame(c, metric, row_keys)
    columns, legend = columns_of(values, protocols)
    rows = sorted(runs["row"].unique().tolist())
    block_of = runs.drop_duplicates("row").set_index("row")["block"].to_dict()
    cells, status, marks, comparisons = {}, {}, {}, {}
    for col in columns:
        mine = values[(values["steps"] == col.steps) & (values["protocol"] == col.protocol)]
        column_cells = {}
        for row, g in mine.groupby("row"):
            g = g.sort_values("seed", key=lambda s: pd.to_numeric(s, errors="coerce"))
            one = len(g) == 1
            column_cells[row] = Cell(
                g["seed"].map(_str).tolist(),
                g["value"].to_numpy(dtype=float),
                float(g["ci_low"].iloc[0]) if one else float("nan"),
                float(g["ci_high"].iloc[0]) if one else float("nan"),
            )
        cells.update({(r, col.key): cell for r, cell in column_cells.items()})
        # Methods are ranked within a data set and model size, never across them.
        for b in sorted({block_of[r] for r in column_cells}):
            mine_b = {r: cell for r, cell in column_cells.items() if block_of[r] == b}
            col_marks, comparisons[(col.key, b)] = mark(mine_b, lower_is_better(metric))
            marks.update({(r, col.key): m for r, m in col_marks.items()})
        for row in rows:
            if row not in column_cells:
                status[(row, col.key)] = why_empty(runs[runs["row"] == row])

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
    nfe = values.groupby(["row", "steps"])["nfe"].first()
    budget["NFE"] = [
        ", ".join(
            f"{s}:{int(n)}" for (r, s), n in nfe.items() if r == row and pd.notna(n) and n != s
        )
        or "= steps"
        for row in rows
    ]
    groups = runs.groupby("row")["group"].first().to_dict()
    return Table(
        metric, rows, columns, cells, status, marks, comparisons, budget, legend, groups, block_of
    )


def why_empty(runs: pd.DataFrame) -> str:
    failed = runs[runs["status"] == "FAILED"]
    if len(failed):
        return "failed: " + (_str(failed["reason"].iloc[0]) or "no reason logged")
    if (runs["status"] == "RUNNING").any():
        return "running"
    if (runs["status"] == "KILLED").any():
        return "killed"
    return "not measured"


def significance_notes(t: Table) -> list[str]:
    """One sentence per column and block (data / size): who is best, whether that is
    significant, and by which test."""
    names = {"welch": "Welch's t-test over seeds, Holm-adjusted", "intervals": "95% intervals"}
    out = []
    for col in t.columns:
        for (key, block), comps in t.comparisons.items():
            if key != col.key or not comps:
                continue
            short = partial(_within, block)
            col_marks = {
                r: m for (r, k), m in t.marks.items() if k == col.key and t.blocks.get(r) == block
            }
            tests = sorted({names[c.test] for c in comps if c.test})
            how = f" ({'; '.join(tests)})" if tests else ""
            where = f"{block}, {col.key}" if block else col.key
            best = next((r for r, m in col_marks.items() if m in ("win", "untested")), None)
            if best is not None and col_marks[best] == "win":
                detail = ", ".join(_versus(c, short) for c in comps)
                out.append(f"{where}: {short(best)} is significantly best{how}: {detail}.")
            elif best is not None:
                untested = [short(c.other) for c in comps if c.different is None]
                out.append(
                    f"{where}: {short(best)} has the best mean, not tested against "
                    f"{', '.join(untested)} (one seed and no bootstrap interval){how}."
                )
            else:
                tied = [r for r, m in col_marks.items() if m == "tie"]
                detail = ", ".join(_versus(c, short) for c in comps if c.other in tied)
                out.append(
                    f"{where}: no significant winner; tied: {', '.join(map(short, tied))}"
                    f"{how}: {detail}."
                )
    return out


def significance_summary(t: Table) -> str:
    """One sentence for the whole table: which columns have a significant winner, which a tie."""
    wins, ties, untested = [], [], []
    for col in t.columns:
        for (key, block), comps in t.comparisons.items():
            if key != col.key or not comps:
                continue
            where = f"{col.key} ({block})" if len({b for _, b in t.comparisons}) > 1 else col.key
            rows = [r for (r, k), m in t.marks.items() if k == key and t.blocks.get(r) == block]
            kinds = {t.marks[(r, key)] for r in rows}
            if "win" in kinds:
                winner = next(r for r in rows if t.marks[(r, key)] == "win")
                wins.append(f"{where}: {_within(block, winner)}")
            elif "tie" in kinds:
                ties.append(where)
            else:
                untested.append(where)
    parts = []
    if wins:
        parts.append("significant winners at " + "; ".join(wins))
    if ties:
        parts.append("no significant difference between the best cells at " + ", ".join(ties))
    if untested:
        parts.append("not tested (no intervals) at " + ", ".join(untested))
    text = " -- ".join(parts) or "nothing to compare (one cell per column)"
    return text[0].upper() + text[1:] + "."


def _within(block: str, row: str) -> str:
    """A row label without its block: ``digits16 / tiny/4 / shortcut`` -> ``shortcut``."""
    return row[len(block) + 3 :] if block and row.startswith(block + " / ") else row


def _versus(c: Comparison, short=str) -> str:
    if c.test == "welch":
        return f"vs {short(c.other)} p={c.p:.3g}"
    if c.test == "intervals":
        return f"vs {short(c.other)} intervals {'disjoint' if c.different else 'overlap'}"
    return f"vs {short(c.other)} untested"


def protocol_line(c: Collected, metric: str) -> str:
    """What the numbers of ``metric`` were measured with: every value of each protocol field over
    the budgets shown (per-budget protocols; run-level ``eval.*`` tags for older runs). Two values
    of one field mean split columns (see the legend above the table)."""
    d = c.tidy[c.tidy["metric"] == metric]
    protocols = [json.loads(p) for p in d["protocol"].unique()]

    def uniq(key: str) -> str:
        vals = sorted({_str(p.get(key)) for p in protocols} - {""})
        return " | ".join(vals) or "unknown"

    extractor = (
        uniq("eval.fid_extractor")
        if metric.startswith("fid")
        else f"{uniq('eval.extractor')} (weights {uniq('eval.extractor_hash')})"
    )
    line = (
        f"metric: {metric} ({'lower' if lower_is_better(metric) else 'higher'} is better); "
        f"samples per budget: {uniq('eval.num_samples')}; reference: {uniq('eval.reference')}; "
        f"extractor: {extractor}"
    )
    for key, name in (("recipe", "recipe"), ("eval.bootstrap", "bootstrap")):
        if uniq(key) != "unknown":
            line += f"; {name}: {uniq(key)}"
    return line


LEGEND = (
    "Cells: mean ± half-width of the 95% t-interval over seeds; one seed: the value and its 95% "
    "bootstrap interval over samples in brackets where logged; (n=k) where a cell has fewer seeds "
    "than its row. Bold: the best mean, significantly better than every other cell of the column "
    "(Welch's t-test over seeds, Holm-adjusted, when both cells have two or more seeds; disjoint "
    "95% intervals otherwise). Italic: no significant winner, the cells tied with the best mean. "
    "° : the best mean, not tested (a cell without any interval). Empty cells say why."
)


def _rows(t: Table, style) -> pd.DataFrame:
    out = pd.DataFrame(index=t.rows)
    for col in t.columns:
        cells = [t.cell(r, col.key) for r in t.rows]
        out[col.key] = [style(x, m) for x, m in cells]
    fmt0 = lambda v: "" if pd.isna(v) else f"{v:,.0f}"  # noqa: E731
    out["train fwd-equiv."] = [fmt0(v) for v in t.budget["forward_equivalents"]]
    out["train wall (s)"] = [fmt0(v) for v in t.budget["train_wall_s"]]
    out["NFE"] = t.budget["NFE"].values
    out["seeds"] = [t.seeds(r) for r in t.rows]
    out.index.name = "data / size / method"
    return out


def _md_style(x, m):
    return {"win": f"**{x}**", "tie": f"*{x}*", "untested": f"**{x}**°"}.get(m, x)


def _html_style(x, m):
    return {"win": f"<b>{x}</b>", "tie": f"<i>{x}</i>", "untested": f"<b>{x}</b>°"}.get(m, x)


def _tex_style(x, m):
    return {
        "win": "\\textbf{" + x + "}",
        "tie": "\\textit{" + x + "}",
        "untested": "\\textbf{" + x + "}$^\\circ$",
    }.get(m, x)


def to_markdown(t: Table) -> str:
    return _rows(t, _md_style).to_markdown(disable_numparse=True)


def to_html(t: Table) -> str:
    return _rows(t, _html_style).to_html(escape=False, classes="comparison", border=0)


def _tex_escape(x) -> str:
    return str(x).replace("±", "$\\pm$").replace("_", "\\_").replace("%", "\\%").replace("#", "\\#")


def to_latex(t: Table, caption: str | None = None, label: str = "tab:fewstep") -> str:
    df = _rows(t, lambda x, m: _tex_style(_tex_escape(x), m))
    df.index = [_tex_escape(i) for i in df.index]
    df.columns = [_tex_escape(c) for c in df.columns]
    caption = caption or (
        f"{_tex_escape(t.metric)} per step budget: mean $\\pm$ half-width of the 95\\% "
        "t-interval over seeds (one seed: [95\\% bootstrap interval]). Bold: significantly best "
        "of its data set and size; italic: tied with the best mean; $^\\circ$: best mean, untested."
    )
    return df.to_latex(escape=False, caption=caption, label=label)


# -- paired differences against a baseline method ----------------------------------------------


@dataclass
class Paired:
    baseline: str
    rows: list[str]
    columns: list[str]
    cells: dict  # (row, column) -> Cell of per-seed differences
    status: dict  # (row, column) -> why there is no difference

    def cell(self, row: str, col: str) -> tuple[str, bool]:
        """Text and whether the interval excludes zero."""
        d = self.cells.get((row, col))
        if d is None or not d.n:
            return self.status.get((row, col), "no common seed"), False
        h = d.half_width
        if d.n == 1:
            return f"{fmt(d.mean)} (1 pair)", False
        sig = bool(abs(d.mean) > h)
        return f"{fmt(d.mean)} ± {fmt(h)} (n={d.n})", sig


def paired_differences(
    c: Collected,
    metric: str,
    baseline: str,
    row_keys: tuple[str, ...] = ROW_KEYS,
    table: Table | None = None,
) -> Paired:
    """Per row and column: mean over seeds of (row's value - baseline's value at the same seed)."""
    runs, values = cell_frame(c, metric, row_keys)
    methods = sorted({_str(m) for m in runs["method"]})
    if baseline not in methods:
        raise UserError(f"baseline={baseline!r} has no runs here; methods: {', '.join(methods)}")
    table = table or comparison(c, metric, row_keys)
    key_of = table.blocks  # the baseline of the same data set and model size
    method_of = runs.drop_duplicates("row").set_index("row")["method"].map(_str).to_dict()
    base_rows = [r for r in table.rows if method_of[r] == baseline]
    rows = [r for r in table.rows if method_of[r] != baseline]
    cells, status = {}, {}
    for row in rows:
        matches = [b for b in base_rows if key_of[b] == key_of[row]]
        for col in table.columns:
            if len(matches) != 1:
                status[(row, col.key)] = (
                    "no baseline run" if not matches else "several baseline configs"
                )
                continue
            mine, base = table.cells.get((row, col.key)), table.cells.get((matches[0], col.key))
            if mine is None or not mine.n:
                status[(row, col.key)] = "not measured"
                continue
            if base is None or not base.n:
                status[(row, col.key)] = f"{baseline} not measured"
                continue
            d = paired(
                dict(zip(mine.seeds, mine.values, strict=True)),
                dict(zip(base.seeds, base.values, strict=True)),
            )
            cells[(row, col.key)] = d
    return Paired(baseline, rows, [col.key for col in table.columns], cells, status)


def paired_frame(p: Paired, bold) -> pd.DataFrame:
    out = pd.DataFrame(index=p.rows)
    for col in p.columns:
        out[col] = [(bold(x) if s else x) for x, s in (p.cell(r, col) for r in p.rows)]
    out.index.name = f"difference vs {p.baseline}"
    return out


PAIRED_LEGEND = (
    "Paired difference (row minus baseline, same training seed, same fixed evaluation noise): mean "
    "over the common seeds ± half-width of its 95% t-interval; bold where the interval excludes 0."
)


def summary(t: Table) -> pd.DataFrame:
    """One row per filled cell: the numbers the figures and ``cells.csv`` are made from."""
    rows = []
    for (row, key), c in t.cells.items():
        col = next(x for x in t.columns if x.key == key)
        low, high, kind = c.interval
        rows.append(
            {
                "row": row,
                "column": key,
                "steps": col.steps,
                "protocol": col.tag,
                "n": c.n,
                "mean": c.mean,
                "sd": c.sd,
                "low": low,
                "high": high,
                "interval": kind,
                "mark": t.marks.get((row, key), ""),
                "seeds": " ".join(c.seeds),
            }
        )
    return pd.DataFrame(
        rows,
        columns=[
            "row",
            "column",
            "steps",
            "protocol",
            "n",
            "mean",
            "sd",
            "low",
            "high",
            "interval",
            "mark",
            "seeds",
        ],
    )
