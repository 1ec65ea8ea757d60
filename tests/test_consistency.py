"""Consistency training / distillation: targets against hand computation on analytic networks, the
curriculum, the teacher step, sampling, costs, bad inputs, and a short 2-D Gaussian run."""

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
from methods.common import interpolate
from methods.consistency import Consistency

MU, STD = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.5])


def f_online(x, t, d, y):
    return -x + 2 * bcast(t, x) + 5 * bcast(d, x)


def f_ema(x, t, d, y):
    return 0.5 * x + bcast(t, x) + 3 * bcast(d, x)


def f_teacher(x, t, d, y):
    return 0.25 * x - bcast(t, x) + 7 * bcast(d, x)


def f_gaussian(x, t, d, y):
    """The exact flow-matching velocity for ``x1 ~ N(MU, diag(STD^2))`` (docs/methods.md)."""
    t = bcast(t, x)
    c = (1 - t) ** 2 + t**2 * STD**2
    dc = -2 * (1 - t) + 2 * t * STD**2
    return MU + dc / (2 * c) * (x - t * MU)


def hand_target(f, x_next, xt, t, d):
    """``(x_{t+d} + (1 - t - d) f(x_{t+d}, t + d, 1) - x_t) / (1 - t)``."""
    one = torch.ones_like(t)
    x1_hat = x_next + bcast(1 - t - d, xt) * f(x_next, t + d, one, None)
    return (x1_hat - xt) / bcast(1 - t, xt)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return Batch(torch.randn(64, 3, generator=g), None, torch.randn(64, 3, generator=g))


@pytest.mark.parametrize("which,f", [("ema", f_ema), ("online", f_online)])
def test_ct_targets_match_a_hand_computation(batch, which, f):
    torch.manual_seed(1)
    ct = Consistency(total_steps=700, target=which)
    online, ema = Analytic(f_online), Analytic(f_ema)
    r = ct.targets(Nets(online, ema), batch, step=300)  # k = floor(7 * 300 / 700) = 3
    d = 1 / 8
    # t on the multiples of d in [0, 1 - d]; the online net is conditioned on d = 1
    assert torch.equal(r.t / d, (r.t / d).round()) and r.t.min() >= 0 and r.t.max() <= 1 - d
    assert len(set(r.t.tolist())) > 4 and torch.all(r.d == 1)
    torch.testing.assert_close(r.xt, interpolate(batch.x0, batch.x1, r.t))
    # one no-grad forward of the target weights only, at x_{t+d} on the path of the SAME noise
    used, unused = (ema, online) if which == "ema" else (online, ema)
    assert len(used.calls) == 1 and not unused.calls
    x, t, dd, _ = used.calls[0]
    torch.testing.assert_close(x, interpolate(batch.x0, batch.x1, r.t + d))
    torch.testing.assert_close(t, r.t + d)
    assert torch.all(dd == 1)
    torch.testing.assert_close(r.target, hand_target(f, x, r.xt, r.t, d))


def test_first_curriculum_level_is_the_one_step_regression(batch):
    # k = 0: d = 1, t = 0, x_{t+d} = x1 and 1 - (t + d) = 0, so the target is x1 - x0 exactly
    r = Consistency(total_steps=100).targets(Nets(Analytic(f_online), Analytic(f_ema)), batch, 0)
    assert torch.all(r.t == 0)
    torch.testing.assert_close(r.target, batch.x1 - batch.x0)


def test_the_curriculum_moves_with_the_step(batch):
    ct = Consistency(total_steps=70)
    assert [ct.level(s) for s in range(0, 80, 5)] == [
        0,
        0,
        1,
        1,
        2,
        2,
        3,
        3,
        4,
        4,
        5,
        5,
        6,
        6,
        6,
        6,
    ]
    assert ct.level(10**6) == 6  # capped: resuming past total_steps stays at d = 1/64
    net = Analytic(f_online)
    for step, k in [(0, 0), (25, 2), (69, 6)]:
        torch.manual_seed(step)
        r = ct.targets(Nets(net, net), batch, step)
        grid = r.t * 2**k
        assert torch.equal(grid, grid.round()) and r.t.max() <= 1 - 2.0**-k
        _, logs = ct.loss(Nets(net, net), batch, step)
        assert float(logs["consistency/k"]) == k


