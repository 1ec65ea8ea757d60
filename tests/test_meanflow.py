"""MeanFlow: the JVP target against finite differences and a closed form, the r = t reduction to
flow matching, gradients through the JVP's primal, guidance, sampling, and the CLI."""

import json

import pytest
import torch
from conftest import SMOKE, Analytic, bcast, run_cli

from bench.budget import CountingNet
from bench.data import Batch
from bench.dit import DiT
from bench.ema import EMA
from bench.errors import UserError
from bench.mlp import VelocityMLP
from bench.run import build
from methods.base import Nets
from methods.flow_matching import FlowMatching
from methods.meanflow import MeanFlow

EMBEDDING = {"d_embedding": MeanFlow.d_embedding, "t_scale": MeanFlow.t_scale}


def random_dit(dtype=torch.float32, num_classes=0, seed=0):
    """A tiny DiT whose every weight is random (adaLN-Zero would make the output, and so every
    derivative, exactly zero)."""
    torch.manual_seed(seed)
    net = DiT((1, 8, 8), 32, 2, 4, patch=4, num_classes=num_classes, **EMBEDDING)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return net.to(dtype)


def random_mlp(dim=2, seed=0, **kw):
    torch.manual_seed(seed)
    net = VelocityMLP((dim,), hidden=32, depth=3, **EMBEDDING, **kw)
    torch.nn.init.normal_(net.out.weight, std=0.3)
    return net


# -- (1) the JVP target against central finite differences -----------------------------------------
def test_jvp_target_matches_central_differences_along_the_trajectory():
    """Target ``v + d du/dt`` with ``du/dt`` the derivative of ``net(z + e v, t + e, d - e)`` at
    ``e = 0``: the start time moves along the trajectory, the end time ``s = t + d`` stays fixed."""
    net = random_dit(torch.float64, num_classes=3)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    v = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.5, 0.2], dtype=torch.float64)
    d = torch.tensor([0.5, 0.4, 0.25, 0.7], dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])  # 3 = the null label

    u, target = MeanFlow().prediction_and_target(net, z, t, d, y, v)
    torch.testing.assert_close(u, net(z, t, d, y), rtol=1e-12, atol=1e-12)

    def f(e, sign_d):
        return net(z + e * v, t + e, d + sign_d * e, y)

    def derivative(sign_d=-1.0, h=1e-6):  # five-point central stencil, error O(h^4)
        with torch.no_grad():
            near = f(h, sign_d) - f(-h, sign_d)
            far = f(2 * h, sign_d) - f(-2 * h, sign_d)
        return (8 * near - far) / (12 * h)

    dudt, wrong = derivative(), derivative(+1.0)  # wrong: a +1 tangent on d moves s too
    torch.testing.assert_close(target, v + bcast(d, v) * dudt, rtol=1e-7, atol=1e-6)
    # the derivative term is large here, and the sign of the d tangent matters
    assert float((bcast(d, v) * dudt).abs().mean()) > 0.1
    assert not torch.allclose(target, v + bcast(d, v) * wrong, atol=1e-2)


# -- times: drawn in the paper's time, converted at the method's boundary --------------------------
@pytest.mark.parametrize("sampler", ["logit_normal", "uniform"])
def test_times_are_the_papers_draws_converted(sampler):
    """Paper (noise at 1): ``t', r'`` two draws, ``t' = max``, ``r' = min``, ``r' = t'`` on the
    flow-matching rows. Ours: the step starts at ``t = 1 - t'`` and ends at ``s = 1 - r'``."""
    mf = MeanFlow(ratio=0.25, time_sampler=sampler, time_mu=-0.4, time_sigma=1.0)
    torch.manual_seed(0)
    t, d = mf.sample_times(1000, "cpu")
    torch.manual_seed(0)
    if sampler == "uniform":
        a, b = torch.rand(1000), torch.rand(1000)
    else:
        a, b = (torch.sigmoid(-0.4 + torch.randn(1000)) for _ in range(2))
    t_p, r_p = torch.maximum(a, b), torch.minimum(a, b)
    torch.testing.assert_close(t, 1 - t_p)
    torch.testing.assert_close((t + d)[:250], 1 - r_p[:250])
    assert torch.all(d[:250] > 0) and torch.all(d[250:] == 0) and torch.all(t + d <= 1)


