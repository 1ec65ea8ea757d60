"""Progressive distillation: the two-teacher-step target, the round schedule, per-round students."""

import torch
from conftest import SMOKE, Analytic, bcast

from bench.data import Batch
from bench.errors import UserError
from bench.run import job
from methods.base import Nets, StageContext
from methods.progressive_distillation import ProgressiveDistillation, round_steps


def test_rounds_halve_the_steps_and_anneal_the_lr():
    pd = ProgressiveDistillation()
    assert [round_steps(r) for r in range(7)] == [64, 32, 16, 8, 4, 2, 1]
    assert pd.stage_starts(70) == [0, 10, 20, 30, 40, 50, 60]
    assert (
        pd.lr_factor(10, 70) == 1.0
        and pd.lr_factor(15, 70) == 0.5
        and abs(pd.lr_factor(19, 70) - 0.1) < 1e-12
    )


def test_target_is_two_teacher_half_steps(tmp_path):
    f = lambda x, t, d, y: -x + 2 * bcast(t, x) + 5 * bcast(d, x)  # noqa: E731
    pd = ProgressiveDistillation()
    pd.attach_teacher(Analytic(f))
    student = Analytic(lambda x, t, d, y: torch.zeros_like(x))
    ctx = StageContext(tmp_path, None, torch.device("cpu"), False, 0, lambda: None)
    pd.round_teacher = Analytic(f)
    pd.round = 2  # 16 student steps: D = 1/16, teacher half steps 1/32
    x1, x0 = torch.randn(8, 3), torch.randn(8, 3)
    loss, _ = pd.loss(Nets(student, student), Batch(x1, None, x0), 0)
    xt, t, d, _ = student.calls[0]
    assert torch.all(d == 1 / 16) and torch.allclose(t * 16, (t * 16).round())
    h = torch.full_like(t, 1 / 32)
    v1 = f(xt, t, h, None)
    v2 = f(xt + bcast(h, xt) * v1, t + h, h, None)
    torch.testing.assert_close(loss, ((v1 + v2) / 2).square().mean())
    assert ctx.run_dir == tmp_path


def test_a_pd_run_distills_every_round_and_serves_each_budget(compose, tmp_path, mlflow_uri):
    cfg = compose(
        "method=progressive_distillation",
        f"paths.root={tmp_path}",
        f"tracking.uri={mlflow_uri}",
        "train.steps=14",
        *SMOKE,
        "eval.budgets=[1,2,64,128]",
    )
    job(cfg)
    rd = next((tmp_path / "runs").glob("progressive_distillation-*"))
    assert sorted(p.name for p in rd.glob("pd_round_*.pt")) == [
        f"pd_round_{n}.pt" for n in (16, 2, 32, 4, 64, 8)
    ]
    import json

    done = json.loads((rd / "state.json").read_text())
    assert done["status"] == "finished" and done["budget"]["budget/teacher_forward_equivalents"] > 0


def test_pd_without_a_teacher_is_one_sentence(compose, tmp_path, mlflow_uri):
    import pytest

    with pytest.raises(UserError, match="needs a teacher"):
        job(
            compose(
                "method=progressive_distillation",
                "method.teacher=null",
                f"paths.root={tmp_path}",
                f"tracking.uri={mlflow_uri}",
                "train.steps=7",
                "eval=smoke",
            )
        )


def test_resume_inside_a_round_matches_an_uninterrupted_run(compose, tmp_path):
    from bench.run import build
    from bench.train import Trainer

    cfg = compose(
        "method=progressive_distillation",
        "train.steps=14",
        "train.batch_size=8",
        "train.log_every=1",
        "train.ckpt_every=1",
        "train.progress=false",
    )

    def trainer(run_dir):
        data, net, method, cond = build(cfg)
        torch.manual_seed(123)
        teacher = build(cfg)[1]  # an untrained "teacher": the schedule, not its quality, is tested
        method.attach_teacher(teacher)
        run_dir.mkdir(exist_ok=True)
        return Trainer(
            net, method, data, cfg.train, run_dir, torch.device("cpu"), cond, {"model": net.name}
        )

    a = trainer(tmp_path / "a")
    a.fit()
    b = trainer(tmp_path / "b")
    b.fit(stop_at=5)  # round 2 (steps 4-5) half done
    c = trainer(tmp_path / "b")
    assert c.resume() and c.step == 5
    c.fit()
    for k, v in a.net.state_dict().items():
        assert torch.equal(v, c.net.state_dict()[k]), k
    for n in (64, 32, 16, 8, 4, 2):
        assert torch.equal(
            *(
                torch.load(d / f"pd_round_{n}.pt", weights_only=True)["final.linear.weight"]
                for d in (tmp_path / "a", tmp_path / "b")
            )
        )