def test_cd_takes_one_teacher_euler_step_and_targets_from_the_student_ema(batch):
    torch.manual_seed(2)
    y = torch.arange(64) % 10
    cd = Consistency(total_steps=700, clip=None, label_dropout=0.0)
    teacher = Analytic(f_teacher, num_classes=10)
    cd.attach_teacher(teacher)
    online, ema = Analytic(f_online, num_classes=10), Analytic(f_ema, num_classes=10)
    r = cd.targets(Nets(online, ema), Batch(batch.x1, y, batch.x0), step=0)  # no curriculum
    d = FLOW_MATCHING_LEVEL
    assert cd.level(0) == cd.level(699) == 7
    assert torch.equal(r.t * 128, (r.t * 128).round()) and r.t.max() <= 127 / 128
    ((xt_seen, t_seen, d_seen, y_seen),) = cd.teacher.calls  # exactly one teacher forward
    torch.testing.assert_close(xt_seen, r.xt)
    torch.testing.assert_close(t_seen, r.t)
    assert torch.all(d_seen == FLOW_MATCHING_LEVEL) and torch.equal(y_seen, y)
    x_next = r.xt + d * f_teacher(r.xt, r.t, d_seen, y)  # one Euler step, NOT the data path
    ((x_ema, t_ema, _, y_ema),) = ema.calls  # exactly one target forward
    torch.testing.assert_close(x_ema, x_next)
    torch.testing.assert_close(t_ema, r.t + d)
    assert torch.equal(y_ema, y) and not online.calls
    torch.testing.assert_close(r.target, hand_target(f_ema, x_next, r.xt, r.t, d))
    assert not torch.allclose(x_next, interpolate(batch.x0, batch.x1, r.t + d))


def test_attached_teacher_is_a_frozen_eval_copy_carried_by_checkpoints():
    net = VelocityMLP((2,), hidden=8, depth=2)
    cd = Consistency(total_steps=10)
    assert cd.teacher is None and cd.cost().per_sample == 4
    cd.attach_teacher(net)
    assert cd.teacher is not net and not cd.teacher.training
    assert not any(p.requires_grad for p in cd.teacher.parameters())
    assert any(k.startswith("teacher.") for k in cd.state_dict())
    cd.train()
    assert not cd.teacher.training
    assert cd.cost().per_sample == 5


def test_cd_clips_the_teacher_step():
    cd = Consistency(total_steps=10, clip=4.0)
    cd.attach_teacher(Analytic(lambda x, t, d, y: torch.full_like(x, 1e4)))
    ema = Analytic(f_ema)
    cd.targets(Nets(Analytic(f_online), ema), Batch(torch.zeros(8, 2)), 0)
    assert float(ema.calls[0][0].abs().max()) == 4.0


def test_one_label_per_row_for_online_target_and_teacher(batch):
    y = torch.arange(64) % 10
    cd = Consistency(total_steps=10, label_dropout=0.5)
    cd.attach_teacher(Analytic(f_teacher, num_classes=10))
    online, ema = Analytic(f_online, num_classes=10), Analytic(f_ema, num_classes=10)
    torch.manual_seed(0)
    r = cd.targets(Nets(online, ema), Batch(batch.x1, y, batch.x0), 0)
    dropped = r.y == 10
    assert 0 < int(dropped.sum()) < 64 and torch.equal(r.y[~dropped], y[~dropped])
    assert torch.equal(cd.teacher.calls[0][3], r.y) and torch.equal(ema.calls[0][3], r.y)


def test_targets_carry_no_gradient(batch):
    net = VelocityMLP((3,), hidden=16, depth=2)
    torch.nn.init.normal_(net.out.weight)
    r = Consistency(total_steps=10, target="online").targets(Nets(net, net), batch, 5)
    assert not r.target.requires_grad


