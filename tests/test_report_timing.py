"""Estimated vs measured wall time (reports/timing.py): every run records bench.plan's estimate
and its measured training and evaluation time; the report sets them side by side."""

from __future__ import annotations

import json
import math

import mlflow
import pandas as pd
import pytest
from conftest import SMOKE
from test_reports import build

from bench.run import job
from reports import timing


def runs(*rows: dict) -> pd.DataFrame:
    base = {"run_id": "r", "run_name": "r", "method": "shortcut", "size": "tiny", "seed": "0"}
    return pd.DataFrame([{**base, **r} for r in rows])


def test_ratio_per_phase_and_runs_without_an_estimate_are_counted_not_guessed():
    frame = runs(
        {"run_name": "a", "status": "FINISHED", "est_train_s": "100.0", "train_wall_s": 250.0,
         "est_eval_s": "10.0", "eval_wall_s": 5.0, "est_source": "measured: perf.json"},
        {"run_name": "b", "status": "FINISHED", "est_train_s": "100.0", "train_wall_s": 50.0,
         "est_eval_s": None, "eval_wall_s": 3.0},
        {"run_name": "old", "status": "FINISHED", "train_wall_s": 80.0},  # before estimates
        {"run_name": "bad", "status": "FAILED", "est_train_s": "100.0", "train_wall_s": 1.0},
    )  # fmt: skip
    est = timing.estimate_frame(frame)
    assert list(est["run"]) == ["a", "b"]  # finished runs with an estimate, nothing else
    assert est["training measured/estimated"].tolist() == [2.5, 0.5]
    assert est["evaluation measured/estimated"].iloc[0] == 0.5
    assert math.isnan(est["evaluation measured/estimated"].iloc[1])  # no estimate: no ratio
    lines = timing.summary(est, frame)
    assert (
        lines[0] == "training: measured/estimated median 1.50x over 2 run(s) (range 0.50x to 2.50x)"
    )
    assert lines[1].startswith("evaluation: measured/estimated median 0.50x over 1 run(s)")
    assert lines[2].startswith("1 finished run(s) recorded no estimate")
    shown = timing.table(est)
    assert shown["training measured/estimated"].tolist() == ["2.50x", "0.50x"]
    assert (
        shown["training estimated"].iloc[0] == "1.7 min"
        and shown["evaluation estimated"].iloc[1] == "-"
    )


@pytest.mark.parametrize("bad", ["", "nan", "-3", "inf", "garbage"])
def test_a_damaged_estimate_tag_is_no_estimate(bad):
    frame = runs({"status": "FINISHED", "est_train_s": bad, "train_wall_s": 10.0})
    assert timing.estimate_frame(frame).empty


@pytest.mark.slow
def test_a_job_records_its_estimate_and_times_and_the_report_compares_them(
    compose, mlflow_uri, tmp_path
):
    cfg = compose(*SMOKE, "train.steps=4", "eval.budgets=[1,2]", f"paths.root={tmp_path}")
    job(cfg)
    client = mlflow.tracking.MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fewstep-bench").experiment_id])
    est_train, est_eval = (float(run.data.tags[f"plan/est_{p}_s"]) for p in ("train", "eval"))
    assert est_train > 0 and est_eval > 0 and run.data.tags["plan/source"]
    measured = run.data.metrics["budget/eval_wall_s"]
    (state_file,) = tmp_path.glob("runs/*/state.json")
    state = json.loads(state_file.read_text())
    assert 0 < state["eval_wall_s"] == pytest.approx(measured)
    # Evaluated again at a new budget: the evaluation time adds up over the starts.
    job(compose(*SMOKE, "train.steps=4", "eval.budgets=[1,2,4]", f"paths.root={tmp_path}"))
    assert json.loads(state_file.read_text())["eval_wall_s"] > state["eval_wall_s"]

    out = tmp_path / "report"
    build(mlflow_uri, out, "experiments=[fewstep-bench]", "grids=false")
    md = (out / "report.md").read_text()
    assert "## Estimated vs measured time" in md and "training: measured/estimated median" in md
    csv = pd.read_csv(out / "timing.csv")
    assert len(csv) == 1 and csv["training estimated s"].iloc[0] == pytest.approx(
        est_train, abs=0.05
    )
    train_wall = client.get_run(run.info.run_id).data.metrics["budget/train_wall_s"]
    assert csv["training measured/estimated"].iloc[0] == pytest.approx(
        train_wall / est_train, rel=1e-3
    )
    assert "Estimated vs measured time" in (out / "report.html").read_text()
