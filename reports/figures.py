"""Matplotlib/seaborn figures of the report. Each function returns the saved PNG path (a PDF of
the same figure is written beside it for the LaTeX output), or a reason string when the data
cannot support the figure (one model size only, no k-ratio sweep, ...): the report lists those
reasons instead of showing an empty plot.

Every curve is a configuration (a table row: runs differing only in seed pooled): its mean over
seeds, with a band for the 95% t-interval over seeds, or for the 95% bootstrap interval over
samples when the configuration has one seed (``reports.significance``).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from PIL import Image  # noqa: E402

from reports.significance import t_half_width  # noqa: E402

SIZE_ORDER = ["tiny/4", "S/2", "B/2", "L/2", "XL/2"]
SAMPLE_BUDGETS = (1, 4, 128)

sns.set_theme(style="whitegrid", context="paper", font_scale=1.1)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    fig.savefig(path.with_suffix(".pdf"))  # vector, for table.tex / figures.tex
    plt.close(fig)
    return path


def seed_stats(values: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Mean, 95% band and seed count of ``value`` per ``by`` group: a t-interval over seeds, or
    the bootstrap bounds of a single seed (NaN band when it has none)."""

    def one(g: pd.DataFrame) -> pd.Series:
        v = g["value"].to_numpy(dtype=float)
        mean = float(v.mean())
        if len(v) > 1:
            h = t_half_width(v)
            low, high = mean - h, mean + h
        else:
            low, high = float(g["ci_low"].iloc[0]), float(g["ci_high"].iloc[0])
        return pd.Series({"mean": mean, "low": low, "high": high, "n": len(v)})

    cols = [c for c in ("value", "ci_low", "ci_high") if c in values]
    out = values.groupby(by, dropna=False)[cols].apply(one)
    return out.reset_index()


def _labels(values: pd.DataFrame) -> pd.Series:
    """Curve labels: the table row, without the parts every row shares (data, size)."""
    parts = values["row"].str.split(" / ", n=2, expand=True)
    keep = [i for i in parts.columns if parts[i].nunique() > 1] or [parts.columns[-1]]
    label = parts[keep].astype(str).agg(" / ".join, axis=1)
    if "column_tag" in values and (values["column_tag"] != "").any():
        label = label + values["column_tag"].map(lambda t: f" [{t}]" if t else "")
    return label