# -- (2) r = t on every row: flow matching ---------------------------------------------------------
class IgnoresD(torch.nn.Module):
    """A network that ignores ``d``, so flow matching's level and MeanFlow's 0 give one field."""

    def __init__(self, net):
        super().__init__()
        self.net, self.num_classes = net, net.num_classes

    def forward(self, x, t, d, y=None):
        return self.net(x, t, torch.zeros_like(d), y)


def test_ratio_zero_is_flow_matching():
    g = torch.Generator().manual_seed(0)
    x1, x0 = torch.randn(16, 2, generator=g), torch.randn(16, 2, generator=g)
    batch = Batch(x1, None, x0)
    net = random_mlp()

    # Hand computation on the method's own draws: every d is 0, the target is x1 - x0.
    mf = MeanFlow(ratio=0.0, p=0.0)
    torch.manual_seed(3)
    t, d = mf.sample_times(16, "cpu")
    assert torch.all(d == 0) and torch.all((t >= 0) & (t <= 1))
    torch.manual_seed(3)
    loss, logs = mf.loss(Nets(net, net), batch, 0)
    tb = bcast(t, x0)
    sq = (net((1 - tb) * x0 + tb * x1, t, d) - (x1 - x0)).square().sum(1)
    torch.testing.assert_close(loss, sq.mean())
    assert set(logs) == {"loss/flow"}
    torch.testing.assert_close(logs["loss/flow"], sq.mean() / 2)
    # p = 1: the same squared errors, each divided by its own stop-gradient (||D||^2 + c)
    torch.manual_seed(3)
    weighted, _ = MeanFlow(ratio=0.0).loss(Nets(net, net), batch, 0)
    torch.testing.assert_close(weighted, (sq / (sq + 1e-3)).mean())

    # The same draws through methods/flow_matching.py: value and gradient, up to the dimension
    # (MeanFlow's ||D||^2 sums over the sample, flow matching's MSE averages).
    same = IgnoresD(net)
    torch.manual_seed(5)
    t_fm = torch.rand(16)
    mf.sample_times = lambda n, device: (t_fm, torch.zeros(n))
    loss_mf, _ = mf.loss(Nets(same, same), batch, 0)
    grad_mf = torch.autograd.grad(loss_mf, list(net.parameters()))
    torch.manual_seed(5)
    loss_fm, _ = FlowMatching().loss(Nets(same, same), batch, 0)
    grad_fm = torch.autograd.grad(loss_fm, list(net.parameters()))
    torch.testing.assert_close(loss_mf, 2 * loss_fm)
    for a, b in zip(grad_mf, grad_fm, strict=True):
        torch.testing.assert_close(a, 2 * b)


# -- (3) a closed form: Gaussian data --------------------------------------------------------------
MU, STD = (
    torch.tensor([2.0, -1.0], dtype=torch.float64),
    torch.tensor([0.5, 1.5], dtype=torch.float64),
)


def cov(t):
    """Per-coordinate variance of x_t for x1 ~ N(MU, diag(STD^2)): (1 - t)^2 + t^2 STD^2."""
    return (1 - t) ** 2 + t**2 * STD**2


class ExactAverageVelocity(torch.nn.Module):
    r"""The exact ``u(x, t, d) = (x_{t+d} - x) / d`` of the Gaussian flow (docs/methods.md):
    ``x_s = s MU + sqrt(C_s / C_t) (x - t MU)`` moves each coordinate affinely (d > 0)."""

    num_classes = 0

    def forward(self, x, t, d, y=None):
        t, d = t[:, None], d[:, None]
        x_s = (t + d) * MU + (cov(t + d) / cov(t)).sqrt() * (x - t * MU)
        return (x_s - x) / d


