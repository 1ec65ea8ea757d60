"""MLflow -> one tidy pandas frame: a row per (run, budget, metric), with the protocol the number
was measured under and the seed group its run belongs to.

The report never trains or samples: everything it shows comes from the tracking store. Runs that
failed or are still running keep their rows (with ``status`` and ``reason``) so tables can show
them as such instead of leaving silent gaps.

Three things decide which numbers may be averaged or compared:

- **Identity** (``config_hash``): one trained run. Two MLflow runs with one ``config_hash`` are a
  duplicate (the same command started twice), never two seeds: the latest FINISHED one is kept
  and the others are named in the notes.
- **Seed group** (``group_hash``, the identity with the seed removed, ``bench.identity``): runs
  that differ only in their seed form one cell of a table. Runs logged before that tag existed
  are grouped by their parameters minus ``seed`` (the notes say how many).
- **Protocol** (``protocol/steps_N``, the evaluator's settings when budget N was measured): a
  table column only holds numbers measured under one protocol. Runs logged before per-budget
  protocols fall back to their run-level ``eval.*`` tags (the notes say which).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field

import pandas as pd

from bench.errors import UserError

#: ``<metric>/steps_<N>``; ``N`` may be an integral float (``steps_2.0``), as logged by runs that
#: were given ``eval.budgets=[2.0]`` before budgets were validated.
BUDGET_METRIC = re.compile(r"^metrics\.(?P<metric>.+)/steps_(?P<steps>\d+(?:\.\d*)?)$")
#: Per-budget bounds of a metric ``<base>``: ``<base>/ci95_low/steps_N`` (bootstrap, 95%).
INTERVAL = re.compile(r"^(?P<base>.+)/ci95_(?P<side>low|high)$")
#: Budget metrics that are not quality numbers (shown in the NFE column or not at all).
NOT_QUALITY = ("nfe", "sample/img_per_s")
#: Evaluation during training (bench.curves): measured at the curves' own, smaller sample count,
#: so never a table cell under the final evaluation's protocol (the report draws them apart).
CURVE = "curve/"
RUN_COLUMNS = {
    "tags.method": "method",
    "tags.recipe": "recipe",
    "tags.size": "size",
    "tags.data": "data",
    "tags.seed": "seed",
    "tags.k_ratio": "k_ratio",
    "tags.config_hash": "config_hash",
    "tags.group_hash": "group_hash",
    "status": "status",
    "tags.failure": "reason",
    "tags.eval.num_samples": "num_samples",
    "tags.eval.reference": "reference",
    "tags.eval.extractor": "extractor",
    "tags.eval.extractor_hash": "extractor_hash",
    "tags.eval.fid_extractor": "fid_extractor",
    "tags.eval.bootstrap": "bootstrap",
    "tags.mlflow.runName": "run_name",
    "experiment_id": "experiment_id",
    "start_time": "start_time",
    "end_time": "end_time",
    "metrics.budget/train_samples": "train_samples",
    "metrics.budget/forward_equivalents": "forward_equivalents",
    "metrics.budget/train_wall_s": "train_wall_s",
    "metrics.budget/eval_wall_s": "eval_wall_s",
    "tags.plan/est_train_s": "est_train_s",  # bench.plan's estimates (reports/timing.py)
    "tags.plan/est_eval_s": "est_eval_s",
    "tags.plan/source": "est_source",
}
#: Protocol fields a reader needs to tell two columns apart, in the order they are printed.
PROTOCOL_ORDER = (
    "eval.num_samples",
    "eval.reference",
    "eval.extractor",
    "eval.extractor_hash",
    "eval.fid_extractor",
    "eval.fid_reference",
    "eval.fid_decoder",
    "recipe",
    "eval.metrics_version",
    "eval.weights",
    "eval.noise_seed",
    "eval.bootstrap",
)


@dataclass
class Collected:
    runs: pd.DataFrame  # one row per kept run: identity columns, status, budget figures, group
    tidy: pd.DataFrame  # one row per (run, steps, metric): value, ci_low/ci_high, nfe, protocol
    notes: list[str] = field(default_factory=list)  # what a reader must know (duplicates, ...)
    dropped: pd.DataFrame | None = None  # duplicate runs left out, with the run kept instead


def search(
    uri: str | None,
    experiments: list[str] | None,
    filter_string: str = "",
    since: str | None = None,
) -> pd.DataFrame:
    """All runs of the named experiments (all experiments when none are named)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    check_filter(filter_string)
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


def check_filter(filter_string: str) -> None:
    """Refuse a malformed MLflow filter in one sentence before any store is contacted."""
    if not filter_string:
        return
    from mlflow.utils.search_utils import SearchUtils

    try:
        SearchUtils.parse_search_filter(filter_string)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise UserError(
            f"filter={filter_string!r} is not an MLflow filter string ({reason}); in a shell write "
            'e.g. "filter=\\"tags.data = \'digits16\'\\""'
        ) from e


