"""alpha-Flow (methods/alpha_flow.py): its two ends are this project's flow matching and MeanFlow,
its small-alpha limit is MeanFlow's target, and the curriculum. The shared checks (cost counted in
every phase, loss falls, resume bitwise, options) are in tests/test_method_contract.py.

No golden fixtures: the official code (snap-research/alphaflow) runs only inside its own training
framework (its networks, LPIPS, video tensors); the checks below compare against this project's
own flow matching and MeanFlow instead.
"""

from __future__ import annotations

import pytest
import torch
from conftest import bcast

from bench.data import Batch
from bench.mlp import VelocityMLP
from methods.alpha_flow import AlphaFlow
from methods.base import Nets
from methods.flow_matching import FlowMatching, sample_time
from methods.meanflow import MeanFlow


def random_mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    net = VelocityMLP((2,), hidden=32, depth=3, d_embedding="linear", t_scale=1.0)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return net.to(dtype)


def constant(alpha: float, **kw) -> AlphaFlow:
    return AlphaFlow(total_steps=100, alpha_schedule="constant", alpha_start=alpha, **kw)


def batch(n=32, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return Batch(
        torch.randn(n, 2, generator=g, dtype=dtype), x0=torch.randn(n, 2, generator=g, dtype=dtype)
    )


def test_alpha_zero_is_meanflow_exactly():
    """At ``alpha = 0`` the loss, its logs and its gradient are MeanFlow's, bitwise."""
    net, b = random_mlp(), batch()
    got, want = [], []
    for method, out in ((constant(0.0, ratio=0.25), got), (MeanFlow(ratio=0.25), want)):
        torch.manual_seed(5)
        loss, logs = method.loss(Nets(net, net), b, step=7)
        grads = torch.autograd.grad(loss, list(net.parameters()))
        out += [loss, logs["loss/flow"], logs["loss/average"], *grads]
    for a, w in zip(got, want, strict=True):
        assert torch.equal(a, w)


class IgnoresD(torch.nn.Module):
    """A network that reads ``(x, t)`` only, so both methods ask it the same question."""

    num_classes = 0

    def __init__(self):
        super().__init__()
        self.net = random_mlp()

    def forward(self, x, t, d, y=None):
        return self.net(x, t, torch.zeros_like(t), y)


def test_alpha_one_is_flow_matching(monkeypatch):
    """At ``alpha = 1`` every target is ``v = x1 - x0``; with only ``d = 0`` rows, the plain squared
    error (``p = 0``) and the same times, the loss is flow matching's (summed over the sample
    instead of averaged: a factor ``D``), and so is its gradient."""
    net, b = IgnoresD(), batch()
    af = constant(1.0, ratio=0.0, p=0.0, label_dropout=0.0)
    monkeypatch.setattr(
        af, "sample_times", lambda n, device: (sample_time(n, "uniform", device), torch.zeros(n))
    )
    torch.manual_seed(5)
    loss_af, _ = af.loss(Nets(net, net), b, step=0)
    g_af = torch.autograd.grad(loss_af, list(net.parameters()))
    torch.manual_seed(5)
    loss_fm, _ = FlowMatching(time_sampler="uniform", label_dropout=0.0).loss(Nets(net, net), b, 0)
    g_fm = torch.autograd.grad(loss_fm, list(net.parameters()))
    torch.testing.assert_close(loss_af, 2 * loss_fm)
    for a, w in zip(g_af, g_fm, strict=True):
        torch.testing.assert_close(a, 2 * w)
    # and on d > 0 rows too, whatever the network: the target is v
    net2 = random_mlp()
    t, d = torch.rand(8) * 0.5, torch.rand(8) * 0.5
    x, v = torch.randn(8, 2), torch.randn(8, 2)
    _, target = constant(1.0).prediction_and_target_alpha(net2, x, t, d, None, v, 1.0)
    torch.testing.assert_close(target, v)


def test_small_alpha_limit_is_meanflows_target():
    """``(u - u_tgt(alpha)) / alpha -> u - (v + d du/dt)`` as ``alpha -> 0`` (float64): the
    finite-step target's residual, scaled by ``1 / alpha``, is MeanFlow's residual (the paper's
    statement that alpha-Flow's gradient tends to MeanFlow's)."""
    net = random_mlp(torch.float64)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 2, generator=g, dtype=torch.float64)
    v = torch.randn(16, 2, generator=g, dtype=torch.float64)
    t = 0.5 * torch.rand(16, generator=g, dtype=torch.float64)
    d = (1 - t) * (0.1 + 0.9 * torch.rand(16, generator=g, dtype=torch.float64))
    u_mf, target_mf = MeanFlow().prediction_and_target(net, x, t, d, None, v)
    errors = []
    for alpha in (1e-3, 1e-5):
        u, target = constant(alpha).prediction_and_target_alpha(net, x, t, d, None, v, alpha)
        torch.testing.assert_close(u, u_mf)
        limit = u - (u - target) / alpha
        errors.append(float((limit - target_mf).detach().abs().max()))
    assert errors[0] < 1e-2 and errors[1] < 1e-4, errors  # O(alpha): 100x closer at 100x less
    assert errors[1] < errors[0] / 50, errors
    # not a tautology: the target is far from u and from v
    assert (
        float((target_mf - u_mf).abs().mean()) > 0.1 and float((target_mf - v).abs().mean()) > 0.1
    )