def test_target_of_the_exact_average_velocity_is_itself():
    """With the exact ``u`` as the network and the exact (marginal) velocity as the tangent, the
    MeanFlow target equals ``u``: the identity ``u = v + d du/dt`` holds for the true flow. The
    training loss uses the conditional velocity ``x1 - x0`` instead, whose mean given ``x_t`` is
    this one; the target is affine in it, so its conditional mean is this target."""
    g = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(64, 2, generator=g, dtype=torch.float64)
    t = 0.9 * torch.rand(64, generator=g, dtype=torch.float64)
    d = (1 - t) * (0.05 + 0.95 * torch.rand(64, generator=g, dtype=torch.float64))
    tt = t[:, None]
    dcov = -2 * (1 - tt) + 2 * tt * STD**2
    v = MU + dcov / (2 * cov(tt)) * (x - tt * MU)  # the exact flow-matching velocity

    net = ExactAverageVelocity()
    u, target = MeanFlow().prediction_and_target(net, x, t, d, None, v)
    torch.testing.assert_close(target, u, rtol=1e-10, atol=1e-10)
    # not a tautology: u is far from v, and the other sign of the derivative term is wrong
    assert float((u - v).abs().mean()) > 0.1
    assert not torch.allclose(2 * v - target, u, atol=1e-2)
    # a full step from noise is the exact noise -> data map x1 = MU + STD x0
    ones = torch.ones(64, dtype=torch.float64)
    torch.testing.assert_close(x + net(x, 0 * ones, ones), MU + STD * x)


def test_one_step_samples_learn_the_gaussian_map():
    """Trained briefly on Gaussian data, one MeanFlow step lands near the exact map ``MU + STD x0``
    (RMS 0.34 measured; 0.23 and 0.28 with seeds 1 and 2), where flow matching's one step
    collapses to the mean, RMS ``sqrt(mean(STD^2)) = 1.12`` (test_shortcut.py)."""
    mu, std = MU.float(), STD.float()
    torch.manual_seed(0)
    net = VelocityMLP((2,), hidden=64, depth=3, **EMBEDDING)
    ema = EMA(net, 0.99, warmup=True)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    mf = MeanFlow()
    for step in range(800):
        loss, _ = mf.loss(Nets(net, ema.net), Batch(mu + std * torch.randn(256, 2)), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(net, step)
    x0 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(7))
    rms = float((mf.sample(ema.net, x0, 1) - (mu + std * x0)).square().sum(1).mean().sqrt())
    assert rms < 0.5, f"MeanFlow 1-step RMS error {rms:.3f}"


# -- (4) gradients flow through the JVP's primal ---------------------------------------------------
def test_gradients_flow_through_the_jvp_primal():
    """The loss's gradient equals that of a plain forward against the (detached) JVP target."""
    net = random_dit()
    g = torch.Generator().manual_seed(2)
    batch = Batch(torch.randn(8, 1, 8, 8, generator=g), None, torch.randn(8, 1, 8, 8, generator=g))
    mf = MeanFlow(ratio=0.5)
    torch.manual_seed(4)
    loss, logs = mf.loss(Nets(net, net), batch, 0)
    assert set(logs) == {"loss/flow", "loss/average"}
    params = list(net.parameters())
    grads = torch.autograd.grad(loss, params)

    torch.manual_seed(4)
    t, d = mf.sample_times(8, "cpu")
    assert torch.all(d[:4] > 0) and torch.all(d[4:] == 0)  # r != t rows first
    xt = (1 - bcast(t, batch.x0)) * batch.x0 + bcast(t, batch.x1) * batch.x1
    _, target = mf.prediction_and_target(net, xt, t, d, None, batch.x1 - batch.x0)
    assert not target.requires_grad
    sq = (net(xt, t, d) - target).square().flatten(1).sum(1)
    ref = torch.autograd.grad((sq / (sq.detach() + 1e-3)).mean(), params)
    assert sum(float(gr.abs().sum()) for gr in grads) > 0
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_activation_checkpointing_is_refused_in_one_sentence():
    net = random_dit()
    net.grad_checkpoint = True  # train.grad_checkpoint=true (bench.accel)
    with pytest.raises(UserError, match="grad_checkpoint=true does not work with MeanFlow"):
        MeanFlow().loss(Nets(net, net), Batch(torch.randn(2, 1, 8, 8)), 0)


