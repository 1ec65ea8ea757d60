"""IMM (methods/imm.py): the official network wrapper, interpolants and samplers against golden
fixtures; the objective against closed forms.

The official code (lumalabs/imm) releases no training code, so there is no official loss to make
fixtures from. What it does release -- ``IMMPrecond`` (the flow map ``f_{s,t}``, the interpolants,
log-SNR and ``eta``) and the pushforward / restart samplers -- was run on a stub network
(tests/golden/generate_imm.py, tests/golden/README.md) and is replayed here at 1e-6 after the
convention mapping (paper time ``tau`` = our ``1 - t``; the paper's space is ``sigma_d`` times
ours). The objective is checked by hand: the MMD estimator, the kernel, the time pairs and their
mapping function, the weight against the paper's formula, and on Gaussian data (exact flow map
known) that the exact map makes the two particle clouds the same distribution while a wrong one
does not, and that brief training learns the one-step map. The contract checks (loss falls, cost
counted, resume bitwise, options) run for the defaults in tests/test_method_contract.py; here
again for the counted cost of both target choices, CFG sampling and a resumed run with other
options.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Analytic, bcast
from torch import Tensor, nn

import methods.imm
from bench.budget import CountingNet
from bench.data import Batch
from bench.errors import UserError
from methods.base import Nets
from methods.imm import IMM, eta, eta_inverse, laplace_kernel, mmd, weight

GOLDEN = Path(__file__).parent / "golden"
TOL = 1e-6
SIGMA_D = 0.5  # the fixtures' sigma_data: their space is SIGMA_D times ours
NUM_CLASSES = 10


def method(**kw) -> IMM:
    return IMM(batch_size=kw.pop("batch_size", 128), **kw)


# -- golden: the official wrapper and samplers ----------------------------------------------------
def load(name: str) -> dict:
    with np.load(GOLDEN / f"{name}.npz", allow_pickle=False) as z:
        fx = {k: z[k] for k in z.files}
    fx["provenance"] = json.loads(str(fx["provenance"]))
    return fx


def t64(a) -> Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


class Stub(nn.Module):
    """The fixtures' network seen through our call: the official wrapper feeds
    ``G(c_in x_tau, 1000 tau, 1000 (tau - s), label)`` with ``c_in x_tau = x / sqrt(tau^2 +
    (1 - tau)^2)`` (``x`` ours), and its ``f = x_tau - (tau - s) sigma_d G`` is ``sigma_d`` times
    our ``x + d u``: so ``u = -G`` at ``tau = 1 - t``. Records every call's ``(t, d)``."""

    num_classes = NUM_CLASSES

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[Tensor, Tensor]] = []

    def forward(self, x: Tensor, t: Tensor, d: Tensor, y: Tensor | None = None) -> Tensor:
        n = x.shape[0]
        t, d = t.expand(n), d.expand(n)
        self.calls.append((t.clone(), d.clone()))
        tau = 1 - t
        z = x / bcast((tau * tau + (1 - tau) ** 2).sqrt(), x)
        g = 1.3 * torch.tanh(z + 0.2) * (1 + bcast(tau, x)) + 0.4 * torch.cos(z) * bcast(d, x)
        if (
            y is not None
        ):  # label index + 1; the null label (ours: num_classes) is 0 (official zeros)
            c = torch.where(y == NUM_CLASSES, torch.zeros_like(y), y + 1).to(x.dtype)
            g = g + 0.05 * bcast(c, x)
        return -g


def biggest(got: dict, want: dict) -> dict[str, float]:
    return {k: float((t64(got[k]) - t64(want[k])).abs().max()) for k in want}


def flow_map_run(mp=None, **options):
    fx = load("imm_flow_map")
    m = method(**options)
    y = torch.from_numpy(fx["labels"]).long()
    f = m.flow_map(Stub(), t64(fx["x"]) / SIGMA_D, t64(fx["t"]), t64(fx["s"]), y)
    return {"f": SIGMA_D * f}, {"f": fx["out_f"]}


