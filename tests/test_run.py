"""End to end: a job trains, evaluates and logs to MLflow; the CLI refuses bad input clearly."""

import json
import re

import mlflow
import pytest
import torch
from conftest import CONFIG_DIR, run_cli

from bench.errors import UserError
from bench.run import job

METHODS = sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml"))
TOY = [
    "train.steps=6",
    "train.batch_size=16",
    "train.log_every=2",
    "train.ckpt_every=3",
    "train.progress=false",
    "eval.num_samples=32",
    "eval.batch_size=32",
    "eval.budgets=[1,2,128]",
]


def runs(uri):
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=["fewstep-bench"])


def test_a_job_trains_evaluates_and_logs_everything(compose, mlflow_uri, tmp_path, capsys):
    cfg = compose(*TOY, f"paths.root={tmp_path}", f"tracking.uri={mlflow_uri}")
    job(cfg)
    out = capsys.readouterr().out
    assert "FD(train)" in out and "extractor=classifier-digits16" in out

    df = runs(mlflow_uri)
    assert len(df) == 1
    run = df.iloc[0]
    assert run["status"] == "FINISHED"
    assert run["params.method.k_ratio"] == "0.25" and run["params.size.name"] == "tiny/4"
    assert run["tags.method"] == "shortcut" and run["tags.eval.num_samples"] == "32"
    for steps in (1, 2, 128):
        assert run[f"metrics.fd/train/steps_{steps}"] > 0
        assert run[f"metrics.nfe/steps_{steps}"] == steps
    client = mlflow.tracking.MlflowClient()
    curve = client.get_metric_history(run["run_id"], "train/loss")
    assert [m.step for m in curve] == [2, 4, 6]
    artifacts = {a.path for a in client.list_artifacts(run["run_id"], "grids")}
    assert {"grids/steps_1.png", "grids/steps_128.png", "grids/interpolation.png"} <= artifacts
    state = json.loads(next((tmp_path / "runs").iterdir()).joinpath("state.json").read_text())
    assert state["status"] == "finished"

    # The same command again: no retraining, no re-evaluation, the same MLflow run.
    job(cfg)
    out = capsys.readouterr().out
    assert "not retraining" in out and "evaluating nothing more" in out
    assert len(runs(mlflow_uri)) == 1
    # A new budget on a finished run: only that budget is evaluated.
    job(
        compose(
            *TOY[:-1],
            "eval.budgets=[1,2,4,128]",
            "eval_only=true",
            f"paths.root={tmp_path}",
            f"tracking.uri={mlflow_uri}",
        )
    )
    out = capsys.readouterr().out
    assert "evaluating [4]" in out and "not retraining" in out
    final = runs(mlflow_uri).iloc[0]
    for name in ("kid", "precision", "recall", "density", "coverage", "copy_rate"):
        assert f"metrics.{name}/steps_4" in final.index and f"metrics.{name}/floor" in final.index
    assert final["tags.eval.extractor_hash"] and "KID" in final["tags.eval.other_metrics"]
    assert "metrics.fd/train/steps_4" in runs(mlflow_uri).columns


def first_row(out: str) -> list[float]:
    """The numbers of the 1-step row of the printed results table."""
    (row,) = [l for l in out.splitlines() if re.match(r"\s+1\s+1\s", l)]
    return [float(v) for v in row.split()]


def test_stored_results_are_reused_only_under_the_same_protocol(
    compose, mlflow_uri, tmp_path, capsys
):
    """Another feature extractor is another protocol: a finished run evaluated in pixel-PCA
    features and then asked for random-CNN features computes the new numbers instead of
    reporting the stored pixel-PCA ones under the new extractor's name; asked for pixel-PCA
    again, it reuses what it stored for that protocol."""
    common = [
        *TOY[:-1],
        "eval.budgets=[1]",
        "eval.interpolation=false",
        f"paths.root={tmp_path}",
        f"tracking.uri={mlflow_uri}",
    ]
    job(compose(*common, "eval.features=pixel_pca"))
    pca = capsys.readouterr().out
    assert "extractor=pixel-pca" in pca

    job(compose(*common, "eval.features=random_cnn", "eval_only=true"))
    cnn = capsys.readouterr().out
    assert "extractor=random-cnn" in cnn and "already evaluated" not in cnn
    assert first_row(cnn)[2:4] != first_row(pca)[2:4]  # FD(train), FD(test) measured anew
    run = runs(mlflow_uri).iloc[0]
    assert run["tags.eval.extractor"] == "random-cnn"
    assert run["metrics.fd/train/steps_1"] == pytest.approx(first_row(cnn)[2], abs=0.006)

    job(compose(*common, "eval.features=pixel_pca", "eval_only=true"))
    again = capsys.readouterr().out
    assert "evaluating nothing more" in again
    assert first_row(again)[2:7] == first_row(pca)[2:7]


def test_the_reuse_key_changes_with_every_setting_that_changes_the_numbers(compose):
    from bench.build import make_evaluator
    from bench.data import digits16

    data = digits16()

    def key(*overrides):
        cfg = compose("eval.features=pixel_pca", "eval.num_samples=64", *overrides)
        return make_evaluator(cfg, data, torch.device("cpu"), False).reuse_key()

    base = key()
    assert key() == base  # stable: the same settings find the stored results
    changed = [
        key("eval.features=random_cnn"),
        key("eval.weights=online"),
        key("eval.batch_size=32"),  # a sampler may draw per batch (consistency's re-noising)
        key("eval.seed=7"),
        key("eval.num_samples=32"),
    ]
    assert base not in changed and len(set(changed)) == len(changed)
    assert key("eval.budgets=[1]", "eval.grids=false") == base  # what is evaluated, not how


