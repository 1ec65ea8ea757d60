"""Reflow: stage transition at the configured step, pairs from the stage-1 model, resume inside
stage 2, and teachers shared between jobs (trained once, reused, checked for compatibility)."""

import json

import pytest
import torch
from conftest import SMOKE

from bench.data import Batch
from bench.errors import UserError
from bench.run import build, job
from bench.train import Trainer
from methods.base import Nets
from methods.reflow import Reflow

FAST = [
    "method=reflow",
    "train.steps=8",
    "train.batch_size=16",
    "train.log_every=2",
    "train.ckpt_every=2",
    "train.progress=false",
    "method.num_pairs=40",
    "method.gen_steps=4",
    "eval=smoke",
    "eval.num_samples=16",
    "eval.batch_size=16",
]


def trainer_for(cfg, run_dir):
    data, net, method, conditional = build(cfg)
    return Trainer(
        net, method, data, cfg.train, run_dir, torch.device("cpu"), conditional, {"model": net.name}
    )


def test_stage_two_starts_at_the_configured_step_from_the_stage_one_ema(
    compose, tmp_path, monkeypatch
):
    cfg = compose(*FAST, "method.stage1_fraction=0.5")
    tr = trainer_for(cfg, tmp_path)
    assert tr.stage_starts == [0, 4]
    seen = {}
    real = tr.method.begin_stage

    def spy(stage, nets, ctx, fresh):
        if stage == 1:
            seen["step"], seen["ema"] = (
                tr.step,
                {k: v.clone() for k, v in nets.ema.state_dict().items()},
            )
        real(stage, nets, ctx, fresh)
        if stage == 1:
            seen["online"] = {k: v.clone() for k, v in nets.online.state_dict().items()}

    monkeypatch.setattr(tr.method, "begin_stage", spy)
    tr.fit(stop_at=5)
    assert seen["step"] == 4
    assert all(
        torch.equal(seen["ema"][k], seen["online"][k]) for k in seen["ema"]
    )  # init from stage 1
    pairs = sorted((tmp_path / "reflow_pairs" / "round_1").glob("shard_*.pt"))
    assert len(pairs) == 1 and len(torch.load(pairs[0], weights_only=True)["x0"]) == 40


def test_further_rounds_make_new_pairs_from_the_previous_round(compose, tmp_path):
    cfg = compose(*FAST, "method.rounds=2", "train.steps=12")
    tr = trainer_for(cfg, tmp_path)
    assert tr.stage_starts == [0, 6, 9]
    tr.fit()
    one, two = (
        torch.load(tmp_path / "reflow_pairs" / f"round_{k}" / "shard_00000.pt", weights_only=True)
        for k in (1, 2)
    )
    assert not torch.equal(one["x0"], two["x0"]) and not torch.equal(one["x1"], two["x1"])
    assert tr.method.cost().one_off == 2 * 40 * 4


def test_pairs_are_the_stage_one_ode_of_their_noise(tmp_path):
    from conftest import Analytic

    rf = Reflow(num_pairs=10, gen_steps=4)
    net = Analytic(lambda x, t, d, y: torch.full_like(x, 0.5))  # x1 = x0 + 0.5 exactly
    from bench.data import toy2d
    from methods.base import StageContext

    ctx = StageContext(
        tmp_path, toy2d(n_train=50, n_test=10), torch.device("cpu"), False, 3, lambda: None
    )
    rf.generate(net, ctx)
    rf.load_pairs(tmp_path, "cpu")
    x0, x1, y = rf.pairs
    torch.testing.assert_close(x1, x0 + 0.5)
    # Stage s's shard i keeps its published key, seed * 1_000_003 + 7_777 s + i (seed 3 here).
    g = torch.Generator().manual_seed(3 * 1_000_003 + 7_777 * 1 + 0)
    assert torch.equal(x0, torch.randn((10, 2), generator=g))
    assert y is None and len(net.calls) == 4  # one batch, gen_steps evaluations
    loss, logs = rf.loss(Nets(net, net), Batch(torch.zeros(6, 2)), 0)
    assert "loss/reflow" in logs and torch.isfinite(loss)
    assert rf.cost().one_off == 40


def test_resume_inside_stage_two_matches_an_uninterrupted_run(compose, tmp_path, monkeypatch):
    cfg = compose(*FAST)
    a = trainer_for(cfg, tmp_path / "a")
    (tmp_path / "a").mkdir()
    a.fit()
    (tmp_path / "b").mkdir()
    b = trainer_for(cfg, tmp_path / "b")
    b.fit(stop_at=6)  # checkpoint at 6, inside stage 2 (which starts at 4)
    c = trainer_for(cfg, tmp_path / "b")
    assert c.resume() and c.step == 6
    c.fit()
    for k, v in a.net.state_dict().items():
        assert torch.equal(v, c.net.state_dict()[k]), k


