"""sCT / sCD (methods/scm.py): the TrigFlow mapping onto the linear path, the JVP and the tangent
against finite differences, the exact Gaussian consistency map (tangent zero), warm-up, the
weights, the sampler. The shared checks (loss falls, cost counted, resume bitwise, options) are in
tests/test_method_contract.py.

No golden fixtures: the reference code (NVIDIA FastGen's sCM) needs its full package (diffusers,
its network wrappers and noise schedules) to run; the checks below are closed-form instead.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import Analytic, bcast

from bench.data import Batch
from bench.mlp import VelocityMLP
from methods.base import Nets
from methods.scm import SCM, linear_time, trig_time

MU, STD = (
    torch.tensor([2.0, -1.0], dtype=torch.float64),
    torch.tensor([0.5, 1.5], dtype=torch.float64),
)


def cov(t):
    """Per-coordinate variance of x_t for x1 ~ N(MU, diag(STD^2)): (1 - t)^2 + t^2 STD^2."""
    return (1 - t) ** 2 + t**2 * STD**2


def exact_u(x, t, d, y=None):
    """The exact average velocity ``(x_{t+d} - x) / d`` of the Gaussian flow (docs/methods.md)."""
    t, d = t[:, None], d[:, None]
    x_s = (t + d) * MU + (cov(t + d) / cov(t)).sqrt() * (x - t * MU)
    return (x_s - x) / d


def exact_v(x, t, d, y=None):
    """The exact flow-matching velocity ``MU + C_t' / (2 C_t) (x - t MU)``."""
    t = t[:, None]
    return MU + (-2 * (1 - t) + 2 * t * STD**2) / (2 * cov(t)) * (x - t * MU)


def method(**kw) -> SCM:
    return SCM(total_steps=100, **kw)


def random_mlp(seed=0):
    """A float64 MLP with every weight random (the zero-initialised output would hide errors)."""
    torch.manual_seed(seed)
    net = VelocityMLP((2,), hidden=32, depth=3, d_embedding="linear", t_scale=1.0)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return net.double()


