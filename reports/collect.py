"""MLflow -> one tidy pandas frame: a row per (run, budget, metric).

The report never trains or samples: everything it shows comes from the tracking store. Runs that
failed or are still running keep their rows (with ``status`` and ``reason``) so tables can show
them as such instead of leaving silent gaps.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import pandas as pd

from bench.errors import UserError

BUDGET_METRIC = re.compile(r"^metrics\.(?P<metric>.+)/steps_(?P<steps>\d+)$")
RUN_COLUMNS = {
    "tags.method": "method",
    "tags.recipe": "recipe",
    "tags.size": "size",
    "tags.data": "data",
    "tags.seed": "seed",
    "tags.k_ratio": "k_ratio",
    "tags.config_hash": "config_hash",
    "status": "status",
    "tags.failure": "reason",
    "tags.eval.num_samples": "num_samples",
    "tags.eval.reference": "reference",
    "tags.eval.extractor": "extractor",
    "tags.eval.extractor_hash": "extractor_hash",
    "tags.eval.fid_extractor": "fid_extractor",
    "tags.mlflow.runName": "run_name",
    "experiment_id": "experiment_id",
    "start_time": "start_time",
    "metrics.budget/train_samples": "train_samples",
    "metrics.budget/forward_equivalents": "forward_equivalents",
    "metrics.budget/train_wall_s": "train_wall_s",
}


@dataclass
class Collected:
    runs: pd.DataFrame  # one row per run: identity columns, status, budget figures
    tidy: pd.DataFrame  # one row per (run, steps, metric) with ``value`` and ``nfe``


def search(
    uri: str | None,
    experiments: list[str] | None,
    filter_string: str = "",
    since: str | None = None,
) -> pd.DataFrame:
    """All runs of the named experiments (all experiments when none are named)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if uri:
        mlflow.set_tracking_uri(uri)
    if mlflow.get_tracking_uri().startswith("http"):
        # A report is interactive: fail in seconds, not after MLflow's minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        df = mlflow.search_runs(
            experiment_names=experiments or None,
            search_all_experiments=not experiments,
            filter_string=filter_string,
            output_format="pandas",
        )
    except MlflowException as e:
        raise UserError(
            f"cannot read runs from tracking store {mlflow.get_tracking_uri()}: {str(e).splitlines()[0]}"
        ) from e
    except Exception as e:  # connection errors, unreadable files
        raise UserError(
            f"cannot reach tracking store {mlflow.get_tracking_uri()} ({e.__class__.__name__})"
        ) from e
    if since is not None and len(df):
        df = df[df["start_time"] >= pd.Timestamp(since, tz="UTC")]
    if not len(df):
        where = f"experiments {experiments}" if experiments else "any experiment"
        raise UserError(
            f"no runs found in {where} at {mlflow.get_tracking_uri()}"
            + (f" matching {filter_string!r}" if filter_string else "")
        )
    return df


def collect(df: pd.DataFrame, group_by: list[str] | None = None) -> Collected:
    runs = pd.DataFrame({new: df[old] if old in df else None for old, new in RUN_COLUMNS.items()})
    runs["run_id"] = df["run_id"].values
    for key in group_by or []:
        runs[key] = df.get(f"params.{key}", df.get(f"tags.{key}"))
    runs["reason"] = runs["reason"].fillna("")
    # Runs from before recipes existed trained the shared recipe; an official run is its own row.
    runs["recipe"] = runs["recipe"].fillna("shared")
    official = runs["recipe"] == "official"
    runs.loc[official, "method"] = runs.loc[official, "method"].astype(str) + " (official recipe)"
    rows = []
    for col in df.columns:
        m = BUDGET_METRIC.match(col)
        if not m or m["metric"] in ("nfe", "sample/img_per_s"):
            continue
        steps = int(m["steps"])
        nfe_col = f"metrics.nfe/steps_{steps}"
        speed_col = f"metrics.sample/img_per_s_steps_{steps}"
        for i, value in enumerate(df[col]):
            if pd.notna(value):
                rows.append(
                    {
                        "run_id": df["run_id"].iloc[i],
                        "steps": steps,
                        "metric": m["metric"],
                        "value": float(value),
                        "nfe": df[nfe_col].iloc[i] if nfe_col in df else float("nan"),
                        "img_per_s": df[speed_col].iloc[i] if speed_col in df else float("nan"),
                    }
                )
    tidy = pd.DataFrame(rows, columns=["run_id", "steps", "metric", "value", "nfe", "img_per_s"])
    tidy = tidy.merge(runs, on="run_id", how="left")
    return Collected(runs=runs, tidy=tidy)
