"""Seaborn figures of the report. Each function returns the saved path, or a reason string when
the data cannot support the figure (one model size only, no k-ratio sweep, ...): the report lists
those reasons instead of showing an empty plot.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

SIZE_ORDER = ["tiny/4", "S/2", "B/2", "L/2", "XL/2"]


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def metric_vs_nfe(tidy: pd.DataFrame, metric: str, path: Path) -> Path | str:
    d = tidy[tidy["metric"] == metric]
    if d.empty:
        return f"no {metric} values"
    fig, ax = plt.subplots(figsize=(6, 4))
    style = "size" if d["size"].nunique() > 1 else None
    sns.lineplot(d, x="nfe", y="value", hue="method", style=style, marker="o", errorbar="sd", ax=ax)
    ax.set_xscale("log", base=2)
    ax.set(
        xlabel="network evaluations (NFE, log2)",
        ylabel=metric,
        title=f"{metric} vs sampling budget",
    )
    return _save(fig, path)


def metric_vs_size(tidy: pd.DataFrame, metric: str, path: Path) -> Path | str:
    d = tidy[tidy["metric"] == metric]
    if d["size"].nunique() < 2:
        return "one model size only"
    order = [s for s in SIZE_ORDER if s in set(d["size"])] + sorted(
        set(d["size"]) - set(SIZE_ORDER)
    )
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.pointplot(d, x="size", y="value", hue="steps", order=order, errorbar="sd", ax=ax)
    ax.set(ylabel=metric, title=f"{metric} vs model size (per step budget)")
    return _save(fig, path)


def k_ratio_ablation(tidy: pd.DataFrame, metric: str, path: Path) -> Path | str:
    d = tidy[(tidy["metric"] == metric) & (tidy["k_ratio"].astype(str) != "")]
    if d["k_ratio"].nunique() < 2:
        return "no k-ratio sweep"
    d = d.assign(k_ratio=d["k_ratio"].astype(float))
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.lineplot(
        d, x="k_ratio", y="value", hue="steps", marker="o", errorbar="sd", palette="viridis", ax=ax
    )
    ax.set(xlabel="k ratio (self-consistency fraction)", ylabel=metric, title="k-ratio ablation")
    return _save(fig, path)


def metric_vs_compute(tidy: pd.DataFrame, metric: str, path: Path) -> Path | str:
    d = tidy[(tidy["metric"] == metric)].dropna(subset=["forward_equivalents"])
    if d.empty:
        return "no training-budget metrics logged"
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.scatterplot(d, x="forward_equivalents", y="value", hue="method", style="steps", s=60, ax=ax)
    ax.set_xscale("log")
    ax.set(
        xlabel="training forward-equivalents (log)",
        ylabel=metric,
        title="quality vs training compute",
    )
    return _save(fig, path)


def loss_curves(curves: pd.DataFrame, path: Path) -> Path | str:
    if curves.empty:
        return "no training-loss history"
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.lineplot(curves, x="step", y="loss", hue="label", ax=ax)
    ax.set(yscale="log", title="training loss", xlabel="optimizer step")
    ax.legend(fontsize=7)
    return _save(fig, path)