def budget_steps(text: str) -> int | None:
    """``"4"`` and ``"4.0"`` -> 4; a fractional step count (``"2.5"``) -> None (no such budget)."""
    value = float(text)
    return int(value) if value.is_integer() and value >= 1 else None


def _str(v) -> str:
    return "" if v is None or (isinstance(v, float) and pd.isna(v)) else str(v)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def deduplicate(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """One MLflow run per ``config_hash``: the latest FINISHED one, else the latest started.

    Two MLflow runs of one identity are one trained configuration logged twice (a command started
    twice at once, a lost ``state.json``), not two seeds: averaging them would report a spread of
    zero over a sample of one. Runs without a ``config_hash`` tag cannot be matched and are kept.
    """
    runs = runs.copy()
    runs["_finished"] = runs["status"] == "FINISHED"
    runs["_time"] = pd.to_datetime(runs["end_time"].fillna(runs["start_time"]), utc=True)
    has = runs["config_hash"].map(_str) != ""
    keep_idx, drop_rows, notes = list(runs.index[~has]), [], []
    for chash, g in runs[has].groupby("config_hash", sort=True):
        g = g.sort_values(["_finished", "_time"], ascending=[False, False])
        keep_idx.append(g.index[0])
        if len(g) > 1:
            kept = g.iloc[0]
            others = g.iloc[1:]
            for _, o in others.iterrows():
                drop_rows.append(
                    {"run_id": o["run_id"], "kept": kept["run_id"], "status": o["status"]}
                )
            notes.append(
                f"config {chash} was logged {len(g)} times (one identity, not {len(g)} seeds): "
                f"kept {kept['run_name']} ({kept['status']}, {kept['run_id'][:8]}), left out "
                + ", ".join(f"{o['run_id'][:8]} ({o['status']})" for _, o in others.iterrows())
            )
    kept = runs.loc[sorted(keep_idx)].drop(columns=["_finished", "_time"])
    dropped = pd.DataFrame(drop_rows, columns=["run_id", "kept", "status"])
    return kept.reset_index(drop=True), dropped, notes


def seed_groups(runs: pd.DataFrame, df: pd.DataFrame) -> tuple[pd.Series, list[str]]:
    """The seed group of every run: its ``group_hash`` tag, or for runs logged before that tag a
    hash of its parameters minus ``seed`` (and its method, size and data tags)."""
    params = [c for c in df.columns if c.startswith("params.") and c != "params.seed"]
    by_id = df.set_index("run_id")
    groups, fallback = [], 0
    for _, r in runs.iterrows():
        tag = _str(r["group_hash"])
        if tag:
            groups.append(tag)
            continue
        fallback += 1
        src = by_id.loc[r["run_id"]]
        seed = _str(src.get("params.seed", r["seed"]))
        # ``train.seed: ${seed}`` and the like: a parameter named seed that holds the run's seed
        ident = {
            c: _str(src[c]) for c in params if not (c.endswith(".seed") and _str(src[c]) == seed)
        }
        ident.update({k: _str(r[k]) for k in ("method", "size", "data", "k_ratio")})
        groups.append("p-" + _hash(ident))
    notes = []
    if fallback:
        notes.append(
            f"{fallback} of {len(runs)} runs carry no group_hash tag (logged before seed groups): "
            "grouped by their parameters minus seed"
        )
    return pd.Series(groups, index=runs.index), notes


#: Run-level ``eval.*`` tags that describe the last evaluation, not a protocol field.
RUN_LEVEL_ONLY = ("tags.eval.protocol_key", "tags.eval.other_protocol_budgets")


def run_protocol(src: pd.Series) -> dict[str, str]:
    """The run-level protocol of a run logged before per-budget protocols: its ``eval.*`` tags."""
    out = {
        k[len("tags.") :]: _str(v)
        for k, v in src.items()
        if k.startswith("tags.eval.") and _str(v) and k not in RUN_LEVEL_ONLY
    }
    return out


def collect(df: pd.DataFrame, group_by: list[str] | None = None) -> Collected:
    runs = pd.DataFrame({new: df[old] if old in df else None for old, new in RUN_COLUMNS.items()})
    runs["run_id"] = df["run_id"].values
    for key in group_by or []:
        runs[key] = df.get(f"params.{key}", df.get(f"tags.{key}"))
    runs["reason"] = runs["reason"].fillna("")
    if "params.recipe" in df:  # the recipe may be a param rather than a tag
        runs["recipe"] = runs["recipe"].fillna(df["params.recipe"])
    # Runs from before recipes existed trained the shared recipe; an official run is its own row.
    runs["recipe"] = runs["recipe"].fillna("shared")
    official = runs["recipe"] == "official"
    runs.loc[official, "method"] = runs.loc[official, "method"].astype(str) + " (official recipe)"
    runs, dropped, notes = deduplicate(runs)
    runs["group"], group_notes = seed_groups(runs, df)
    notes += group_notes

    kept = set(runs["run_id"])
    df = df[df["run_id"].isin(kept)].reset_index(drop=True)
    by_id = runs.set_index("run_id")
    rows, odd, fell_back, mixed = [], [], [], []
    budgets: dict[tuple[str, str], int] = {}
    for col in df.columns:
        m = BUDGET_METRIC.match(col)
        if not m:
            continue
        steps = budget_steps(m["steps"])
        if steps is None:
            odd.append(col[len("metrics.") :])
            continue
        if "." in m["steps"]:
            odd.append(col[len("metrics.") :])
        budgets[(m["metric"], m["steps"])] = steps

    def column(base: str, steps: int, suffix: str = "") -> pd.Series | None:
        """The logged column of ``base/steps_N`` (``steps_N.0`` when only that was logged)."""
        for spelling in (str(steps), f"{steps}.0"):
            name = f"metrics.{base}{suffix}/steps_{spelling}"
            if name in df:
                return df[name]
        return None

    seen = set()
    for (metric, _), steps in budgets.items():
        if (
            metric in NOT_QUALITY
            or metric.startswith(CURVE)
            or INTERVAL.match(metric)
            or (metric, steps) in seen
        ):
            continue
        seen.add((metric, steps))
        value = column(metric, steps)
        low, high = column(metric, steps, "/ci95_low"), column(metric, steps, "/ci95_high")
        nfe, speed = column("nfe", steps), column("sample/img_per_s", steps)
        proto_tag = f"tags.protocol/steps_{steps}"
        for i, v in enumerate(value):
            if pd.isna(v):
                continue
            rid = df["run_id"].iloc[i]
            raw = _str(df[proto_tag].iloc[i]) if proto_tag in df else ""
            if raw:
                try:
                    protocol, source = json.loads(raw), "budget"
                except json.JSONDecodeError:
                    protocol, source = {"unreadable": raw}, "budget"
            else:
                protocol, source = run_protocol(df.iloc[i]), "run"
            recipe = _str(by_id.loc[rid, "recipe"])
            if recipe:
                protocol.setdefault("recipe", recipe)
            rows.append(
                {
                    "run_id": rid,
                    "steps": steps,
                    "metric": metric,
                    "value": float(v),
                    "ci_low": float(low.iloc[i]) if low is not None else float("nan"),
                    "ci_high": float(high.iloc[i]) if high is not None else float("nan"),
                    "nfe": float(nfe.iloc[i]) if nfe is not None else float("nan"),
                    "img_per_s": float(speed.iloc[i]) if speed is not None else float("nan"),
                    "protocol": json.dumps(protocol, sort_keys=True),
                    "protocol_source": source,
                }
            )
    tidy = pd.DataFrame(
        rows,
        columns=[
            "run_id",
            "steps",
            "metric",
            "value",
            "ci_low",
            "ci_high",
            "nfe",
            "img_per_s",
            "protocol",
            "protocol_source",
        ],
    )
    if len(tidy):
        old = tidy[tidy["protocol_source"] == "run"]["run_id"].unique()
        if len(old):
            names = by_id.loc[old, "run_name"].map(_str)
            fell_back.append(
                f"{len(old)} runs carry no per-budget protocol (logged before protocol/steps_N "
                f"tags): their run-level eval.* tags are used ({_some(sorted(names))})"
            )
        for rid, g in tidy.groupby("run_id"):
            per_budget = g.drop_duplicates("steps").set_index("steps")["protocol"].sort_index()
            if per_budget.nunique() > 1:
                diffs = describe_differences([json.loads(p) for p in per_budget])
                parts = [f"steps_{s}: {d}" for s, d in zip(per_budget.index, diffs, strict=True)]
                mixed.append(
                    f"PROTOCOL MIXED WITHIN A RUN: {_str(by_id.loc[rid, 'run_name'])} "
                    f"({rid[:8]}) measured its budgets under {per_budget.nunique()} protocols "
                    f"({'; '.join(parts)}): its numbers are not comparable across budgets"
                )
    if odd:
        notes.append(
            "budgets logged with a float step count were read as integers where integral and "
            f"left out otherwise: {', '.join(sorted(set(odd)))}"
        )
    tidy = tidy.merge(runs, on="run_id", how="left")
    return Collected(runs=runs, tidy=tidy, notes=mixed + notes + fell_back, dropped=dropped)


def _some(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def describe_differences(protocols: list[dict]) -> list[str]:
    """Per protocol, the fields in which the protocols differ: ``["eval.num_samples=16", ...]``."""
    keys = sorted(
        {k for p in protocols for k in p if len({_str(q.get(k, "?")) for q in protocols}) > 1},
        key=lambda k: (PROTOCOL_ORDER.index(k) if k in PROTOCOL_ORDER else len(PROTOCOL_ORDER), k),
    )
    return [", ".join(f"{k}={p.get(k, '(not recorded)')}" for k in keys) for p in protocols]