def draws(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x1 = MU + STD * torch.randn(n, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 2, generator=g, dtype=torch.float64)
    tau = (0.05 + 0.9 * torch.rand(n, generator=g, dtype=torch.float64)) * math.pi / 2
    return x1, eps, tau


def trig_point(m: SCM, x1, eps, tau):
    c, sn = bcast(torch.cos(tau), x1), bcast(torch.sin(tau), x1)
    z = m.sigma_d * eps
    return c * x1 + sn * z, c * z - sn * x1  # x^ and the conditional dx^/dtau


@pytest.mark.parametrize("sigma_d", [0.5, 1.0, 2.0])
def test_trigflow_point_is_a_scaled_point_of_the_linear_path(sigma_d):
    m = method(sigma_d=sigma_d)
    x1, eps, tau = draws()
    xh, _ = trig_point(m, x1, eps, tau)
    k, s, d = linear_time(tau, sigma_d)
    torch.testing.assert_close(s + d, torch.ones_like(s))
    torch.testing.assert_close(bcast(k, xh) * xh, (1 - bcast(s, x1)) * eps + bcast(s, x1) * x1)
    torch.testing.assert_close(trig_time(s, sigma_d), tau)
    # the ends: tau = pi/2 is pure noise (s = 0, x_s = x^ / sigma_d), tau = 0 is data (s = 1)
    ends = linear_time(torch.tensor([math.pi / 2, 0.0], dtype=torch.float64), sigma_d)[1]
    torch.testing.assert_close(ends, torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_consistency_map_is_one_jump_to_the_end():
    """``cos x^ - sin sigma_d F = x_s + (1 - s) net(x_s, s, 1 - s)``: the TrigFlow output built from
    the network is the one whose consistency map is the network's jump to the data end."""
    m, net = method(), random_mlp()
    x1, eps, tau = draws()
    xh, _ = trig_point(m, x1, eps, tau)
    f = m.consistency_map(m.trig_output(net, xh, tau, None), xh, tau)
    k, s, d = linear_time(tau, m.sigma_d)
    x = bcast(k, xh) * xh
    torch.testing.assert_close(f, x + bcast(d, x) * net(x, s, d))
    # not a tautology: F is not the network's output itself
    with torch.no_grad():
        assert float((m.trig_output(net, xh, tau, None) - net(x, s, d)).abs().mean()) > 0.1


def test_jvp_equals_central_differences():
    """``cos sin dF/dtau`` from the JVP with tangents ``(cs dx^/dtau, cs)`` equals the central
    difference of ``F`` along that direction (float64, a random network)."""
    m, net = method(), random_mlp()
    x1, eps, tau = draws()
    xh, dxdt = trig_point(m, x1, eps, tau)
    _, dF = m.output_and_tangent(net, xh, tau, dxdt, None)
    cs = torch.cos(tau) * torch.sin(tau)
    h = 1e-6
    fd = (
        m.trig_output(net, xh + h * bcast(cs, xh) * dxdt, tau + h * cs, None)
        - m.trig_output(net, xh - h * bcast(cs, xh) * dxdt, tau - h * cs, None)
    ) / (2 * h)
    torch.testing.assert_close(dF, fd, rtol=1e-6, atol=1e-7)
    assert float(dF.abs().mean()) > 1e-2


def test_tangent_is_cos_times_the_total_derivative_of_the_consistency_map():
    """At ``r = 1`` and without normalisation, ``g = cos(tau) df/dtau`` along ``(dx^/dtau, 1)``
    (the paper's rearrangement), checked against a central difference of ``f`` itself."""
    m, net = method(tangent_norm="none"), random_mlp()
    x1, eps, tau = draws()
    xh, dxdt = trig_point(m, x1, eps, tau)
    F, dF = m.output_and_tangent(net, xh, tau, dxdt, None)
    g = m.tangent(F.detach(), dF, xh, dxdt, tau, r=1.0)

    def f(e):
        x, tt = xh + e * dxdt, tau + e
        return m.consistency_map(m.trig_output(net, x, tt, None), x, tt)

    h = 1e-6
    fd = bcast(torch.cos(tau), xh) * (f(h) - f(-h)) / (2 * h)
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-7)
    # warm-up: r = 0 keeps only the first term
    c = bcast(torch.cos(tau), xh)
    g0 = m.tangent(F.detach(), dF, xh, dxdt, tau, r=0.0)
    torch.testing.assert_close(g0, -c * c * (m.sigma_d * F.detach() - dxdt))


def test_exact_gaussian_consistency_map_has_zero_tangent():
    """For Gaussian data the exact consistency map is known: with the exact ``u`` as the network
    and the exact flow-matching velocity as the teacher (sCD), the tangent ``cos df/dtau`` vanishes.
    sCT's conditional velocity differs from the teacher's by ``cos^2`` times its residual, which
    averages out given ``x^``."""
    m = method(tangent_norm="none")
    m.attach_teacher(Analytic(exact_v))
    net = Analytic(exact_u)
    x1, eps, tau = draws(n=64)
    tau = tau.clamp(0.1, 1.4)
    xh, dxdt_ct = trig_point(m, x1, eps, tau)
    dxdt = m.teacher_velocity(xh, tau, None)
    F, dF = m.output_and_tangent(net, xh, tau, dxdt, None)
    g = m.tangent(F, dF, xh, dxdt, tau, r=1.0)
    torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=1e-7)
    assert float(dF.abs().mean()) > 0.1  # not a vanishing derivative: the terms cancel
    # the exact map sends noise to data: f(x^, pi/2) = MU + STD x0 (here via the 1-step sampler)
    x0 = torch.randn(8, 2, dtype=torch.float64)
    torch.testing.assert_close(m.sample(net, x0, 1), MU + STD * x0)
    # sCT: g differs by cos^2 (dxdt_ct - dxdt), not zero per sample
    g_ct = m.tangent(F, dF, xh, dxdt_ct, tau, r=1.0)
    c2 = bcast(torch.cos(tau) ** 2, xh)
    torch.testing.assert_close(g_ct, c2 * (dxdt_ct - dxdt), rtol=1e-6, atol=1e-7)


def test_tangent_normalisation():
    m = method(tangent_norm="none")
    x1, eps, tau = draws()
    xh, dxdt = trig_point(m, x1, eps, tau)
    F, dF = torch.randn_like(xh), torch.randn_like(xh)
    g = m.tangent(F, dF, xh, dxdt, tau, 1.0)
    norm = g.norm(dim=1, keepdim=True)
    for how, want in (("l2", g / (norm + 0.1)), ("rms", g / (norm / math.sqrt(2) + 0.1))):
        torch.testing.assert_close(
            method(tangent_norm=how).tangent(F, dF, xh, dxdt, tau, 1.0), want
        )


def test_warmup_spans_its_share_of_the_run():
    m = method(tangent_warmup=0.2)  # 20 of 100 steps
    assert [m.warmup(s) for s in (0, 10, 20, 90)] == [0.0, 0.5, 1.0, 1.0]
    assert method(tangent_warmup=0.0).warmup(0) == 1.0


