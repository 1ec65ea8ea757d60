"""Evaluation during training (bench.curves): ``eval.every`` evaluates the chosen budgets every N
steps at the small sample count, logs one curve per budget, and a resumed run keeps the points
it has and evaluates only the ones it has not."""

from __future__ import annotations

import json

from conftest import SMOKE, run_cli
from test_distributed import compose_cfg

from bench.build import prepare
from bench.curves import CURVES, Curves
from bench.train import Trainer

CURVE = ["eval.every=2", "eval.every_budgets=[1,4]", "eval.every_num_samples=16"]


def trainer_with_curves(cfg, run_dir):
    parts = prepare(cfg)
    trainer = Trainer(
        parts.net, parts.method, parts.data, cfg.train, run_dir, parts.device,
        parts.conditional, {"identity": "test", "model": parts.net.name},
    )  # fmt: skip
    curves = Curves(cfg, parts, run_dir, None, trainer.world)
    calls = []
    evaluate = curves.evaluator.evaluate
    curves.evaluator.evaluate = lambda *a: calls.append(a[2]) or evaluate(*a)
    trainer.hooks.append(curves)
    return trainer, calls


def test_curves_are_evaluated_every_n_steps_and_resume_without_repeats(tmp_path):
    cfg = compose_cfg("train.steps=6", *SMOKE, *CURVE)
    first, calls = trainer_with_curves(cfg, tmp_path)
    first.fit(stop_at=3)  # interrupted after step 3 (its checkpoint saved)
    assert calls == [1, 4]  # step 2, both budgets
    stored = json.loads((tmp_path / CURVES).read_text())
    ((key, curve),) = stored.items()
    assert curve["settings"]["eval.num_samples"] == "16"
    assert set(curve["steps"]) == {"2"}
    assert {"fd/train/steps_1", "fd/train/steps_4"} <= set(curve["steps"]["2"])

    again, calls = trainer_with_curves(cfg, tmp_path)
    assert again.resume() and again.step == 3
    again.fit()  # 4 evaluated; 6 is the end: the final evaluation's
    assert calls == [1, 4]
    steps = json.loads((tmp_path / CURVES).read_text())[key]["steps"]
    assert set(steps) == {"2", "4"} and steps["2"] == curve["steps"]["2"]
    # A crash after a point's evaluation and before its checkpoint repeats the steps: the
    # point is kept, not evaluated again.
    repeat, calls = trainer_with_curves(cfg, tmp_path)
    repeat.fit(stop_at=3)
    assert calls == []


def test_the_job_logs_one_curve_per_budget(tmp_path, mlflow_uri):
    proc = run_cli(
        "train.steps=4",
        *SMOKE,
        *CURVE,
        "eval.every=1",
        f"paths.root={tmp_path / 'r'}",
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import mlflow

    client = mlflow.tracking.MlflowClient(mlflow_uri)
    (run,) = client.search_runs(client.get_experiment_by_name("fewstep-bench").experiment_id)
    for budget in (1, 4):
        history = client.get_metric_history(run.info.run_id, f"curve/fd/train/steps_{budget}")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3]
    # The final evaluation is the one the run record reports, at eval.num_samples.
    (run_dir,) = (tmp_path / "r" / "runs").iterdir()
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "finished" and len(state["evaluated"]) == 1
