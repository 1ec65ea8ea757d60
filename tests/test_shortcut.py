"""Shortcut models: targets against hand computation, the contract's edges, and a closed form."""

import math

import pytest
import torch
from conftest import Analytic, bcast

from bench.budget import CountingNet
from bench.data import Batch
from bench.dit import FLOW_MATCHING_LEVEL
from bench.ema import EMA
from bench.errors import UserError
from bench.mlp import VelocityMLP
from methods.base import Nets
from methods.flow_matching import FlowMatching
from methods.shortcut import Shortcut


def f_online(x, t, d, y):
    return -x + 2 * bcast(t, x) + 5 * bcast(d, x)


def f_ema(x, t, d, y):
    return 0.5 * x + bcast(t, x) + 3 * bcast(d, x)


def hand_target(f, xt, t, half, clip=4.0):
    """Two half steps of size ``half`` with ``f``, the second at time ``t + half``, averaged."""
    v1 = f(xt, t, half, None)
    x_mid = (xt + bcast(half, xt) * v1).clamp(-clip, clip)
    v2 = f(x_mid, t + half, half, None)
    return ((v1 + v2) / 2).clamp(-clip, clip)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return Batch(torch.randn(16, 3, generator=g), None, torch.randn(16, 3, generator=g))


@pytest.mark.parametrize("weights,f", [("ema", f_ema), ("online", f_online)])
def test_targets_match_a_hand_computation(batch, weights, f):
    torch.manual_seed(1)
    sc = Shortcut(k_ratio=0.25, target_weights=weights)
    r = sc.targets(Nets(Analytic(f_online), Analytic(f_ema)), batch)
    m = r.num_consistency
    assert m == 4  # exactly k_ratio of the batch

    # distinct rows: each part is built from its own data rows and its own noise rows
    torch.testing.assert_close(
        r.xt, (1 - bcast(r.t, batch.x0)) * batch.x0 + bcast(r.t, batch.x1) * batch.x1
    )
    # self-consistency rows: full step 2d = 2^-k with k in 0..6, t a multiple of 2d in [0, 1)
    full = r.d[:m]
    k = -torch.log2(full)
    assert torch.equal(k, k.round()) and k.min() >= 0 and k.max() <= 6
    assert torch.allclose(r.t[:m] / full, (r.t[:m] / full).round()) and (r.t[:m] < 1).all()
    torch.testing.assert_close(r.target[:m], hand_target(f, r.xt[:m], r.t[:m], full / 2))
    # the second half step is taken at t + d, not t (the paper's eq. 5 typo)
    wrong = (
        f(r.xt[:m], r.t[:m], full / 2, None)
        + f(
            r.xt[:m] + bcast(full / 2, r.xt[:m]) * f(r.xt[:m], r.t[:m], full / 2, None),
            r.t[:m],
            full / 2,
            None,
        )
    ) / 2
    assert not torch.allclose(r.target[:m], wrong.clamp(-4, 4))
    # flow-matching rows: level 7 and the empirical velocity
    assert torch.all(r.d[m:] == FLOW_MATCHING_LEVEL)
    torch.testing.assert_close(r.target[m:], batch.x1[m:] - batch.x0[m:])


def test_labels_real_on_bootstrap_rows_and_dropped_only_on_flow_rows(batch):
    y = torch.arange(16) % 10
    sc = Shortcut(k_ratio=0.25, label_dropout=1.0)
    net = Analytic(f_online, num_classes=10)
    r = sc.targets(Nets(net, net), Batch(batch.x1, y, batch.x0))
    assert torch.equal(r.y[:4], y[:4])  # bootstrap rows: the real label
    assert torch.all(r.y[4:] == 10)  # flow rows: dropped to the null label with p = 1
    assert all(torch.equal(c[3], y[:4]) for c in net.calls)  # the target network saw real labels