def test_toy2d_with_the_mlp_reports_point_metrics(compose, mlflow_uri, tmp_path):
    cfg = compose(
        "+experiment=toy_control",
        "method=flow_matching",
        *TOY[:5],
        "eval.num_samples=200",
        "eval.batch_size=200",
        "eval.budgets=[1,2]",
        f"paths.root={tmp_path}",
        f"tracking.uri={mlflow_uri}",
    )
    job(cfg)
    run = runs(mlflow_uri).iloc[0]
    assert run["metrics.energy/steps_1"] > run["metrics.energy/floor"]
    assert "metrics.fd/train/steps_1" not in run.index


def test_class_conditional_shortcut_with_cfg(compose, mlflow_uri, tmp_path):
    cfg = compose(
        "data.conditional=true",
        "method.cfg_scale=1.5",
        *TOY,
        f"paths.root={tmp_path}",
        f"tracking.uri={mlflow_uri}",
    )
    job(cfg)
    run = runs(mlflow_uri).iloc[0]
    assert run["metrics.nfe/steps_128"] == 256 and run["metrics.nfe/steps_2"] == 2


def test_divergence_marks_the_run_failed(compose, mlflow_uri, tmp_path, monkeypatch):
    from methods.shortcut import Shortcut

    real = Shortcut.loss
    monkeypatch.setattr(
        Shortcut, "loss", lambda self, n, b, s: (real(self, n, b, s)[0] * float("inf"), {})
    )
    with pytest.raises(UserError, match="training diverged.*marked FAILED"):
        job(compose(*TOY, f"paths.root={tmp_path}", f"tracking.uri={mlflow_uri}"))
    run = runs(mlflow_uri).iloc[0]
    assert run["status"] == "FAILED" and run["tags.failure_step"] == "2"


def test_a_corrupt_checkpoint_is_one_sentence(compose, mlflow_uri, tmp_path):
    """The checkpoint is read before the MLflow run is reopened: a finished run whose checkpoint
    was damaged is refused in one sentence and stays FINISHED (it used to be reopened and marked
    FAILED, demoting a finished run's numbers)."""
    cfg = compose(*TOY, f"paths.root={tmp_path}", f"tracking.uri={mlflow_uri}")
    job(cfg)
    ckpt = next((tmp_path / "runs").iterdir()) / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(UserError, match="truncated or corrupt"):
        job(cfg)
    run = runs(mlflow_uri).iloc[0]  # never reopened: not RUNNING, not demoted
    assert run["status"] == "FINISHED" and "tags.failure" not in run.index


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["method=foo"],
            f"unknown method 'foo'; choose one of: {', '.join(METHODS)}",
        ),
        (["-m", "size=tiny,XXL"], "unknown size 'XXL'; choose one of: B, L, S, XL, mlp, tiny"),
        (
            ["data=mnist"],
            "unknown data 'mnist'; choose one of: digits16, image_folder, latents, shapes16, toy2d",
        ),
        (["method.k_ratio=4"], "method.k_ratio=4 is not allowed: a number in [0, 1)"),
        (["eval.budgets=[1,3]"], "step budget 3 is not allowed for Shortcut"),
        (
            ["data=image_folder", "data.path=/nonexistent/images"],
            "dataset path '/nonexistent/images' does not exist",
        ),
        (["eval.fid=true", "eval.inception_dir=/nonexistent/w"], "place inception-2015-12-05.pt"),
        (["eval_only=true"], "eval_only=true but"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_2(tmp_path, args, message):
    proc = run_cli(
        *args,
        "train.steps=1",
        f"paths.root={tmp_path}",
        cwd=tmp_path,
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("runs/*"))  # nothing trained, nothing half-made


@pytest.mark.slow
def test_the_multirun_from_the_issue(tmp_path):
    """`python -m bench.run -m method=flow_matching size=tiny,S data=digits16 train.steps=2`,
    with a small batch and evaluation so DiT-S fits in CI's time."""
    proc = run_cli(
        "-m",
        "method=flow_matching",
        "size=tiny,S",
        "data=digits16",
        "train.steps=2",
        "train.batch_size=8",
        "eval=smoke",
        "eval.num_samples=16",
        f"paths.root={tmp_path}",
        cwd=tmp_path,
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"},
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    dirs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert (
        len(dirs) == 2
        and dirs[0].startswith("flow_matching-S_2")
        and dirs[1].startswith("flow_matching-tiny_4")
    )
    assert proc.stdout.count("FD(train)") == 2
    df = runs(f"sqlite:///{tmp_path}/m.db")
    assert sorted(df["tags.size"]) == ["S/2", "tiny/4"] and (df["status"] == "FINISHED").all()
    assert torch.cuda.is_available() or (df["tags.device"] == "cpu").all()


def test_deterministic_auto_is_on_for_cpu_and_a_bad_value_is_one_sentence():
    import torch

    from bench.build import use_deterministic

    before = torch.are_deterministic_algorithms_enabled()
    try:
        use_deterministic(False, torch.device("cpu"))
        assert not torch.are_deterministic_algorithms_enabled()
        use_deterministic("auto", torch.device("cpu"))
        assert torch.are_deterministic_algorithms_enabled()
        with pytest.raises(
            UserError, match="deterministic='yes' is not allowed; choose one of auto, true, false"
        ):
            use_deterministic("yes", torch.device("cpu"))
    finally:
        torch.use_deterministic_algorithms(before)