def test_a_compiled_network_is_refused_in_one_sentence():
    from bench import accel

    net = accel.compile_model(
        random_dit(), "default"
    )  # train.compile=default (lazy: no compile yet)
    with pytest.raises(UserError, match="train.compile does not work with MeanFlow here"):
        MeanFlow().loss(Nets(net, net), Batch(torch.randn(2, 1, 8, 8)), 0)


# -- guidance folded into the target ---------------------------------------------------------------
def test_guided_velocity_mixes_conditional_and_unconditional_at_d_zero():
    # u(., y) = y + 1 for a real label, -1 for the null label 3
    net = Analytic(
        lambda x, t, d, y: torch.where(y == 3, -1.0, y + 1.0).view(-1, 1).expand_as(x),
        num_classes=3,
    )
    x, v = torch.zeros(4, 2), torch.full((4, 2), 10.0)
    t = torch.tensor([0.2, 0.5, 0.5, 0.9])
    y = torch.tensor([0, 1, 3, 2])  # row 2: label dropped
    mf = MeanFlow(omega=2.0, kappa=0.5, guidance_interval=(0.0, 0.8))
    out = mf.guided_velocity(net, x, t, v, y)
    # omega v + kappa (y + 1) + (1 - omega - kappa)(-1) on rows 0, 1; v on the dropped row 2 and
    # on row 3, outside the interval
    expected = torch.tensor([2 * 10 + 0.5 * 1 + 1.5, 2 * 10 + 0.5 * 2 + 1.5, 10.0, 10.0])
    torch.testing.assert_close(out[:, 0], expected)
    assert all(torch.all(dd == 0) for _, _, dd, _ in net.calls)  # u at r = t
    # kappa = 0: only the unconditional forward
    net.calls.clear()
    out = MeanFlow(omega=3.0).guided_velocity(net, x, t, v, y)
    torch.testing.assert_close(out[:, 0], torch.tensor([32.0, 32.0, 10.0, 32.0]))
    assert len(net.calls) == 1 and torch.all(net.calls[0][3] == 3)
    # off by default, and for unconditional data
    assert MeanFlow().guided_velocity(net, x, t, v, y) is v
    assert MeanFlow(omega=3.0).guided_velocity(net, x, t, v, None) is v


@pytest.mark.parametrize(
    "kw,guided_rows", [({}, 0), ({"omega": 2.0}, 1), ({"omega": 1.0, "kappa": 0.5}, 2)]
)
def test_stated_cost_is_the_counted_calls_plus_one_tangent_per_row(kw, guided_rows):
    """``CountingNet`` sees the JVP as one forward with gradient (3 per row) whose tangent pass is
    one forward-equivalent more (bench/budget.py), and folded guidance adds no-grad forwards."""
    online = CountingNet(random_mlp(num_classes=5))
    mf = MeanFlow(label_dropout=0.0, **kw)
    mf.loss(Nets(online, online), Batch(torch.randn(64, 2), torch.randint(5, (64,))), 0)
    assert online.nograd_rows == 64 * guided_rows
    assert online.grad_rows == online.tangent_rows == 64  # one JVP over every row
    assert online.forward_equivalents() / 64 == mf.cost().per_sample == 4 + guided_rows