def test_bootstrap_targets_carry_no_gradient(batch):
    net = VelocityMLP((3,), hidden=16, depth=2)
    torch.nn.init.normal_(net.out.weight)
    r = Shortcut(k_ratio=0.5).targets(Nets(net, net), batch)
    assert not r.target.requires_grad


@pytest.mark.parametrize("k_ratio,expected", [(0.0, 0), (0.125, 2), (0.5, 8), (0.99, 15)])
def test_fraction_of_the_batch(batch, k_ratio, expected):
    net = Analytic(f_online)
    assert Shortcut(k_ratio=k_ratio).split(16) == expected
    loss, logs = Shortcut(k_ratio=k_ratio).loss(Nets(net, net), batch, 0)
    assert torch.isfinite(loss) and ("loss/consistency" in logs) == (expected > 0)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 4, float("nan")])
def test_k_ratio_outside_unit_interval_is_one_clear_error(bad):
    with pytest.raises(UserError, match=r"method.k_ratio=.* is not allowed: a number in \[0, 1\)$"):
        Shortcut(k_ratio=bad)


def test_level_sampling_uniform_and_official_even_allocation():
    sc = Shortcut()
    torch.manual_seed(0)
    counts = torch.bincount(sc.levels(7000, "cpu"), minlength=7)
    assert counts.numel() == 7, "levels are 0..6 only (7 is the flow-matching level)"
    assert counts.min() > 850 and counts.max() < 1150
    even = Shortcut(level_sampling="even")
    assert even.levels(16, "cpu").tolist() == [6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0, 0, 0]
    # the official code's small-batch wart: every row lands on d = 1
    assert even.levels(5, "cpu").tolist() == [0] * 5


@pytest.mark.parametrize("steps", [3, 6, 0, 256, 1.5, float("nan")])
def test_budget_must_be_a_power_of_two_up_to_128(steps):
    with pytest.raises(UserError, match=f"step budget {steps!r} is not allowed"):
        Shortcut().sample(Analytic(f_online), torch.zeros(2, 3), steps)


def test_sampling_conditions_on_d_equal_one_over_n():
    net = Analytic(lambda x, t, d, y: torch.zeros_like(x))
    for n in (1, 4, 128):
        net.calls.clear()
        Shortcut().sample(net, torch.zeros(2, 3), n)
        assert len(net.calls) == n
        assert all(torch.all(d == 1 / n) for _, _, d, _ in net.calls)
        assert [float(t[0]) for _, t, _, _ in net.calls] == pytest.approx([i / n for i in range(n)])


def test_cfg_only_at_the_flow_matching_level():
    net = Analytic(lambda x, t, d, y: (y != 2).float().view(-1, 1).expand_as(x), num_classes=2)
    sc = Shortcut(cfg_scale=3.0)
    y = torch.tensor([0, 1])
    assert torch.allclose(sc.sample(net, torch.zeros(2, 1), 4, y), torch.ones(2, 1))  # unguided
    assert torch.allclose(sc.sample(net, torch.zeros(2, 1), 128, y), torch.full((2, 1), 3.0))
    assert sc.nfe(4, True) == 4 and sc.nfe(128, True) == 256 and sc.nfe(128, False) == 128


def test_baked_cfg_guides_only_the_smallest_bootstrap_level():
    # velocity 1 for a real label, 0 for the null label: guided velocity = scale
    f = lambda x, t, d, y: (y != 10).float().view(-1, 1).expand_as(x)  # noqa: E731
    sc = Shortcut(bake_cfg_scale=1.5, clip=None)
    xt, t = torch.zeros(3, 2), torch.zeros(3)
    half = torch.tensor([FLOW_MATCHING_LEVEL, 1 / 64, 0.5])
    target = sc.bootstrap_target(Analytic(f, num_classes=10), xt, t, half, torch.tensor([1, 2, 3]))
    torch.testing.assert_close(target[:, 0], torch.tensor([1.5, 1.0, 1.0]))