def test_finite_step_target_by_hand():
    """``u_tgt = alpha v + (1 - alpha) u(z_t + alpha d v, t + alpha d, (1 - alpha) d)`` on ``d > 0``
    rows, ``v`` on ``d = 0`` rows."""
    net = random_mlp()
    x, v = torch.randn(6, 2), torch.randn(6, 2)
    t = torch.full((6,), 0.2)
    d = torch.tensor([0.0, 0.0, 0.3, 0.5, 0.1, 0.7])
    _, target = constant(0.3).prediction_and_target_alpha(net, x, t, d, None, v, 0.3)
    with torch.no_grad():
        want = 0.3 * v + 0.7 * net(x + bcast(0.3 * d, v) * v, t + 0.3 * d, 0.7 * d)
    torch.testing.assert_close(target[2:], want[2:])
    torch.testing.assert_close(target[:2], v[:2])


def test_curriculum():
    af = AlphaFlow(total_steps=1000)  # sigmoid 1 -> 0 over the run, gamma 25, clamp 0.005
    values = [af.alpha(s) for s in range(0, 1001, 50)]
    assert values[0] == 1.0 and values[-1] == 0.0 and af.alpha(500) == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    # loss.py get_ratio: a0 + (a1 - a0) sigmoid(gamma (step - mid) / span) = 1 - sigmoid(-5) here
    assert af.alpha(300) == pytest.approx(1 - 1 / (1 + torch.e**5), rel=1e-9)
    lin = AlphaFlow(total_steps=100, alpha_schedule="linear", alpha_from=0.2, alpha_to=0.6)
    assert [lin.alpha(s) for s in (0, 20, 40, 60, 90)] == pytest.approx([1, 1, 0.5, 0, 0])
    assert constant(0.003).alpha(0) == 0.0 and constant(0.997).alpha(0) == 1.0  # the clamp


def test_cli_trains_and_evaluates_alpha_flow(tmp_path):
    import json

    from conftest import SMOKE, run_cli

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    proc = run_cli(
        "method=alpha_flow",
        "train.steps=2",
        *SMOKE,
        f"paths.root={tmp_path}",
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (rd,) = (tmp_path / "runs").iterdir()
    state = json.loads((rd / "state.json").read_text())
    assert rd.name.startswith("alpha_flow-") and state["status"] == "finished"
    assert state["budget"]["budget/forward_equivalents"] == 2 * 8 * 4.0