def paths_run(mp=None, a: float = 2.0, b: float = 4.0):
    """``x_t``, ``x_r`` (both official forms), ``eta`` and its inverse, and the weight against the
    paper's formula on the official log-SNR (its derivative by central difference)."""
    fx = load("imm_paths")
    x1, x0 = t64(fx["data"]) / SIGMA_D, t64(fx["noise"]) / SIGMA_D
    t, r = t64(fx["t"]), t64(fx["r"])
    lam, h = t64(fx["out_logsnr"]), float(fx["h"])
    dlam = (t64(fx["out_logsnr_plus_h"]) - t64(fx["out_logsnr_minus_h"])) / (2 * h)
    alpha, sigma = 1 - t, t
    paper = 0.5 * torch.sigmoid(b - lam) * (-dlam) * alpha**a / (alpha**2 + sigma**2)
    got = {
        "x_t": SIGMA_D * IMM.point(x0, x1, t),
        "x_r_shared": SIGMA_D * IMM.point(x0, x1, r),
        "x_r_ddim": SIGMA_D * IMM.point(x0, x1, r),
        "eta": eta(t),
        "eta_inverse": eta_inverse(t64(fx["out_eta"])),
        "weight": weight(t, 2.0, 4.0),
    }
    want = {
        "x_t": fx["out_x_t"],
        "x_r_shared": fx["out_x_r_shared_noise"],
        "x_r_ddim": fx["out_x_r_ddim"],
        "eta": fx["out_eta"],
        "eta_inverse": fx["out_nt_to_t_of_eta"],
        "weight": paper,
    }
    return got, want


def sampler_run(name: str, mp=None, key: str = "T0.994_eps0.0_N4", feed_noise=True, **options):
    """Our sampler on the fixture's noise (ours = official / sigma_d), the restart draws fed in
    the order the official code drew them; returns the samples and every call's times."""
    fx = load(name)
    prov = fx["provenance"]
    T, eps, steps = key.split("_")
    official = dict(
        T=float(T[1:]),
        eps=float(eps[3:]),
        sampler="restart" if "restart" in prov["function"] else "pushforward",
        discretization=prov["discretization"],
        cfg_scale=prov["cfg_scale"] or 1.0,
    )
    m = method(**{**official, **options})
    guided = prov["cfg_scale"] is not None
    y = torch.from_numpy(fx[f"{key}_labels"]).long() if guided else None
    if f"{key}_renoise" in fx and feed_noise:
        draws = iter(t64(fx[f"{key}_renoise"]) / SIGMA_D)
        mp.setattr(methods.imm.torch, "randn", lambda *a, **k: next(draws))
    net = Stub()
    out = SIGMA_D * m.sample(net, t64(fx[f"{key}_latents"]) / SIGMA_D, int(steps[1:]), y)
    calls = t64(fx[f"{key}_calls"])
    tau = torch.stack([1 - c[0][0] for c in net.calls])
    d = torch.stack([c[1][0] for c in net.calls])
    got = {"x": out, "tau": tau, "tau_next": tau - d}
    want = {"x": fx[f"{key}_out"], "tau": calls[:, 0], "tau_next": calls[:, 1]}
    if len(got["tau"]) != len(want["tau"]):  # a different number of calls: surely wrong
        got["tau"], got["tau_next"] = torch.full_like(calls[:, 0], math.nan), calls[:, 1]
    return got, want


SAMPLER_KEYS = [f"T0.994_eps{e}_N{n}" for e in ("0.0", "0.006") for n in (1, 2, 4, 8)]
SAMPLERS = ["imm_pushforward_uniform", "imm_pushforward_edm_cfg", "imm_restart_uniform"]


def test_flow_map_is_the_official_wrapper():
    got, want = flow_map_run()
    assert max(biggest(got, want).values()) < TOL, biggest(got, want)


def test_paths_eta_and_weight_are_the_official_and_the_papers():
    got, want = paths_run()
    assert max(biggest(got, want).values()) < TOL, biggest(got, want)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("key", SAMPLER_KEYS)
def test_samplers_are_the_official_ones(name, key, monkeypatch):
    got, want = sampler_run(name, monkeypatch, key)
    assert max(biggest(got, want).values()) < TOL, biggest(got, want)


def test_every_imm_fixture_names_its_source():
    names = sorted(p.stem for p in GOLDEN.glob("imm_*.npz"))
    assert names == sorted(["imm_flow_map", "imm_paths", *SAMPLERS])
    for name in names:
        prov = load(name)["provenance"]
        assert prov["repo"] == "https://github.com/lumalabs/imm", name
        assert len(prov["commit"]) == 40, name
        for key in ("file", "function", "stub", "torch", "precision"):
            assert prov[key], f"{name}: no {key} in its provenance"