def train_gaussian(method, mu, std, steps=1500, seed=0):
    torch.manual_seed(seed)
    net = VelocityMLP((2,), hidden=128, depth=3)
    ema = EMA(net, rate=0.999, warmup=True)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.0)
    for step in range(steps):
        x1 = mu + std * torch.randn(256, 2)
        loss, _ = method.loss(Nets(net, ema.net), Batch(x1), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(net, step)
    return ema.net


def counted_per_row(method, batch_size=700, y=None):
    """Forward-equivalents per row that one loss call really spends (``CountingNet``)."""
    torch.manual_seed(0)
    online, ema = (CountingNet(VelocityMLP((2,), 16, 2, num_classes=5)) for _ in range(2))
    method.loss(Nets(online, ema), Batch(torch.randn(batch_size, 2), y), 0)
    return (online.forward_equivalents() + ema.forward_equivalents()) / batch_size


@pytest.mark.parametrize("kwargs", [{"k_ratio": 0.5, "target_weights": "online"}, {"k_ratio": 0.0}])
def test_stated_cost_equals_counted_calls_off_the_defaults(kwargs):
    """The contract test checks the defaults; these options change which networks are called."""
    sc = Shortcut(**kwargs)
    assert counted_per_row(sc) == pytest.approx(sc.cost().per_sample)


def test_baked_cfg_cost_matches_in_expectation():
    y = torch.randint(5, (7000,))
    sc = Shortcut(k_ratio=0.25, bake_cfg_scale=1.5)
    assert counted_per_row(sc, 7000, y) == pytest.approx(sc.cost().per_sample, rel=0.01)


def test_closed_form_gaussian_one_step_map():
    r"""Data ``x1 ~ N(mu, diag(s^2))``, noise ``x0 ~ N(0, I)``, ``x_t = (1 - t) x0 + t x1``.

    Then ``x_t ~ N(t mu, C_t)`` with ``C_t = (1 - t)^2 I + t^2 diag(s^2)``; all ``C_t`` are diagonal
    (they commute), and the probability-flow ODE moves each coordinate affinely:
    ``x_s = s mu + sqrt(C_s / C_t) (x_t - t mu)``. From ``t = 0`` (``C_0 = I``) to ``s = 1``
    (``C_1 = diag(s^2)``) the exact noise -> data map is ``x1 = mu + s * x0``.

    The exact flow-matching velocity is ``v(x, t) = mu + (C_t' / 2 C_t)(x - t mu)`` with
    ``C_t' = -2 (1 - t) + 2 t s^2``; at ``t = 0`` it is ``mu - x``, so one Euler step of a perfect
    flow-matching model gives ``x0 + (mu - x0) = mu``: every sample collapses to the mean.

    A shortcut model learns the jump itself: after a short training run its 1-step map must be
    within 0.25 (RMS over 2,000 noises) of ``mu + s x0`` -- small against the data scale
    ``s = (0.5, 1.5)`` -- while a flow-matching model trained identically must be far from it
    (RMS > 0.7, the collapse costs ``sqrt(mean(s^2)) = 1.12``) yet close at 128 steps.
    """
    mu, std = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.5])
    x0 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(7))
    exact = mu + std * x0
    rms = lambda a: float((a - exact).square().sum(1).mean().sqrt())  # noqa: E731

    sc, fm = Shortcut(), FlowMatching()
    sc_net = train_gaussian(sc, mu, std)
    fm_net = train_gaussian(fm, mu, std)
    sc_err, fm_err = rms(sc.sample(sc_net, x0, 1)), rms(fm.sample(fm_net, x0, 1))
    assert sc_err < 0.25, f"shortcut 1-step RMS error {sc_err:.3f}"
    assert fm_err > 0.7, f"flow matching 1-step RMS error {fm_err:.3f} (should collapse)"
    assert rms(fm.sample(fm_net, x0, 128)) < 0.25
    # the flow-matching one-step output is (nearly) the data mean
    assert float((fm.sample(fm_net, x0, 1).mean(0) - mu).norm()) < 0.2
    assert math.isfinite(sc_err)
