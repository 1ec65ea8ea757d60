"""Budget accounting: the logged figures, compute-matched step counts, and what ``CountingNet``
counts. Each method's stated cost against its counted calls is in tests/test_method_contract.py."""

import pytest
import torch
from conftest import CONFIG_DIR

from bench.budget import Cost, CountingNet, training_budget
from bench.mlp import VelocityMLP
from methods.flow_matching import FlowMatching
from methods.reflow import Reflow
from methods.shortcut import Shortcut

METHODS = sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml"))


def test_training_budget_figures():
    b = training_budget(Shortcut(k_ratio=0.25), steps=1000, batch_size=128)
    assert b == {"budget/train_samples": 128000, "budget/forward_equivalents": 128000 * 3.5}
    reflow = Reflow(num_pairs=100, gen_steps=10)  # one-off: 1,000 pair-generation forwards
    assert reflow.cost() == Cost(per_sample=3.0, one_off=1000.0)
    assert training_budget(reflow, steps=5, batch_size=8)["budget/forward_equivalents"] == (
        5 * 8 * 3 + 1000
    )


def test_counting_net_counts_a_jvp_tangent_pass_as_one_forward_per_row():
    net = CountingNet(VelocityMLP((2,), 16, 2))
    x, t, d = torch.randn(5, 2), torch.rand(5), torch.rand(5)
    net(x, t, d)  # with gradient: forward and backward, 3 per row
    with torch.no_grad():
        net(x, t, d)  # 1 per row
    torch.func.jvp(lambda z: net(z, t, d), (x,), (torch.ones_like(x),))  # 3 + 1 per row
    assert (net.grad_rows, net.nograd_rows, net.tangent_rows) == (10, 5, 5)
    assert net.forward_equivalents() == 3 * 10 + 5 + 5


# -- compute-matched runs (compute_budget, sweeps/experiment/compute_matched.yaml) ------------------
def test_steps_for_budget_divides_what_is_left_by_the_cost_of_a_step():
    from bench.budget import steps_for_budget
    from bench.errors import UserError

    shortcut = Shortcut(k_ratio=0.25)  # 3 + 2 * 0.25 = 3.5 per row
    assert steps_for_budget(1_024_000, shortcut, 128) == 2285  # 1,024,000 / 448 = 2285.7
    assert steps_for_budget(1_024_000, FlowMatching(), 128, teacher=384_000) == 1666
    reflow = Reflow(num_pairs=100, gen_steps=10)  # one-off 1,000 forwards
    assert steps_for_budget(1_000 + 3 * 8 * 5, reflow, 8) == 5
    with pytest.raises(UserError, match=r"compute_budget=400 .* less than one step \(448\)"):
        steps_for_budget(400, shortcut, 128)


@pytest.mark.parametrize("method", METHODS)
def test_the_compute_matched_experiment_gives_every_method_the_same_total(compose, capsys, method):
    from bench import teacher as teachers
    from bench.build import apply_compute_budget, make_method

    cfg = compose("+experiment=compute_matched", f"method={method}")
    apply_compute_budget(cfg)
    m, steps = make_method(cfg), cfg.train.steps
    total = training_budget(m, steps, cfg.train.batch_size)["budget/forward_equivalents"]
    tcfg = teachers.teacher_config(cfg)
    if tcfg is not None:  # its teacher's training is pinned and counted
        total += training_budget(make_method(tcfg), tcfg.train.steps, tcfg.train.batch_size)[
            "budget/forward_equivalents"
        ]
    # Spent to within one step of the budget, never above it.
    per_step = cfg.train.batch_size * m.cost().per_sample
    assert cfg.compute_budget - per_step < total <= cfg.compute_budget
    # The steps the README's compute-matched table reports.
    readme = {
        "shortcut": 2285,
        "flow_matching": 2666,
        "consistency": 2000,
        "reflow": 1301,
        "progressive_distillation": 1000,
        "live_reflow": 1600,
        "meanflow": 2000,
        "scm": 2000,
        "alpha_flow": 2000,
        "imm": 2000,
    }
    assert steps == readme.get(method, steps)
    if method == "progressive_distillation":
        assert cfg.method.teacher.train.steps == 1000
        assert (
            "compute_budget=1.024e+06 forward-equivalents: train.steps=1000 (128 x 5 per step, "
            "teacher 384000)" in capsys.readouterr().out
        )


def test_a_compute_budget_run_trains_the_derived_steps(tmp_path, mlflow_uri):
    from conftest import SMOKE, run_cli

    from bench import checkpoint

    # flow matching at batch 8 costs 24 per step: 100 forward-equivalents buy 4 steps.
    r = run_cli(
        "method=flow_matching",
        *SMOKE,
        "compute_budget=100",
        "eval.budgets=[1]",
        f"paths.root={tmp_path}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compute_budget=100 forward-equivalents: train.steps=4 (8 x 3 per step)" in r.stdout
    (rd,) = (tmp_path / "runs").iterdir()
    assert checkpoint.load(rd / "checkpoint.pt")["step"] == 4
    r = run_cli(
        "method=flow_matching", *SMOKE, "compute_budget=10", f"paths.root={tmp_path}", cwd=tmp_path
    )
    assert r.returncode == 2
    assert "less than one step (24); raise compute_budget" in r.stderr


def test_consistency_distillation_pays_for_its_teacher_forwards(compose):
    from bench.build import apply_compute_budget, make_method

    cfg = compose(
        "+experiment=compute_matched", "method=consistency", "+method.teacher.method=flow_matching"
    )
    apply_compute_budget(cfg)
    # 5 per row (CD: + one teacher forward) after the teacher's 1,000 x 128 x 3 = 384,000.
    assert cfg.train.steps == (1_024_000 - 384_000) // (128 * 5) == 1000
    assert cfg.method.teacher.train.steps == 1000
    assert make_method(cfg).cost().per_sample == 4  # no teacher yet