def time_not_reversed(flow_map):
    """The network asked at the paper's time ``t`` instead of our ``1 - t``."""
    return lambda self, net, x, t, s, y, cfg_scale=1.0: flow_map(
        self, net, x, 1 - t, 1 - t - (t - s), y, cfg_scale
    )


def swapped(point):
    """The path point at ``1 - tau`` (noise and data exchanged)."""
    return staticmethod(lambda x0, x1, tau: point(x1, x0, tau))


#: what is wrong -> (run, its arguments, a setup step or None)
PERTURBATIONS = {
    "network called at the paper's time, not 1 - t": (
        flow_map_run,
        {},
        lambda mp: mp.setattr(IMM, "flow_map", time_not_reversed(IMM.flow_map)),
    ),
    "path point at 1 - tau (time not reversed)": (
        paths_run,
        {},
        lambda mp: mp.setattr(IMM, "point", swapped(IMM.point)),
    ),
    "weight with a = 1": (paths_run, {"a": 1.0}, None),
    "weight with b = 5": (paths_run, {"b": 5.0}, None),
    "sampler calls the network at the paper's time": (
        sampler_run,
        {"name": "imm_pushforward_uniform"},
        lambda mp: mp.setattr(IMM, "flow_map", time_not_reversed(IMM.flow_map)),
    ),
    "pushforward grid from 1 to 0": (
        sampler_run,
        {"name": "imm_pushforward_uniform"},
        lambda mp: mp.setattr(
            IMM, "grid", lambda self, n: torch.linspace(1, 0, n + 1, dtype=torch.float64).tolist()
        ),
    ),
    "uniform grid where the official is EDM's": (
        sampler_run,
        {"name": "imm_pushforward_edm_cfg", "discretization": "uniform"},
        None,
    ),
    "no CFG": (sampler_run, {"name": "imm_pushforward_edm_cfg", "cfg_scale": 1.0}, None),
    "pushforward where the official restarts": (
        sampler_run,
        {"name": "imm_restart_uniform", "sampler": "pushforward"},
        None,
    ),
    "restart noise not the official draws": (
        sampler_run,
        {"name": "imm_restart_uniform", "feed_noise": False},
        None,
    ),
}


@pytest.mark.parametrize("case", list(PERTURBATIONS))
def test_perturbation_is_caught(case, monkeypatch):
    """Each deliberate error makes some output differ from the official code by more than TOL."""
    run, kwargs, setup = PERTURBATIONS[case]
    if setup is not None:
        setup(monkeypatch)
    got, want = run(mp=monkeypatch, **kwargs)
    diffs = biggest(got, want)
    assert not max(diffs.values()) < TOL, f"{case} still matches the official code: {diffs}"