def test_loss_weights_and_the_learned_logvar():
    """``w / exp(logvar) mse + logvar`` with ``w = 1 / (sigma_d tan tau)``: at ``logvar = 0`` the
    loss is the prior-weighted mse, its gradient in ``logvar`` is ``1 - w mse``, and the logvar head
    is what the trainer optimises beside the network."""
    m, net = method(), random_mlp().float()
    assert m.trainable_parameters() == list(m.logvar.parameters())
    assert method(adaptive_weighting=False).trainable_parameters() == []
    batch = Batch(torch.randn(32, 2), x0=torch.randn(32, 2))
    torch.manual_seed(3)
    loss, logs = m.loss(Nets(net, net), batch, step=50)
    loss.backward()
    assert float(logs["loss/logvar"]) == 0.0
    m2 = method(adaptive_weighting=False)
    torch.manual_seed(3)
    weighted, _ = m2.loss(Nets(net, net), batch, step=50)  # mean(w mse)
    torch.manual_seed(3)
    plain, _ = method(adaptive_weighting=False, prior_weighting=False).loss(
        Nets(net, net), batch, step=50
    )
    assert float(loss) == pytest.approx(float(weighted))
    assert float(weighted) != pytest.approx(float(plain), rel=1e-2)  # the prior weight acts
    # d loss / d bias = mean(1 - w exp(-logvar) mse) at logvar = 0
    grad_bias = float(m.logvar.linear.bias.grad)
    assert grad_bias == pytest.approx(1 - float(weighted), rel=1e-5)


def test_sampler_jumps_and_renoises_at_the_papers_times():
    m = method()
    net = Analytic(lambda x, t, d, y: torch.ones_like(x))
    x0 = torch.randn(4, 2)
    torch.testing.assert_close(m.sample(net, x0, 1), x0 + 1)
    assert (
        len(net.calls) == 1 and float(net.calls[0][1][0]) == 0.0 and float(net.calls[0][2][0]) == 1
    )
    net.calls.clear()
    m.sample(net, x0, 2)
    s_mid = float(linear_time(torch.tensor(1.1, dtype=torch.float64), 0.5)[1])
    assert [round(float(c[1][0]), 6) for c in net.calls] == [0.0, round(s_mid, 6)]
    assert all(torch.allclose(c[1] + c[2], torch.ones(4)) for c in net.calls)  # d = 1 - s
    # N > 2: the re-noising times rise towards the data, the same noise gives the same sample
    s = m.times(8)
    assert s[0] == 0.0 and all(a < b for a, b in zip(s, s[1:], strict=False)) and s[-1] < 1
    torch.testing.assert_close(m.sample(net, x0, 8), m.sample(net, x0, 8))


def test_one_step_samples_learn_the_gaussian_map():
    """Trained briefly on Gaussian data (sCT, 800 steps, the recipe of test_meanflow.py), one step
    lands near the exact map ``MU + STD x0``: RMS 0.083 measured (0.080 with ``sigma_d = 1``;
    MeanFlow 0.34 with the same recipe), where flow matching's one step collapses to the mean,
    RMS 1.12."""
    from bench.ema import EMA

    mu, std = MU.float(), STD.float()
    torch.manual_seed(0)
    net = VelocityMLP((2,), hidden=64, depth=3, d_embedding="linear", t_scale=1.0)
    ema = EMA(net, 0.99, warmup=True)
    m = SCM(total_steps=800)
    opt = torch.optim.Adam(list(net.parameters()) + m.trainable_parameters(), lr=2e-3)
    for step in range(800):
        loss, _ = m.loss(Nets(net, ema.net), Batch(mu + std * torch.randn(256, 2)), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(net, step)
    x0 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(7))
    rms = float((m.sample(ema.net, x0, 1) - (mu + std * x0)).square().sum(1).mean().sqrt())
    assert rms < 0.25, f"sCT 1-step RMS error {rms:.3f}"


@pytest.mark.parametrize("teacher", [False, True], ids=["sCT", "sCD"])
def test_cli_trains_and_evaluates_scm(tmp_path, teacher):
    """The real job on the DiT (digits16): the JVP through attention, the logvar head trained by
    the trainer, the budget as stated; sCD trains its flow-matching teacher first."""
    import json

    from conftest import SMOKE, run_cli

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    extra = ["+method.teacher.method=flow_matching"] if teacher else []
    proc = run_cli(
        "method=scm",
        "train.steps=2",
        *SMOKE,
        *extra,
        f"paths.root={tmp_path}",
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FD(train)" in proc.stdout
    (rd,) = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("scm-")]
    state = json.loads((rd / "state.json").read_text())
    assert state["status"] == "finished"
    assert state["budget"]["budget/train_samples"] == 2 * 8
