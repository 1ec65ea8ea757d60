"""Hyper-parameter search: ``hydra/sweeper=optuna`` minimising the objective a job returns
(``objective.metric`` at ``objective.steps``; sweeps/experiment/optuna_lr.yaml, docs/CLUSTER.md)."""

from __future__ import annotations

import math

import mlflow
import pytest
import yaml
from conftest import SMOKE, run_cli

from bench.errors import UserError
from bench.objective import check_objective, objective_name, objective_value

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TOY = [
    "train.steps=4",
    *SMOKE,
]


def test_the_objective_names_a_metric_at_a_budget(compose):
    assert objective_name(compose()) is None  # the default: a job returns nothing
    cfg = compose("+experiment=optuna_lr")
    assert objective_name(cfg) == "fd/train/steps_1" and list(cfg.eval.budgets) == [1]
    cfg = compose("objective.metric=kid", "objective.steps=4")
    assert objective_name(cfg) == "kid/steps_4"
    results = {4: {"kid/steps_4": 0.5, "fd/train/steps_4": 7.0}}
    assert objective_value(cfg, results) == 0.5 and objective_value(compose(), results) is None
    with pytest.raises(UserError, match=r"objective metric 'kid/steps_4' was not measured"):
        objective_value(cfg, {4: {"fd/train/steps_4": 7.0}})


def test_a_bad_objective_fails_before_training(compose):
    with pytest.raises(UserError, match=r"hydra/sweeper=optuna needs a value to minimise"):
        check_objective(compose(), "optuna")
    check_objective(compose(), "basic")  # other sweepers need none
    check_objective(compose("+experiment=optuna_lr"), "optuna")
    with pytest.raises(UserError, match=r"objective.steps=4 is not among eval.budgets=\[1\]"):
        check_objective(compose("+experiment=optuna_lr", "objective.steps=4"), "optuna")


@pytest.mark.slow
def test_optuna_without_an_objective_is_one_sentence(tmp_path):
    proc = run_cli(
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=1",
        *TOY,
        f"paths.root={tmp_path}",
        f"tracking.uri=sqlite:///{tmp_path}/m.db",
        cwd=tmp_path,
        env=ONE_THREAD,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: hydra/sweeper=optuna needs a value to minimise")
    )
    assert not list(tmp_path.glob("runs/*"))


@pytest.mark.slow
def test_a_two_trial_optuna_search_logs_each_trial_and_reports_the_best(tmp_path):
    """`python -m bench.run -m +experiment=optuna_lr hydra.sweeper.n_trials=2` at toy size: two
    ordinary FINISHED MLflow runs, and the sweeper's best value is the smaller of their
    fd/train/steps_1 with that run's parameters."""
    uri = f"sqlite:///{tmp_path}/m.db"
    proc = run_cli(
        "-m",
        "+experiment=optuna_lr",
        "hydra.sweeper.n_trials=2",
        *TOY,
        f"paths.root={tmp_path}",
        f"tracking.uri={uri}",
        cwd=tmp_path,
        env=ONE_THREAD,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = tmp_path.glob("hydra/multirun_*/optimization_results.yaml")
    best = yaml.safe_load(results.read_text())
    assert best["name"] == "optuna"

    client = mlflow.tracking.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("fewstep-bench").experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    for r in runs:  # only the budget the objective needs was evaluated
        assert math.isfinite(r.data.metrics["fd/train/steps_1"])
        assert "fd/train/steps_4" not in r.data.metrics
    winner = min(runs, key=lambda r: r.data.metrics["fd/train/steps_1"])
    assert best["best_value"] == winner.data.metrics["fd/train/steps_1"]
    for key, value in best["best_params"].items():
        assert float(winner.data.params[key]) == pytest.approx(float(value), rel=1e-12), key
    assert len({r.data.params["train.lr"] for r in runs}) == 2  # two different trials