# -- the MMD and its kernel -----------------------------------------------------------------------
def test_mmd_is_zero_for_identical_groups():
    y = torch.randn(5, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(
        mmd(y, y.clone(), torch.rand(5) + 0.1), torch.zeros(5, dtype=torch.float64)
    )


def test_mmd_by_hand():
    """One group of two particles in 2-D: every kernel value written out."""
    yt = torch.tensor([[[0.0, 0.0], [3.0, 4.0]]], dtype=torch.float64)
    yr = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)
    bw, D = 0.5, 2

    def k(dist):
        return math.exp(-max(dist, 1e-4) / (bw * D))

    tt = (k(0) + k(5) + k(5) + k(0)) / 4
    rr = (k(0) + k(1) + k(1) + k(0)) / 4
    tr = (k(1) + k(math.sqrt(2)) + k(math.sqrt(18)) + k(math.sqrt(13))) / 4
    got = mmd(yt, yr, torch.tensor([bw], dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor([tt + rr - 2 * tr], dtype=torch.float64))
    # M = 1 is a consistency model: 2 - 2 k(y_t, y_r) (2 k(0) with the distance floor)
    one = mmd(yt[:, 1:], yr[:, 1:], torch.tensor([bw], dtype=torch.float64))
    torch.testing.assert_close(
        one, torch.tensor([2 * k(0) - 2 * k(math.sqrt(13))], dtype=torch.float64)
    )


def test_kernel_floor_keeps_gradients_finite_at_zero_distance():
    p = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    laplace_kernel(p, p, torch.ones(2, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(p.grad).all()
    k = laplace_kernel(p.detach(), p.detach(), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(
        torch.diagonal(k, dim1=1, dim2=2),
        torch.full((2, 3), math.exp(-1e-4 / 4), dtype=torch.float64),
    )


# -- time pairs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("k,eps", [(12, 0.0), (15, 0.006), (4, 0.0)])
def test_time_pairs_respect_s_le_r_lt_t_and_the_mapping(k, eps):
    m = method(k=k, eps=eps)
    torch.manual_seed(0)
    t, r, s = m.sample_times(20_000, "cpu")
    assert t.dtype == torch.float64
    assert bool((eps <= s).all() and (s <= r).all() and (r < t).all() and (t <= m.T).all())
    # the mapping: eta(r) = eta(t) - (160 - 0) / 2^k where that lies above s, else r = s
    step = 160.0 / 2**k
    moved = r > s
    torch.testing.assert_close(eta(r[moved]), eta(t[moved]) - step, rtol=1e-9, atol=1e-9)
    assert bool((eta(t[~moved]) - step <= eta(s[~moved]) + 1e-12).all())
    # the laws: t ~ U(eps, T), (s - eps) / (t - eps) ~ U(0, 1)
    assert abs(float(t.mean()) - (eps + m.T) / 2) < 0.01
    assert abs(float(((s - eps) / (t - eps)).mean()) - 0.5) < 0.01


def test_mapping_limits():
    t = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)
    s = torch.tensor([0.1, 0.0, 0.5], dtype=torch.float64)
    assert torch.equal(method(k=0).mapping(s, t), s)  # the whole range in one decrement: r = s
    fine = method(k=40).mapping(s, t)
    assert bool((fine < t).all()) and float((t - fine).max()) < 1e-9  # r -> t as k grows


def test_weight_is_zero_at_the_data_end_and_positive_inside():
    t = torch.linspace(0, 0.994, 100, dtype=torch.float64)
    w = weight(t, 2.0, 4.0)
    assert float(w[0]) == 0.0 and bool((w[1:] > 0).all()) and bool(torch.isfinite(w).all())


# -- the loss: groups, calls, cost ----------------------------------------------------------------
def recording(f=lambda x, t, d, y: torch.tanh(x) * (1 + bcast(t, x)) + 0.1 * bcast(d, x)):
    return Analytic(f)


def test_loss_groups_share_times_and_the_target_sits_at_r_on_the_same_line():
    m = method(group_size=4, label_dropout=0.0)
    net = recording()
    x1, x0 = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    torch.manual_seed(1)
    loss, logs = m.loss(Nets(net, net), Batch(x1, None, x0), 0)
    (xt, tt, dt, _), (xr, tr, dr, _) = net.calls  # online at x_t, then the target at x_r
    torch.manual_seed(1)
    t, r, s = m.sample_times(4, "cpu")
    for got, want in ((1 - tt, t), (tt + dt, 1 - s), (1 - tr, r), (tr + dr, 1 - s)):
        torch.testing.assert_close(got, want.repeat_interleave(4))
    # both points on the row's own line through (x0, x1): tau x0 + (1 - tau) x1
    torch.testing.assert_close(xt, bcast(1 - tt, x1) * x0 + bcast(tt, x1) * x1)
    torch.testing.assert_close(xr, bcast(1 - tr, x1) * x0 + bcast(tr, x1) * x1)
    # the loss is mean_g w(t_g) MMD_g, from the recorded calls by hand
    y_t = (xt + bcast(dt, xt) * net.f(xt, tt, dt, None)).view(4, 4, 3)
    y_r = (xr + bcast(dr, xr) * net.f(xr, tr, dr, None)).view(4, 4, 3)
    want = (weight(t, 2.0, 4.0) * mmd(y_t, y_r, t - s)).mean()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(logs["loss/mmd"], mmd(y_t, y_r, t - s).mean())


def test_only_the_x_t_particles_carry_the_gradient():
    m = method(group_size=4)
    net = nn.Linear(3, 3).double()
    wrapped = Analytic(lambda x, t, d, y: net(x))
    loss, _ = m.loss(Nets(wrapped, wrapped), Batch(torch.randn(8, 3, dtype=torch.float64)), 0)
    loss.backward()
    assert net.weight.grad is not None and float(net.weight.grad.abs().sum()) > 0
    assert not wrapped.calls[1][0].requires_grad


@pytest.mark.parametrize("target_weights", ["online", "ema"])
def test_stated_cost_equals_counted_calls(target_weights):
    from bench.mlp import VelocityMLP

    m = method(target_weights=target_weights, group_size=8)
    online = CountingNet(VelocityMLP((2,), hidden=16, depth=2, d_embedding="linear"))
    ema = CountingNet(VelocityMLP((2,), hidden=16, depth=2, d_embedding="linear"))
    m.loss(Nets(online, ema), Batch(torch.randn(64, 2)), 0)[0].backward()
    spent = online.forward_equivalents() + ema.forward_equivalents()
    assert spent / 64 == m.cost().per_sample == 4.0
    assert (ema.nograd_rows > 0) == (target_weights == "ema")


@pytest.mark.parametrize("sampler", ["pushforward", "restart"])
@pytest.mark.parametrize("cfg", [1.0, 1.5])
def test_sampling_spends_what_nfe_states(sampler, cfg):
    m = method(sampler=sampler, cfg_scale=cfg)
    net = CountingNet(Analytic(lambda x, t, d, y: torch.zeros_like(x), num_classes=3))
    y = torch.tensor([0, 1, 2, 0])
    for steps in (1, 2, 8):
        before = net.forward_equivalents()
        m.sample(net, torch.randn(4, 2), steps, y)
        assert (net.forward_equivalents() - before) / 4 == m.nfe(steps, conditional=True)
    assert m.nfe(8, conditional=True) == (16 if cfg != 1.0 else 8)


def test_group_size_must_divide_the_batch(compose):
    from bench.build import make_method

    with pytest.raises(UserError) as e:
        make_method(compose("method=imm", "train.batch_size=100", "method.group_size=8"))
    text = str(e.value)
    assert (
        text.startswith("method.group_size=8 does not divide train.batch_size=100")
        and "\n" not in text
    )
    assert (
        make_method(compose("method=imm", "train.batch_size=96", "method.group_size=8")).group_size
        == 8
    )
    # a micro-batch the groups do not cut (processes x grad_accum) is refused at its first step
    with pytest.raises(UserError, match="do not cut a micro-batch of 6 rows"):
        method(group_size=4).loss(Nets(recording(), recording()), Batch(torch.randn(6, 2)), 0)


def test_times_must_be_ordered():
    with pytest.raises(
        UserError, match=r"^method.eps=0.5 is not allowed: it must be below method.T=0.4$"
    ):
        method(T=0.4, eps=0.5)
    with pytest.raises(UserError, match="eta_min=200.0 is not allowed"):
        method(eta_min=200.0)


# -- Gaussian data: the exact flow map ------------------------------------------------------------
MU = torch.tensor([2.0, -1.0], dtype=torch.float64)
STD = torch.tensor([0.5, 1.5], dtype=torch.float64)


def cov(t):
    return (1 - t) ** 2 + t**2 * STD**2


def exact_u(x, t, d, y=None):
    """The exact average velocity ``(x_{t+d} - x) / d`` of the Gaussian flow (docs/methods.md)."""
    t, d = bcast(t, x), bcast(d, x)
    x_s = (t + d) * MU + (cov(t + d) / cov(t)).sqrt() * (x - t * MU)
    return (x_s - x) / d


def exact_v(x, t, d, y=None):
    """The exact flow-matching velocity (one Euler step of it is the wrong map below)."""
    t = bcast(t, x)
    return MU + (-2 * (1 - t) + 2 * t * STD**2) / (2 * cov(t)) * (x - t * MU)


def population_mmd(m: IMM, f, t: float, r: float, s: float, n: int = 2000) -> float:
    """The squared MMD between ``f_{s,t}(x_t)`` and ``f_{s,r}(x_r)`` with the paper's kernel,
    estimated as the loss pairs its particles (``x_t``, ``x_r`` share data and noise) but without
    its ``i = j`` terms: the unbiased U-statistic, whose expectation is the population MMD
    whatever the coupling within a pair, and whose noise the coupling keeps small."""
    g = torch.Generator().manual_seed(0)
    x1 = MU + STD * torch.randn(n, 2, generator=g, dtype=torch.float64)
    x0 = torch.randn(n, 2, generator=g, dtype=torch.float64)

    def cloud(tau):
        full = torch.full((n,), tau, dtype=torch.float64)
        y = m.flow_map(Analytic(f), IMM.point(x0, x1, full), full, torch.full_like(full, s), None)
        return y[None]

    a, b = cloud(t), cloud(r)
    bw = torch.tensor([t - s], dtype=torch.float64)

    def k(p, q):
        return laplace_kernel(p, q, bw)[0]

    h = k(a, a) + k(b, b) - k(a, b) - k(b, a)
    return float((h * (1 - torch.eye(n, dtype=torch.float64))).sum() / (n * (n - 1)))


@pytest.mark.parametrize("t,r,s", [(0.9, 0.85, 0.3), (0.5, 0.45, 0.0), (0.99, 0.95, 0.5)])
def test_exact_flow_map_makes_both_clouds_the_marginal_at_s(t, r, s):
    """The objective's minimiser: with the exact map both particle clouds are the marginal at
    ``s`` (population MMD 0 up to sampling noise: measured |MMD^2| <= 1.1e-5); one Euler step of
    the exact velocity, the flow-matching model's jump, is 50 to 600 times further off
    (5e-4 to 2.5e-3)."""
    m = method()
    exact = population_mmd(m, exact_u, t, r, s)
    euler = population_mmd(m, exact_v, t, r, s)
    assert abs(exact) < 0.02 * euler, (exact, euler)


def test_pushforward_with_the_exact_map_is_the_flow_map_at_every_budget():
    """``N`` jumps of the exact map compose to the one flow map from ``T`` (our ``1 - T``) to 0."""
    m = method()
    x0 = torch.randn(64, 2, dtype=torch.float64)
    start = 1 - m.T
    want = MU + (cov(torch.tensor(1.0, dtype=torch.float64)) / cov(torch.tensor(start))).sqrt() * (
        x0 - start * MU
    )
    for steps in (1, 2, 4, 8):
        torch.testing.assert_close(m.sample(Analytic(exact_u), x0, steps), want)
    edm = method(discretization="edm")
    torch.testing.assert_close(edm.sample(Analytic(exact_u), x0, 4), want)


def test_one_step_samples_learn_the_gaussian_map():
    """Trained briefly on Gaussian data (800 steps, batch 256, the recipe of test_scm.py), one
    step lands near the exact map: RMS 0.39 / 0.35 measured (seeds 0 / 1), where flow matching's
    one step collapses to the mean (RMS 1.12)."""
    from bench.ema import EMA
    from bench.mlp import VelocityMLP

    mu, std = MU.float(), STD.float()
    torch.manual_seed(0)
    net = VelocityMLP((2,), hidden=64, depth=3, d_embedding="linear", t_scale=1000.0)
    ema = EMA(net, 0.99, warmup=True)
    m = method(batch_size=256)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for step in range(800):
        loss, _ = m.loss(Nets(net, ema.net), Batch(mu + std * torch.randn(256, 2)), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(net, step)
    x0 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(7))
    start = 1 - m.T
    exact = mu + (cov(torch.tensor(1.0)).float() / cov(torch.tensor(start)).float()).sqrt() * (
        x0 - start * mu
    )
    rms = float((m.sample(ema.net, x0, 1) - exact).square().sum(1).mean().sqrt())
    assert rms < 0.6, f"IMM 1-step RMS error {rms:.3f}"


# -- the harness: resume and the real job ---------------------------------------------------------
def test_a_resumed_run_with_other_options_is_the_same_run(tmp_path):
    """The contract's round trip (tests/test_method_contract.py) for non-default options: EMA
    targets, groups of 8, the restart sampler, a class-free toy run resumed 3 steps before its end."""
    from conftest import CONFIG_DIR
    from test_method_contract import TOY, ToyRun, method_config

    cfg = method_config(
        CONFIG_DIR,
        "imm",
        False,
        *TOY,
        "train.steps=30",
        "method.target_weights=ema",
        "method.group_size=8",
        "method.sampler=restart",
    )
    run = ToyRun(cfg, tmp_path / "run")
    run.fit(27)
    state = run.state()
    run.fit(30)
    resumed = ToyRun(cfg, tmp_path / "run")
    resumed.resume(state, 27)
    resumed.fit(30)
    assert resumed.losses == run.losses[27:] and resumed.logs == run.logs[27:]
    assert run.per_step == [4.0] * 30


def test_cli_trains_and_evaluates_imm(tmp_path):
    """The real job on the DiT (digits16): linear d embedding at scale 1000, groups of 4 in a
    batch of 8, the budget as stated."""
    from conftest import SMOKE, run_cli

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    proc = run_cli(
        "method=imm", "train.steps=2", *SMOKE, f"paths.root={tmp_path}", cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FD(train)" in proc.stdout
    (rd,) = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("imm-")]
    state = json.loads((rd / "state.json").read_text())
    assert state["status"] == "finished"
    assert state["budget"]["budget/forward_equivalents"] == 2 * 8 * 4