@pytest.mark.parametrize("kind", ["mse", "pseudo_huber"])
def test_loss_matches_a_hand_computation(batch, kind):
    ct = Consistency(total_steps=10, loss=kind)
    nets = Nets(Analytic(f_online), Analytic(f_ema))
    torch.manual_seed(3)
    r = ct.targets(nets, batch, 5)
    diff = f_online(r.xt, r.t, r.d, None) - r.target
    if kind == "mse":
        expected = diff.square().mean()
    else:
        c = 0.00054 * math.sqrt(3)
        expected = ((diff.square().sum(1) + c**2).sqrt() - c).mean()
    torch.manual_seed(3)
    loss, logs = ct.loss(nets, batch, 5)
    torch.testing.assert_close(loss, expected)
    assert float(logs["consistency/k"]) == 3


@pytest.mark.parametrize("with_teacher", [False, True])
def test_stated_cost_equals_counted_calls(with_teacher):
    torch.manual_seed(0)
    method = Consistency(total_steps=10)
    if with_teacher:
        method.attach_teacher(CountingNet(VelocityMLP((2,), 16, 2)))
    online, ema = CountingNet(VelocityMLP((2,), 16, 2)), CountingNet(VelocityMLP((2,), 16, 2))
    method.loss(Nets(online, ema), Batch(torch.randn(100, 2)), 3)
    counted = online.forward_equivalents() + ema.forward_equivalents()
    if with_teacher:
        counted += method.teacher.forward_equivalents()
    assert counted / 100 == method.cost().per_sample


def perfect(a):
    """A consistency model whose jump from anywhere lands on ``a``: ``s = (a - x) / (1 - t)``."""
    return Analytic(lambda x, t, d, y: (a - x) / (1 - bcast(t, x)))


def test_one_step_sample_is_x0_plus_s_at_d_one():
    net = Analytic(lambda x, t, d, y: x + 1)
    x0 = torch.randn(5, 2)
    torch.testing.assert_close(Consistency(total_steps=1).sample(net, x0, 1), x0 + (x0 + 1))
    ((_, t, d, _),) = net.calls
    assert torch.all(t == 0) and torch.all(d == 1)


@pytest.mark.parametrize("steps", [2, 4, 128])
def test_multistep_denoises_and_renoises_with_fresh_seeded_noise(steps):
    ct, net, a = Consistency(total_steps=1), perfect(3.0), 3.0
    x0 = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1))
    rng = torch.get_rng_state()
    out = ct.sample(net, x0, steps)
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG must stay untouched"
    torch.testing.assert_close(out, torch.full_like(x0, a))  # every jump lands on a
    assert len(net.calls) == steps and ct.nfe(steps, conditional=False) == steps
    assert all(torch.all(d == 1) for _, _, d, _ in net.calls)
    assert [float(t[0]) for _, t, _, _ in net.calls] == pytest.approx(
        [i / steps for i in range(steps)]
    )
    # the input at t_i is (1 - t_i) z_i + t_i a: recover the fresh noise z_i of each re-noising
    zs = [(x - bcast(t, x) * a) / (1 - bcast(t, x)) for x, t, _, _ in net.calls[1:]]
    for z in zs[:3]:
        assert abs(float(z.mean())) < 0.1 and abs(float(z.std()) - 1) < 0.1
        assert not torch.allclose(z, x0)
    if len(zs) > 1:
        assert not torch.allclose(zs[0], zs[1])
    # deterministic given the noise; other noise (another evaluation batch) gets other re-noise
    first = [x for x, _, _, _ in net.calls]
    net.calls.clear()
    ct.sample(net, x0, steps)
    assert all(torch.equal(a, b) for a, (b, _, _, _) in zip(first, net.calls, strict=True))
    other = perfect(a)
    ct.sample(other, x0.flip(0), steps)
    assert not torch.allclose(other.calls[1][0], first[1].flip(0))


def test_euler_sampler_is_the_official_evaluation():
    net = Analytic(lambda x, t, d, y: torch.ones_like(x))
    x0 = torch.zeros(3, 2)
    out = Consistency(total_steps=1, sampler="euler").sample(net, x0, 4)
    torch.testing.assert_close(out, torch.ones(3, 2))  # four steps of 1/4
    assert len(net.calls) == 4 and all(torch.all(d == 1) for _, _, d, _ in net.calls)