def test_a_shared_teacher_is_trained_once_and_reused(compose, tmp_path, mlflow_uri, capsys):
    common = [
        f"paths.root={tmp_path}",
        f"tracking.uri={mlflow_uri}",
        "train.steps=4",
        *SMOKE,
        "+method.teacher.method=flow_matching",
    ]
    job(compose("method=reflow", "method.num_pairs=16", "method.gen_steps=2", *common))
    assert "training the teacher" in capsys.readouterr().out
    teacher_dir = next(
        p for p in (tmp_path / "runs").iterdir() if p.name.startswith("flow_matching")
    )
    stamp = (teacher_dir / "checkpoint.pt").stat().st_mtime_ns
    job(compose("method=consistency", *common))
    out = capsys.readouterr().out
    assert "reusing the finished teacher" in out and "training the teacher" not in out
    assert (teacher_dir / "checkpoint.pt").stat().st_mtime_ns == stamp
    import mlflow

    runs = mlflow.search_runs(experiment_names=["fewstep-bench"])
    assert sorted(runs["tags.method"]) == ["consistency", "flow_matching", "reflow"]
    teacher_id = runs[runs["tags.method"] == "flow_matching"]["run_id"].iloc[0]
    assert (runs[runs["tags.method"] != "flow_matching"]["tags.teacher_run_id"] == teacher_id).all()
    state = json.loads(next((tmp_path / "runs").glob("reflow-*/state.json")).read_text())
    teacher_cost = json.loads((teacher_dir / "state.json").read_text())["budget"][
        "budget/forward_equivalents"
    ]
    assert state["budget"]["budget/teacher_forward_equivalents"] == teacher_cost > 0


def test_teacher_errors_are_one_sentence(compose, tmp_path, mlflow_uri):
    common = [f"paths.root={tmp_path}", f"tracking.uri={mlflow_uri}", "train.steps=2", "eval=smoke"]
    with pytest.raises(UserError, match="learns without a teacher"):
        job(compose("method=shortcut", "+method.teacher.method=flow_matching", *common))
    with pytest.raises(UserError, match="unknown teacher method 'nope'"):
        job(compose("method=reflow", "+method.teacher.method=nope", *common))
    with pytest.raises(UserError, match="does not exist"):
        job(compose("method=reflow", f"+method.teacher.checkpoint={tmp_path}/none.pt", *common))
    # a checkpoint of another model size is refused
    job(
        compose(
            "method=flow_matching",
            "size=mlp",
            "data=toy2d",
            "train.batch_size=8",
            "train.progress=false",
            *common,
        )
    )
    foreign = next((tmp_path / "runs").glob("flow_matching-mlp*/checkpoint.pt"))
    with pytest.raises(UserError, match="a teacher must share the student's data and model size"):
        job(compose("method=reflow", f"+method.teacher.checkpoint={foreign}", *common))


def test_a_teacher_keeps_the_embedding_it_was_trained_with(compose, tmp_path, mlflow_uri):
    """A MeanFlow teacher (linear d, t unscaled) under a consistency student (level d, 1000 t):
    the teacher network is built the way its own run built it -- from its run and from a bare
    checkpoint alike -- never as a copy of the student's network with foreign weights."""
    from bench.build import prepare, resolve_teacher

    common = [f"paths.root={tmp_path}", f"tracking.uri={mlflow_uri}", "train.steps=2", *SMOKE]
    cfg = compose("method=consistency", "+method.teacher.method=meanflow", *common)
    parts = prepare(cfg)
    found = resolve_teacher(cfg, parts.method, parts.net, job)
    for teacher in (found.net, parts.method.teacher):
        assert (teacher.d_embedding, teacher.t_embed.scale) == ("linear", 1.0)
    assert (parts.net.d_embedding, parts.net.t_embed.scale) == ("level", 1000.0)
    ckpt = next((tmp_path / "runs").glob("meanflow-*/checkpoint.pt"))
    cfg = compose("method=consistency", f"+method.teacher.checkpoint={ckpt}", *common)
    parts = prepare(cfg)
    found = resolve_teacher(cfg, parts.method, parts.net, job)
    assert (found.net.d_embedding, found.net.t_embed.scale) == ("linear", 1.0)