def _outside_legend(ax, fontsize: int) -> None:
    """The legend to the right of the axes, where ten methods' labels hide no line."""
    fig = ax.get_figure()
    fig.set_figwidth(fig.get_figwidth() + 2.4)
    ax.legend(fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def _log_y(ax, low) -> str:
    """Log y axis when every value is positive; says which in the axis label."""
    if np.nanmin(low) > 0:
        ax.set_yscale("log")
        return " (log)"
    return ""


def metric_vs_nfe(values: pd.DataFrame, metric: str, path: Path) -> Path | str:
    d = values.dropna(subset=["nfe"])
    if d.empty:
        return f"no {metric} values with an NFE"
    d = d.assign(label=_labels(d))
    s = seed_stats(d, ["label", "nfe"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    palette = sns.color_palette("tab10", s["label"].nunique())
    for color, (label, g) in zip(palette, s.groupby("label"), strict=True):
        g = g.sort_values("nfe")
        ax.plot(g["nfe"], g["mean"], marker="o", color=color, label=label)
        ax.fill_between(g["nfe"], g["low"], g["high"], color=color, alpha=0.2, linewidth=0)
    ax.set_xscale("log", base=2)
    ylog = _log_y(ax, s[["mean", "low"]].to_numpy())
    ax.set(xlabel="network evaluations (NFE, log2)", ylabel=metric + ylog)
    ax.set_title(f"{metric} vs sampling budget (band: 95% interval)")
    _outside_legend(ax, fontsize=8)
    return _save(fig, path)


def _budgets(values: pd.DataFrame) -> list[int]:
    """The step budgets an ablation shows: 1 / 4 / 128 where measured, else first and last."""
    have = sorted(values["steps"].unique())
    return [b for b in SAMPLE_BUDGETS if b in have] or sorted({have[0], have[-1]})


def _ablation(values: pd.DataFrame, x: str, line: list[str], path: Path, metric: str, **labels):
    """Mean over seeds and 95% band of ``metric`` against ``x``, one line per ``line`` values."""
    d = values[values["steps"].isin(_budgets(values))]
    s = seed_stats(d, [*line, "steps", x])
    # colour: the configuration; line style: the step budget
    configs = sorted({tuple(k) for k in s[line].itertuples(index=False)})
    colors = dict(zip(configs, sns.color_palette("tab10", len(configs)), strict=True))
    styles = dict(zip(sorted(s["steps"].unique()), ["-", "--", ":", "-."] * 4, strict=False))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, g in s.groupby([*line, "steps"]):
        g = g.sort_values(x)
        *parts, steps = key
        color = colors[tuple(parts)]
        label = ", ".join([*map(str, parts), f"{steps} step" + ("s" if steps > 1 else "")])
        ax.plot(g[x], g["mean"], marker="o", color=color, linestyle=styles[steps], label=label)
        ax.fill_between(g[x], g["low"], g["high"], color=color, alpha=0.2, linewidth=0)
    ylog = _log_y(ax, s[["mean", "low"]].to_numpy())
    ax.set(ylabel=metric + ylog, **labels)
    ax.legend(fontsize=7)
    return fig, ax


def metric_vs_size(values: pd.DataFrame, metric: str, path: Path) -> Path | str:
    if values["size"].nunique() < 2:
        return "one model size only"
    order = [s for s in SIZE_ORDER if s in set(values["size"])] + sorted(
        set(values["size"]) - set(SIZE_ORDER)
    )
    # a line per configuration with the size taken out of its row label
    config = values["row"].map(lambda r: " / ".join(p for p in r.split(" / ")[2:] if p != "-"))
    d = values.assign(x=values["size"].map(order.index), config=config)
    fig, ax = _ablation(
        d, "x", ["config"], path, metric, xlabel="model size", title=f"{metric} vs model size"
    )
    ax.set_xticks(range(len(order)), order)
    return _save(fig, path)


def k_ratio_ablation(values: pd.DataFrame, metric: str, path: Path) -> Path | str:
    d = values[values["k_ratio"].map(lambda v: str(v) not in ("", "None", "nan"))]
    if d["k_ratio"].nunique() < 2:
        return "no k-ratio sweep"
    d = d.assign(k_ratio=d["k_ratio"].astype(float))
    line = ["method"] + (["size"] if d["size"].nunique() > 1 else [])
    fig, _ = _ablation(
        d,
        "k_ratio",
        line,
        path,
        metric,
        xlabel="k ratio (self-consistency fraction)",
        title="k-ratio ablation (band: 95% interval)",
    )
    return _save(fig, path)


def pareto_front(x: np.ndarray, y: np.ndarray, lower_is_better: bool = True) -> np.ndarray:
    """Indices of the points no other point beats in both compute (x) and quality (y), by x."""
    sign = 1 if lower_is_better else -1
    order = np.lexsort((sign * y, x))
    front, best = [], np.inf
    for i in order:
        if sign * y[i] < best:
            front.append(i)
            best = sign * y[i]
    return np.array(front, dtype=int)


def metric_vs_compute(
    values: pd.DataFrame, metric: str, path: Path, lower_is_better: bool = True
) -> Path | str:
    d = values.dropna(subset=["forward_equivalents"])
    if d.empty:
        return "no training-budget metrics logged"
    d = d.assign(label=_labels(d))
    budgets = sorted(d["steps"].unique())
    shown = [b for b in SAMPLE_BUDGETS if b in budgets] or sorted({budgets[0], budgets[-1]})
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 4.0), squeeze=False)
    labels = sorted(d["label"].unique())
    palette = dict(zip(labels, sns.color_palette("tab10", len(labels)), strict=True))
    for ax, steps in zip(axes[0], shown, strict=True):
        g = d[d["steps"] == steps]
        s = seed_stats(g, ["label"])
        s["compute"] = g.groupby("label")["forward_equivalents"].mean().reindex(s["label"]).values
        for _, r in s.iterrows():
            err = np.array([[r["mean"] - r["low"]], [r["high"] - r["mean"]]])
            ax.errorbar(
                r["compute"],
                r["mean"],
                yerr=None if np.isnan(err).any() else err,
                fmt="o",
                color=palette[r["label"]],
                label=r["label"],
                capsize=3,
            )
        front = pareto_front(s["compute"].to_numpy(), s["mean"].to_numpy(), lower_is_better)
        ax.step(
            s["compute"].to_numpy()[front],
            s["mean"].to_numpy()[front],
            where="post",
            color="black",
            linestyle="--",
            linewidth=1,
            label="Pareto front",
        )
        ax.set_xscale("log")
        ylog = _log_y(ax, s[["mean", "low"]].to_numpy())
        ax.set(xlabel="training forward-equivalents (log)", ylabel=metric + ylog)
        ax.set_title(f"{steps} step" + ("s" if steps > 1 else ""))
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("quality vs training compute (95% intervals; dashed: Pareto front)")
    return _save(fig, path)


def samples_side_by_side(
    grids: dict[str, dict[int, Path]], path: Path, budgets: tuple[int, ...] = SAMPLE_BUDGETS
) -> Path | str:
    """Rows = configurations, columns = step budgets: each run's sample grid (all drawn from the
    same fixed noise, so one position is one noise draw across every panel)."""
    have = sorted({s for g in grids.values() for s in g})
    if not have:
        return "no sample grids (grids=false, or the runs logged none)"
    cols = [b for b in budgets if b in have]
    if len(cols) < min(len(budgets), len(have)):  # fill up with the first, middle and last budget
        cols = sorted(set(cols) | {have[0], have[len(have) // 2], have[-1]})
    rows = sorted(grids)
    with Image.open(next(iter(grids[rows[0]].values()))) as im:
        aspect = im.width / im.height
    fig, axes = plt.subplots(
        len(rows),
        len(cols),
        figsize=(2.4 * aspect * len(cols) + 1.6, 2.4 * len(rows) + 0.6),
        squeeze=False,
    )
    for i, row in enumerate(rows):
        for j, steps in enumerate(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            if steps in grids[row]:
                with Image.open(grids[row][steps]) as im:
                    img = np.asarray(im.convert("RGB"))
                ax.imshow(img, interpolation="nearest")
            else:
                ax.text(0.5, 0.5, "not sampled", ha="center", va="center", transform=ax.transAxes)
            if i == 0:
                ax.set_title(f"{steps} step" + ("s" if steps > 1 else ""))
            if j == 0:
                ax.set_ylabel(row.replace(" / ", "\n"), fontsize=8)
    fig.suptitle("samples at each step budget, every panel from the same fixed noise")
    return _save(fig, path)


def loss_curves(curves: pd.DataFrame, path: Path) -> Path | str:
    if curves.empty:
        return "no training-loss history"
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    sns.lineplot(curves, x="step", y="loss", hue="label", ax=ax)
    ax.set(yscale="log", title="training loss", xlabel="optimizer step")
    ax.legend(fontsize=7)
    return _save(fig, path)


def eval_curves(curves: pd.DataFrame, metric: str, path: Path) -> Path | str:
    """Evaluation during training (``eval.every``): ``metric`` vs training step, a curve per
    configuration and budget, mean over seeds with its 95% t-band. These are measured at the
    curves' own (smaller) sample count; the tables hold the final evaluation."""
    if curves.empty:
        return f"no {metric} curves during training (eval.every was not set)"
    d = curves.assign(label=_labels(curves), ci_low=np.nan, ci_high=np.nan)
    d["label"] = d["label"] + d["budget"].map(lambda n: f", {n} step" + ("s" if n > 1 else ""))
    s = seed_stats(d, ["label", "step"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    palette = sns.color_palette("tab10", s["label"].nunique())
    for color, (label, g) in zip(palette, s.groupby("label"), strict=True):
        g = g.sort_values("step")
        ax.plot(g["step"], g["mean"], marker=".", color=color, label=label)
        ax.fill_between(g["step"], g["low"], g["high"], color=color, alpha=0.2, linewidth=0)
    ylog = _log_y(ax, s[["mean", "low"]].to_numpy())
    ax.set(xlabel="training step", ylabel=metric + ylog)
    ax.set_title(f"{metric} during training (eval.every; band: 95% interval over seeds)")
    _outside_legend(ax, fontsize=7)
    return _save(fig, path)