# -- (5) sampling ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2])
def test_sampling_takes_steps_of_one_over_n_with_n_evaluations(n):
    net = Analytic(lambda x, t, d, y: bcast(t, x) + 1.0)
    x0 = torch.zeros(3, 2)
    out = MeanFlow().sample(net, x0, n, torch.tensor([0, 1, 2]))
    assert len(net.calls) == n
    assert all(torch.all(d == 1 / n) for _, _, d, _ in net.calls)
    assert [float(t[0]) for _, t, _, _ in net.calls] == pytest.approx([i / n for i in range(n)])
    # z <- z + (1/N) u(z, i/N, 1/N): 1 step gives 1, 2 steps give (1 + 1.5) / 2
    torch.testing.assert_close(out, torch.full((3, 2), {1: 1.0, 2: 1.25}[n]))
    # guidance lives in the trained field: no CFG doubling, conditional or not
    assert MeanFlow(omega=2.0).nfe(n, True) == n == MeanFlow().nfe(n, False)


@pytest.mark.parametrize("steps", [3, 0, 256])
def test_budget_must_be_a_power_of_two_up_to_128(steps):
    with pytest.raises(UserError, match=f"step budget {steps} is not allowed for MeanFlow"):
        MeanFlow().sample(Analytic(lambda x, t, d, y: x), torch.zeros(2, 2), steps)


# -- (6) configuration and the CLI -----------------------------------------------------------------
def test_config_builds_meanflow_on_a_linear_d_embedding(compose):
    data, net, method, _ = build(compose("method=meanflow"))
    assert isinstance(method, MeanFlow) and method.explicit_grad_sync
    assert (method.ratio, method.p, method.c, method.time_mu) == (0.25, 1.0, 1e-3, -0.4)
    assert isinstance(net, DiT) and net.d_embedding == "linear"
    assert net.t_embed.scale == net.d_embed.scale == 1.0
    _, mlp, _, _ = build(compose("method=meanflow", "data=toy2d", "size=mlp", "method.t_scale=10"))
    assert isinstance(mlp, VelocityMLP) and mlp.d_embedding == "linear"
    assert mlp.t_embed.scale == mlp.d_embed.scale == 10.0
    # every other method keeps the shortcut embedding: log2(1/d) at 1000/7, t at 1000
    shortcut = build(compose("method=shortcut"))[1]
    assert shortcut.d_embedding == "level"
    assert (shortcut.t_embed.scale, shortcut.d_embed.scale) == (1000.0, 1000.0 / 7)


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "method.time_sampler=grid128",
            "method.time_sampler='grid128' is not allowed: one of logit_normal, uniform",
        ),
        ("method.ratio=1.5", "method.ratio=1.5 is not allowed: a number in [0, 1]"),
        ("method.c=0", "method.c=0 is not allowed: a number > 0"),
        ("method.p=abc", "method.p='abc' is not allowed: a number >= 0"),
        (
            "method.guidance_interval=[0.9,0.1]",
            "method.guidance_interval=[0.9, 0.1] is not allowed: a list of 2 items, each a number "
            "in [0, 1] with lo <= hi",
        ),
        ("method.guidance_interval=[0.1]", "method.guidance_interval=[0.1] is not allowed"),
    ],
)
def test_bad_options_are_one_sentence(compose, override, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace(".", r"\.")):
        build(compose("method=meanflow", override))


def test_cli_trains_and_evaluates_meanflow(tmp_path):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    proc = run_cli(
        "method=meanflow", "train.steps=2", *SMOKE, f"paths.root={tmp_path}", cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FD(train)" in proc.stdout
    (rd,) = (tmp_path / "runs").iterdir()
    state = json.loads((rd / "state.json").read_text())
    assert rd.name.startswith("meanflow-") and state["status"] == "finished"
    assert state["budget"]["budget/forward_equivalents"] == 2 * 8 * 4.0

    bad = run_cli("method=meanflow", "eval.budgets=[1,3]", cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: step budget 3 is not allowed")