def test_step_size_is_one_and_cfg_doubles_nfe():
    ct = Consistency(total_steps=1, cfg_scale=2.0)
    assert all(ct.step_size(n) == 1.0 for n in (1, 2, 4, 8, 16, 32, 64, 128))
    assert ct.nfe(4, conditional=True) == 8 and ct.nfe(4, conditional=False) == 4
    net = Analytic(lambda x, t, d, y: (y != 2).float().view(-1, 1).expand_as(x), num_classes=2)
    out = ct.sample(net, torch.zeros(2, 1), 1, torch.tensor([0, 1]))
    torch.testing.assert_close(out, torch.full((2, 1), 2.0))  # guided jump: scale * 1


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"total_steps": 0}, r"method.total_steps=0 is not allowed: an integer >= 1$"),
        ({"total_steps": 2.5}, r"method.total_steps=2.5 is not allowed: an integer >= 1$"),
        ({"total_steps": True}, r"method.total_steps=True is not allowed: an integer >= 1$"),
        ({"target": "teacher"}, r"method.target='teacher' is not allowed: one of ema, online$"),
        ({"loss": "l1"}, r"method.loss='l1' is not allowed: one of mse, pseudo_huber$"),
        ({"sampler": "ddim"}, r"method.sampler='ddim' is not allowed: one of renoise, euler$"),
        ({"clip": -1.0}, r"method.clip=-1.0 is not allowed: a number > 0 or null$"),
        ({"label_dropout": 1.5}, r"method.label_dropout=1.5 is not allowed: a number in \[0, 1\]$"),
    ],
)
def test_bad_options_are_one_clear_sentence(kwargs, message):
    with pytest.raises(UserError, match=message):
        Consistency(**{"total_steps": 10, **kwargs})


@pytest.mark.parametrize("steps", [3, 0, 256, 1.5])
def test_budget_must_be_a_power_of_two_up_to_128(steps):
    with pytest.raises(UserError, match=f"step budget {steps!r} is not allowed for Consistency"):
        Consistency(total_steps=1).sample(perfect(0.0), torch.zeros(2, 2), steps)


@pytest.fixture
def one_thread():
    """Tiny MLP steps are latency-bound: one intra-op thread is faster than two, and far faster
    when the two cores are shared (measured 1.5 s against 3 to 86 s for the same run)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def train(method, steps, batch_size, seed=0):
    torch.manual_seed(seed)
    net = VelocityMLP((2,), hidden=64, depth=3)
    ema = EMA(net, rate=0.999, warmup=True)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.0)
    losses, levels = [], []
    for step in range(steps):
        x1 = MU + STD * torch.randn(batch_size, 2)
        loss, logs = method.loss(Nets(net, ema.net), Batch(x1), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(net, step)
        losses.append(float(loss.detach()))
        levels.append(int(logs["consistency/k"]))
    return ema.net, torch.tensor(losses), levels


def test_ct_on_a_2d_gaussian_learns_a_one_step_map(one_thread):
    """400 steps through the whole curriculum on ``x1 ~ N(MU, diag(STD^2))``. The loss stays
    finite, falls within the first level (``d = 1``), and the one-step map lands within 0.6 (RMS
    over 2,000 noises) of the exact map ``MU + STD x0`` -- a flow-matching model's one step
    collapses to ``MU``, 1.58 away. Multistep re-noised samples keep the data's mean."""
    ct = Consistency(total_steps=400)
    net, losses, levels = train(ct, 400, 256)
    assert torch.isfinite(losses).all()
    assert levels[0] == 0 and levels[-1] == 6 and levels == sorted(levels)
    first = losses[: levels.count(0)]
    assert first[-10:].mean() < 0.7 * first[:10].mean()
    x0 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(7))
    one = ct.sample(net, x0, 1)
    rms = float((one - (MU + STD * x0)).square().sum(1).mean().sqrt())
    assert rms < 0.6, f"CT one-step RMS error {rms:.3f}"
    four = ct.sample(net, x0, 4)
    assert float((four.mean(0) - MU).norm()) < 0.3


def test_cd_from_the_exact_teacher_trains_with_finite_falling_loss(one_thread):
    cd = Consistency(total_steps=300)
    cd.attach_teacher(Analytic(f_gaussian))
    _, losses, levels = train(cd, 300, 128)
    assert torch.isfinite(losses).all() and set(levels) == {7}
    assert losses[-30:].mean() < losses[:30].mean()
