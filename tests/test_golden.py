"""Golden tests: our training targets against the official code's, row by row.

``tests/golden/*.npz`` were made by running the official JAX target functions (kvfrans/shortcut-models
for shortcut models and the baselines, Gsunshine/meanflow for MeanFlow) on an analytic stub network
(tests/golden/README.md: commits, versions, how to regenerate). Each fixture holds the inputs, every
random draw the official code made and its outputs. Here the same inputs and draws go through our
methods -- the draws are fed to ``torch.rand`` / ``randint`` / ``randn`` in the order our code asks
for them (``Draws``) -- with the same stub written in torch, and every output row must agree to
``TOL``. No jax at test time.

Convention mapping, official -> ours:

* layout (B, H, W, C) -> (B, C, H, W); the stubs are element-wise, so only the layout changes.
* level: the official network gets the integer exponent k of ``d = 2^-k`` -> our ``d = 2^-k``.
  A network the official code builds with ``ignore_dt=True`` (CT, CD, PD and their teachers) sees
  k = 0 whatever it is passed, i.e. our ``d = 1``; ``Stub.ref_level`` is the token a network was
  trained at, so our flow-matching teacher queried at ``1/128`` plays the official teacher that
  ignores its token.
* sigma_min: the official path is ``x_t = (1 - (1 - 1e-5) t) x0 + t x1``, velocity
  ``x1 - (1 - 1e-5) x0``: exactly our path with the data ``x1 + 1e-5 x0``, which is what we feed
  (``map_sigma``). Live reflow's reflow rows interpolate to a generated sample, so there the term
  ``1e-5 t x0`` is taken off the official ``x_t`` instead.
* rows: the official shortcut / live-reflow code reuses the first rows of the batch for its
  flow-matching rows (the project uses distinct rows): we feed those reused rows as our flow rows.
* MeanFlow runs in the paper's time (``t' = 1 - t``, noise at 1, ``u' = -u``) and puts its
  ``r != t`` rows last; we take them first, so the rows are permuted (``meanflow_rows``).

Cases whose official behaviour is not the project's default run with the option that reproduces
it (``OFFICIAL``). ``test_perturbation_is_caught`` shows each comparison bites.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import methods.consistency
import methods.live_reflow
import methods.progressive_distillation
import methods.shortcut
from bench.data import Batch
from bench.distributed import SINGLE
from methods.base import Nets, StageContext
from methods.common import bcast
from methods.consistency import Consistency
from methods.live_reflow import LiveReflow
from methods.meanflow import MeanFlow
from methods.progressive_distillation import ProgressiveDistillation
from methods.shortcut import Shortcut

GOLDEN = Path(__file__).parent / "golden"
TOL = 1e-6  # absolute, on every element of every row
NUM_CLASSES = 10
SIGMA_MIN = 1e-5
#: the stub's (a, b) for each network (tests/golden/generate.py)
ONLINE, EMA = (2.5, 0.0), (2.4, 0.1)
TEACHER_ONLINE, TEACHER_EMA = (1.9, -0.3), (2.0, -0.2)

#: options that reproduce the official code where the project has them
SHORTCUT = dict(level_sampling="even", fm_time="grid128", target_weights="ema", clip=4.0)
SHORTCUT.update(bake_cfg_scale=1.5, label_dropout=0.1)
CONSISTENCY = dict(total_steps=700, target="ema", loss="mse", label_dropout=0.0)
LIVE_REFLOW = dict(reflow_ratio=0.125, gen_weights="online", gen_steps=8, gen_cfg_scale=1.5)
LIVE_REFLOW.update(fm_time="grid128", label_dropout=0.1)
MEANFLOW = dict(ratio=0.25, time_sampler="logit_normal", time_mu=-0.4, time_sigma=1.0)
MEANFLOW.update(p=1.0, c=0.01, label_dropout=0.1)
#: options that reproduce the official behaviour and are not the project's defaults
OFFICIAL = {
    "pd_clip": dict(clip=4.0),  # x' clipped to [-4, 4] (official targets_progressive.py:34)
    "pd_cfg": dict(bake_cfg_scale=1.5),  # round 0's guidance in the target (bootstrap_cfg)
    "pd_teacher_ema": dict(teacher_weights="ema"),  # the teacher is the EMA at the round start
    "pd_d": dict(d_conditioning="constant"),  # ignore_dt=True: no round-dependent d token
    "meanflow_drop": dict(label_dropout_rows="r_eq_t"),  # dropped labels only on r = t rows
}


# -- fixtures, stubs, draws -----------------------------------------------------------------------
def load(name: str) -> dict:
    with np.load(GOLDEN / f"{name}.npz", allow_pickle=False) as z:
        fx = {k: z[k] for k in z.files}
    fx["provenance"] = json.loads(str(fx["provenance"]))
    return fx


def ours(a: np.ndarray) -> Tensor:
    """An official array as ours: (B, H, W, C) -> (B, C, H, W) for images, as is otherwise."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.permute(0, 3, 1, 2).contiguous() if t.dim() == 4 else t


class Stub(nn.Module):
    """``v = a tanh(x + b) (1 + t) + 0.1 (log2(1/d) - ref_level) + 0.01 y`` (null label = 10)."""

    num_classes = NUM_CLASSES

    def __init__(self, ab: tuple[float, float], ref_level: float = 0.0):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(ab[0], dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(ab[1], dtype=torch.float64))
        self.register_buffer("ref_level", torch.tensor(float(ref_level), dtype=torch.float64))

    def forward(self, x: Tensor, t: Tensor, d: Tensor, y: Tensor | None = None) -> Tensor:
        f = x.dtype
        y = torch.full_like(t, NUM_CLASSES, dtype=torch.long) if y is None else y
        level = torch.log2(1 / d.to(f)) - self.ref_level.to(f)
        v = self.a.to(f) * torch.tanh(x + self.b.to(f)) * (1 + bcast(t.to(f), x))
        return v + bcast(0.1 * level + 0.01 * y.to(f), x)


class MeanFlowStub(nn.Module):
    """``S(z, t, d, y) = 1.5 tanh(z + 0.1) (1 + t) + 0.5 d cos(z) + 0.2 t d + 0.01 y``."""

    num_classes = NUM_CLASSES

    def forward(self, z: Tensor, t: Tensor, d: Tensor, y: Tensor) -> Tensor:
        t, d, y = bcast(t, z), bcast(d, z), bcast(y.to(z.dtype), z)
        return 1.5 * torch.tanh(z + 0.1) * (1 + t) + 0.5 * d * torch.cos(z) + 0.2 * t * d + 0.01 * y


class Retoken(nn.Module):
    """``net`` queried at the token ``to(d)`` (a wrong level token, for the perturbation tests)."""

    def __init__(self, net: nn.Module, to):
        super().__init__()
        self.net, self.to_token, self.num_classes = net, to, net.num_classes

    def forward(self, x, t, d, y=None):
        return self.net(x, t, self.to_token(d), y)


class Recorder(nn.Module):
    """``net``, remembering the inputs of every call."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.num_classes, self.calls = net, net.num_classes, []

    def forward(self, x, t, d, y=None):
        self.calls.append(dict(xt=x, t=t, d=d, y=y))
        return self.net(x, t, d, y)


class Draws:
    """Feeds recorded draws to ``torch.rand`` / ``randint`` / ``randn`` in call order, checking
    each requested size; ``done`` checks that every one was used."""

    def __init__(self, monkeypatch, **queues: list[Tensor]):
        self.queues = {name: list(queues.get(name, [])) for name in ("rand", "randint", "randn")}
        for name in self.queues:
            monkeypatch.setattr(torch, name, self.draw(name))

    def draw(self, name: str):
        def fake(*args, **kwargs):
            assert self.queues[name], f"our code made an unexpected torch.{name} draw"
            value = self.queues[name].pop(0)
            size = kwargs.get("size", args[-1] if name == "randint" else args)
            if len(size) == 1 and not isinstance(size[0], int):
                size = size[0]  # torch.rand(shape) rather than torch.rand(n, m)
            size = (size,) if isinstance(size, int) else tuple(size)
            assert tuple(value.shape) == size, f"torch.{name}{size}: recorded {tuple(value.shape)}"
            return value.clone()

        return fake

    def done(self) -> None:
        left = {k: len(q) for k, q in self.queues.items() if q}
        assert not left, f"draws recorded but not used by our code: {left}"


def uniforms_for(mask: np.ndarray) -> Tensor:
    """``torch.rand`` values that make ``rand < p`` reproduce ``mask`` for any 0 < p <= 0.5."""
    return torch.from_numpy(np.where(mask, 0.0, 0.75).astype(np.float32))


def grid_uniforms(index: np.ndarray, k: np.ndarray) -> Tensor:
    """``torch.rand`` values ``u`` with ``floor(u 2^k) = index``."""
    return torch.from_numpy(((index + 0.5) / 2.0**k).astype(np.float32))


# -- comparison -----------------------------------------------------------------------------------
def differences(got: dict, want: dict) -> dict[str, float]:
    """The largest absolute difference for each output (inf when the shapes differ)."""
    out = {}
    for key, w in want.items():
        g = torch.as_tensor(got[key], dtype=torch.float64)
        w = torch.as_tensor(w, dtype=torch.float64)
        out[key] = (g - w).abs().max().item() if g.shape == w.shape else math.inf
    return out


def assert_rows_match(got: dict, want: dict, tol: float = TOL) -> None:
    for key, w in want.items():
        g = torch.as_tensor(got[key], dtype=torch.float64)
        w = torch.as_tensor(w, dtype=torch.float64)
        assert g.shape == w.shape, f"{key}: shape {tuple(g.shape)}, official {tuple(w.shape)}"
        per_row = (g - w).abs().reshape(len(w), -1).amax(1)
        bad = torch.nonzero(per_row > tol).flatten().tolist()
        assert not bad, (
            f"{key}: rows {bad[:10]} differ from the official code by up to "
            f"{per_row.max().item():.3g} (tolerance {tol})"
        )


# -- shortcut models ------------------------------------------------------------------------------
def shortcut_run(name: str, mp, map_sigma: bool = True, nets: Nets | None = None, **options):
    """Our ``Shortcut.targets`` on the fixture's inputs and draws; returns (ours, official)."""
    fx = load(name)
    m, n = len(fx["draw_bootstrap_t_index"]), len(fx["labels"])
    images, labels, k = fx["images"], fx["labels"], fx["out_dt_base"][:m]
    x0 = np.concatenate([fx["draw_bootstrap_noise"], fx["draw_flow_noise"][: n - m]])
    x1 = np.concatenate([images[:m], images[: n - m]]) + (SIGMA_MIN * x0 if map_sigma else 0)
    y = np.concatenate([labels[:m], labels[: n - m]]).astype(np.int64)
    draws = Draws(
        mp,
        rand=[
            grid_uniforms(fx["draw_bootstrap_t_index"], k),
            uniforms_for(fx["draw_label_drop"][: n - m]),
        ],
        randint=[torch.from_numpy(fx["draw_flow_t_index"][: n - m])],
    )
    method = Shortcut(k_ratio=m / n, **{**SHORTCUT, **options})
    nets = nets or Nets(online=Stub(ONLINE), ema=Stub(EMA))
    r = method.targets(nets, Batch(ours(x1), torch.from_numpy(y), ours(x0)))
    draws.done()
    got = dict(xt=r.xt, t=r.t, d=r.d, y=r.y, target=r.target)
    want = dict(
        xt=ours(fx["out_x_t"]),
        t=fx["out_t"],
        d=2.0 ** -fx["out_dt_base"],
        y=fx["out_labels"],
        target=ours(fx["out_v_t"]),
    )
    return got, want


@pytest.mark.parametrize("name", ["shortcut_every8", "shortcut_every4"])
def test_shortcut_levels_are_the_official_allocation(name):
    fx = load(name)
    m = len(fx["draw_bootstrap_t_index"])
    levels = Shortcut(level_sampling="even").levels(m, "cpu")
    assert levels.tolist() == fx["out_dt_base"][:m].astype(int).tolist()


@pytest.mark.parametrize("name", ["shortcut_every8", "shortcut_every4"])
def test_shortcut_bootstrap_target(name):
    """The pure target function: two clipped half steps with baked guidance at the finest level."""
    fx = load(name)
    m = len(fx["draw_bootstrap_t_index"])
    x0, k = ours(fx["draw_bootstrap_noise"]), torch.from_numpy(fx["out_dt_base"][:m])
    x1 = ours(fx["images"][:m]) + SIGMA_MIN * x0
    t = torch.from_numpy(fx["out_t"][:m])
    xt = (1 - bcast(t, x0)) * x0 + bcast(t, x0) * x1
    y = torch.from_numpy(fx["labels"][:m]).long()
    got = Shortcut(**SHORTCUT).bootstrap_target(Stub(EMA), xt, t, 2.0**-k / 2, y)
    assert_rows_match({"target": got}, {"target": ours(fx["out_v_t"][:m])})


@pytest.mark.parametrize("name", ["shortcut_every8", "shortcut_every4"])
def test_shortcut_targets(name, monkeypatch):
    assert_rows_match(*shortcut_run(name, monkeypatch))


@pytest.mark.parametrize("name", ["shortcut_every8", "shortcut_every4"])
def test_shortcut_sigma_min_is_the_official_path(name, monkeypatch):
    """With ``sigma_min=1e-5`` no mapping is needed: our path and velocity are the official ones
    (official x_t casts t to float32, hence the looser tolerance; README "Residuals")."""
    got, want = shortcut_run(name, monkeypatch, map_sigma=False, sigma_min=SIGMA_MIN)
    assert_rows_match(got, want, tol=1e-6)


@pytest.mark.parametrize("name", ["ct_k3", "cd"])
def test_consistency_sigma_min_is_the_official_path(name, monkeypatch):
    """``sigma_min=1e-5``: the official path without mapping the data (CD's residual: README)."""
    teacher = dict(teacher=cd_teacher(), clip=4.0) if name == "cd" else {}
    got, want = consistency_run(name, monkeypatch, map_sigma=False, sigma_min=SIGMA_MIN, **teacher)
    assert_rows_match(got, want)


def test_live_reflow_sigma_min_is_the_official_path(monkeypatch):
    assert_rows_match(*live_reflow_run(monkeypatch, map_sigma=False, sigma_min=SIGMA_MIN))


def test_fixtures_exercise_the_clips():
    """The official clips acted where a test relies on them (and nowhere in ``pd_round2``)."""
    for name in ("shortcut_every8", "shortcut_every4"):
        fx = load(name)
        x_mid, target = (np.abs(fx[f"preclip_{w}"]) > 4 for w in ("x_mid", "target"))
        assert (x_mid & ~target).any(), f"{name}: no clipped x' outside the target's clip"
        assert target.any(), f"{name}: the target's clip was idle"
    for name in ("cd", "pd_round2_clip"):
        assert (np.abs(load(name)["preclip_x_mid"]) > 4).any(), f"{name}: the clip was idle"
    assert (np.abs(load("pd_round2")["preclip_x_mid"]) <= 4).all()


# -- consistency training and distillation --------------------------------------------------------
def consistency_run(name: str, mp, map_sigma=True, teacher=None, nets=None, **options):
    fx = load(name)
    x0 = ours(fx["draw_noise"])
    x1 = ours(fx["images"]) + (SIGMA_MIN * x0 if map_sigma else 0)
    draws = Draws(mp, randint=[torch.from_numpy(fx["draw_t_index"])])
    method = Consistency(**{**CONSISTENCY, **options})
    if teacher is not None:
        method.attach_teacher(teacher)
    nets = nets or Nets(online=Stub(ONLINE), ema=Stub(EMA))
    batch = Batch(x1, torch.from_numpy(fx["labels"]).long(), x0)
    r = method.targets(nets, batch, int(fx.get("step", 0)))
    draws.done()
    got = dict(xt=r.xt, t=r.t, d=r.d, y=r.y, target=r.target)
    # ignore_dt: the official network sees level 0 whatever it is passed, i.e. d = 1.
    want = dict(
        xt=ours(fx["out_x_t"]),
        t=fx["out_t"],
        d=np.ones(len(fx["labels"])),
        y=fx["out_labels"],
        target=ours(fx["out_v_t"]),
    )
    return got, want


def cd_teacher(ab=TEACHER_EMA) -> Stub:
    return Stub(ab, ref_level=7)  # a flow-matching teacher: trained at d = 1/128


@pytest.mark.parametrize("name", ["ct_k0", "ct_k3", "ct_k6"])
def test_consistency_training_targets(name, monkeypatch):
    fx = load(name)
    k = int(fx["out_dt_base"])
    assert Consistency(total_steps=700).level(int(fx["step"])) == k  # the same curriculum
    assert_rows_match(*consistency_run(name, monkeypatch))


def test_consistency_distillation_targets(monkeypatch):
    assert_rows_match(*consistency_run("cd", monkeypatch, teacher=cd_teacher(), clip=4.0))


# -- progressive distillation ---------------------------------------------------------------------
def pd_run(name: str, mp, map_sigma=True, teacher=None, method=None, nets=None, round_=None):
    """Our ``ProgressiveDistillation.loss`` on the fixture; the target is read from its call of
    ``two_step_average`` and the student's inputs from its forward."""
    fx = load(name)
    r = int(fx["round"]) if round_ is None else round_
    x0 = ours(fx["draw_noise"])
    x1 = ours(fx["images"]) + (SIGMA_MIN * x0 if map_sigma else 0)
    method = method or ProgressiveDistillation()
    if teacher is not None:
        method.round, method.round_teacher = r, teacher
    seen = {}
    two_step = methods.progressive_distillation.two_step_average

    def spy(*args, **kwargs):
        seen["target"] = two_step(*args, **kwargs)
        return seen["target"]

    mp.setattr(methods.progressive_distillation, "two_step_average", spy)
    nets = nets or Nets(online=Stub(ONLINE), ema=Stub(ONLINE))
    nets.online = student = Recorder(nets.online)
    draws = Draws(mp, randint=[torch.from_numpy(fx["draw_t_index"])])
    method.loss(nets, Batch(x1, torch.from_numpy(fx["labels"]).long(), x0), int(fx["step"]))
    draws.done()
    (call,) = student.calls
    got = dict(xt=call["xt"], t=call["t"], y=call["y"], target=seen["target"])
    want = dict(
        xt=ours(fx["out_x_t"]), t=fx["out_t"], y=fx["out_labels"], target=ours(fx["out_v_t"])
    )
    return got, want, call["d"]


def pd_teacher(round_: int, ab=TEACHER_EMA) -> Stub:
    """Round ``r``'s teacher, trained at its own step ``2^-(7-r)`` (round 0: the FM level)."""
    return Stub(ab, ref_level=7 - round_)


def test_progressive_distillation_targets(monkeypatch):
    got, want, _ = pd_run("pd_round2", monkeypatch, teacher=pd_teacher(2))
    assert_rows_match(got, want)


def test_progressive_distillation_clip(monkeypatch):
    method = ProgressiveDistillation(**OFFICIAL["pd_clip"])
    got, want, _ = pd_run("pd_round2_clip", monkeypatch, teacher=pd_teacher(2), method=method)
    assert_rows_match(got, want)


def test_progressive_distillation_round0_guidance(monkeypatch):
    method = ProgressiveDistillation(**OFFICIAL["pd_cfg"])
    got, want, _ = pd_run("pd_round0_cfg", monkeypatch, teacher=pd_teacher(0), method=method)
    assert_rows_match(got, want)


def pd_round_start_run(mp, teacher_weights: str = "ema"):
    """Round 2 started by ``begin_stage`` from an online and an EMA network, then trained on: the
    official teacher is the EMA at the round start (official train.py:309-312 snapshots the train
    state; targets_progressive.py:28 calls its EMA)."""
    method = ProgressiveDistillation(teacher_weights=teacher_weights, ema_rate=None)
    with tempfile.TemporaryDirectory() as run_dir:
        ctx = StageContext(Path(run_dir), None, torch.device("cpu"), True, 0, lambda: None, SINGLE)
        method.bind(ctx)
        method.attach_teacher(pd_teacher(0))
        nets = Nets(online=pd_teacher(2, TEACHER_ONLINE), ema=pd_teacher(2, TEACHER_EMA))
        method.begin_stage(2, nets, ctx, fresh=True)
    nets.online = Stub(ONLINE)  # the student, as it trains
    return pd_run("pd_round2", mp, method=method, nets=nets)


def test_progressive_distillation_teacher_is_the_ema(monkeypatch):
    got, want, _ = pd_round_start_run(monkeypatch, **OFFICIAL["pd_teacher_ema"])
    assert_rows_match(got, want)


def test_progressive_distillation_constant_d(monkeypatch):
    """The official student and teacher ignore d, so the student's d is the same in every round;
    every network then was trained at that one token (the flow-matching level here)."""
    tokens = []
    for name in ("pd_round2", "pd_round0_cfg"):
        method = ProgressiveDistillation(**OFFICIAL["pd_d"])
        got, want, d = pd_run(name, monkeypatch, teacher=pd_teacher(0), method=method)
        if name == "pd_round2":
            assert_rows_match(got, want)
        tokens.append(d)
    assert torch.equal(tokens[0], tokens[1]), "the student's d token changes with the round"


# -- live reflow ----------------------------------------------------------------------------------
def live_reflow_run(mp, name: str = "live_reflow", map_sigma=True, **options):
    fx = load(name)
    m, n = len(fx["draw_reflow_t_index"]), len(fx["labels"])
    images, labels = fx["images"], fx["labels"]
    z, x0_f = fx["draw_reflow_noise"][:m], fx["draw_flow_noise"][: n - m]
    x0 = np.concatenate([z, x0_f])
    x1 = np.concatenate([images[:m], images[: n - m] + (SIGMA_MIN * x0_f if map_sigma else 0)])
    y = np.concatenate([labels[:m], labels[: n - m]]).astype(np.int64)
    draws = Draws(
        mp,
        randint=[
            torch.from_numpy(fx["draw_reflow_t_index"]),
            torch.from_numpy(fx["draw_flow_t_index"][: n - m]),
        ],
        rand=[uniforms_for(fx["draw_label_drop"][: n - m])],
    )
    method = LiveReflow(**{**LIVE_REFLOW, **options})
    nets = Nets(online=Stub(ONLINE), ema=Stub(EMA))
    r = method.targets(nets, Batch(ours(x1), torch.from_numpy(y), ours(x0)))
    draws.done()
    xt = fx["out_x_t"].copy()
    if map_sigma:  # the reflow rows end at a generated sample: take the sigma_min term off there
        xt[:m] -= SIGMA_MIN * fx["out_t"][:m, None, None, None] * z
    got = dict(xt=r.xt, t=r.t, d=r.d, y=r.y, target=r.target)
    want = dict(
        xt=ours(xt),
        t=fx["out_t"],
        d=2.0 ** -fx["out_dt_base"].astype(np.float64),
        y=fx["out_labels"],
        target=ours(fx["out_v_t"]),
    )
    return got, want


def test_live_reflow_targets(monkeypatch):
    assert_rows_match(*live_reflow_run(monkeypatch))


# -- MeanFlow -------------------------------------------------------------------------------------
def meanflow_rows(fx) -> np.ndarray:
    """Our row i is official row ``perm[i]``: the official ``r != t`` rows are the last ones."""
    n, data_size = len(fx["labels"]), int(fx["data_size"])
    return np.concatenate([np.arange(data_size, n), np.arange(data_size)])


def meanflow_run(
    name: str, mp, reverse_time=True, map_interval=True, official_drop_rows=True, **options
):
    """Our ``MeanFlow.loss``; its regression problem is read from ``prediction_and_target``."""
    fx = load(name)
    perm, opts = meanflow_rows(fx), fx["provenance"]["options"]
    num_drop = int((fx["draw_label_drop_uniform"] < opts["class_dropout_prob"]).sum())
    if official_drop_rows:  # the official rows: the first num_drop, i.e. r = t rows
        drop = uniforms_for(perm < num_drop)
    else:  # what a per-row Bernoulli option would draw: the official uniforms, permuted
        drop = torch.from_numpy(fx["draw_label_drop_uniform"][perm])
    draws = Draws(
        mp,
        randn=[torch.from_numpy(fx[f"draw_{w}_normal"].reshape(-1)[perm]) for w in ("t", "r")],
        rand=[drop],
    )
    t_start, t_end = opts["t_start"], opts["t_end"]
    interval = (1 - t_end, 1 - t_start) if map_interval else (t_start, t_end)
    guidance = dict(omega=opts["omega"], kappa=opts["kappa"], guidance_interval=interval)
    method = MeanFlow(**{**MEANFLOW, **guidance, **options})
    if not reverse_time:
        paper_time = MeanFlow.sample_times
        mp.setattr(MeanFlow, "sample_times", lambda s, n, dev: unflip(paper_time(s, n, dev)))
    seen = {}
    real = MeanFlow.prediction_and_target

    def spy(self, net, xt, t, d, y, v):
        u, target = real(self, net, xt, t, d, y, v)
        seen.update(xt=xt, t=t, d=d, y=y, v=v, u=u.detach(), target=target)
        return u, target

    mp.setattr(MeanFlow, "prediction_and_target", spy)
    x1, x0 = ours(fx["images"][perm]), ours(fx["draw_noise"][perm])
    y = torch.from_numpy(fx["labels"][perm]).long()
    loss, _ = method.loss(Nets(online=MeanFlowStub(), ema=MeanFlowStub()), Batch(x1, y, x0), 0)
    draws.done()
    t_paper, r_paper = fx["official_t"].reshape(-1)[perm], fx["official_r"].reshape(-1)[perm]
    want = dict(
        xt=ours(fx["official_z_t"][perm]),
        t=1 - t_paper,
        d=t_paper - r_paper,
        y=fx["official_y_inp"][perm],
        v=-ours(fx["official_v_g_dropped"][perm]),  # u' = -u, v' = -v
        u=-ours(fx["out_u"][perm]),
        target=-ours(fx["out_u_tgt"][perm]),
        loss=fx["out_loss"].reshape(1),
    )
    return {**seen, "loss": loss.detach().reshape(1)}, want


def unflip(times: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Our ``(t, d)`` with ``t`` mapped back to the paper's time (the missing-reversal error)."""
    t, d = times
    return 1 - t, d


@pytest.mark.parametrize("name", ["meanflow_kappa", "meanflow_interval"])
def test_meanflow_targets(name, monkeypatch):
    """Folded guidance (omega, kappa, interval), the JVP target and the adaptive weight, with
    the labels dropped on the official rows (the placement itself: the test below)."""
    assert_rows_match(*meanflow_run(name, monkeypatch))


@pytest.mark.parametrize("name", ["meanflow_kappa", "meanflow_interval"])
def test_meanflow_label_dropout_rows(name, monkeypatch):
    got, want = meanflow_run(
        name, monkeypatch, official_drop_rows=False, **OFFICIAL["meanflow_drop"]
    )
    assert_rows_match(got, want)


# -- provenance -----------------------------------------------------------------------------------
def test_every_fixture_names_its_source():
    # IMM's fixtures come from the official PyTorch code: tests/test_imm.py checks and replays them
    names = sorted(p.stem for p in GOLDEN.glob("*.npz") if not p.stem.startswith("imm_"))
    assert len(names) == 12, names
    for name in names:
        prov = load(name)["provenance"]
        assert prov["repo"].startswith("https://github.com/"), name
        assert len(prov["commit"]) == 40, f"{name}: no commit in its provenance"
        for key in ("file", "function", "stub", "jax"):
            assert prov[key], f"{name}: no {key} in its provenance"


# -- the comparisons bite -------------------------------------------------------------------------
def second_step_at_t(two_step):
    """``two_step_average`` whose second velocity is taken at ``t`` instead of ``t + d``."""
    return lambda velocity, xt, t, d, clip=None, **kw: two_step(
        lambda x, tt: velocity(x, t), xt, t, d, clip, **kw
    )


def target_clip_only(two_step):
    """``two_step_average`` that clips the result but not the midpoint ``x'``."""

    def mutant(velocity, xt, t, d, clip=None, clip_target=True):
        target = two_step(velocity, xt, t, d, None)
        return target if clip is None else target.clamp(-clip, clip)

    return mutant


def reversed_levels(levels):
    return lambda self, n, device: levels(self, n, device).flip(0)


def guidance_one_level_up(bootstrap_target):
    """Baked guidance on the rows whose half step is 1/64 instead of 1/128."""

    def mutant(self, net, xt, t, d, y):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(methods.shortcut, "FLOW_MATCHING_LEVEL", 1 / 64)
            return bootstrap_target(self, net, xt, t, d, y)

    return mutant


def jvp_d_tangent_plus_one(jvp):
    """The JVP with tangent +1 on d (the step's end moving with t: the wrong total derivative)."""
    return lambda f, primals, tangents: jvp(f, primals, (*tangents[:2], -tangents[2]))


def patch(target, name: str, value=None, make=None):
    """A setup step: ``target.name = value``, or ``make(target.name)``."""
    return lambda mp: mp.setattr(target, name, make(getattr(target, name)) if make else value)


def token(net: nn.Module, to) -> Retoken:
    return Retoken(net, to)


SC, CM, PD, LR = (
    methods.shortcut,
    methods.consistency,
    methods.progressive_distillation,
    methods.live_reflow,
)
#: (case, what is wrong) -> (run, its arguments, a setup step or None)
PERTURBATIONS = {
    ("shortcut", "second half step at t, not t + d"): (
        shortcut_run,
        dict(name="shortcut_every8"),
        patch(SC, "two_step_average", make=second_step_at_t),
    ),
    ("shortcut", "no clipping"): (shortcut_run, dict(name="shortcut_every8", clip=None), None),
    ("shortcut", "x' not clipped"): (
        shortcut_run,
        dict(name="shortcut_every4"),
        patch(SC, "two_step_average", make=target_clip_only),
    ),
    ("shortcut", "bootstrap forwards at the full step's level"): (
        shortcut_run,
        dict(
            name="shortcut_every8",
            nets=Nets(online=Stub(ONLINE), ema=token(Stub(EMA), lambda d: 2 * d)),
        ),
        None,
    ),
    ("shortcut", "levels allocated coarsest first"): (
        shortcut_run,
        dict(name="shortcut_every4"),
        patch(Shortcut, "levels", make=reversed_levels),
    ),
    ("shortcut", "guidance on the wrong rows"): (
        shortcut_run,
        dict(name="shortcut_every8"),
        patch(Shortcut, "bootstrap_target", make=guidance_one_level_up),
    ),
    ("shortcut", "no baked guidance"): (
        shortcut_run,
        dict(name="shortcut_every8", bake_cfg_scale=None),
        None,
    ),
    ("shortcut", "online weights for the targets"): (
        shortcut_run,
        dict(name="shortcut_every8", target_weights="online"),
        None,
    ),
    ("shortcut", "sigma_min option at 1e-4"): (
        shortcut_run,
        dict(name="shortcut_every8", map_sigma=False, sigma_min=1e-4),
        None,
    ),
    ("shortcut", "sigma_min not mapped"): (
        shortcut_run,
        dict(name="shortcut_every8", map_sigma=False),
        None,
    ),
    ("ct", "online weights for the target"): (
        consistency_run,
        dict(name="ct_k3", target="online"),
        None,
    ),
    ("ct", "target network at the curriculum token 2^-k"): (
        consistency_run,
        dict(
            name="ct_k3",
            nets=Nets(online=Stub(ONLINE), ema=token(Stub(EMA), lambda d: d / 8)),
        ),
        None,
    ),
    ("ct", "curriculum level k + 1"): (
        consistency_run,
        dict(name="ct_k3"),
        patch(Consistency, "level", lambda self, step: 4),
    ),
    ("ct", "sigma_min not mapped"): (consistency_run, dict(name="ct_k6", map_sigma=False), None),
    ("cd", "no clipping"): (consistency_run, dict(name="cd", teacher=cd_teacher()), None),
    ("cd", "teacher at d = 1"): (
        consistency_run,
        dict(name="cd", teacher=cd_teacher(), clip=4.0),
        patch(CM, "FLOW_MATCHING_LEVEL", 1.0),
    ),
    ("cd", "online weights for the target"): (
        consistency_run,
        dict(name="cd", teacher=cd_teacher(), clip=4.0, target="online"),
        None,
    ),
    ("pd", "second half step at t, not t + d"): (
        pd_run,
        dict(name="pd_round2", teacher=pd_teacher(2)),
        patch(PD, "two_step_average", make=second_step_at_t),
    ),
    ("pd", "teacher at the student's token"): (
        pd_run,
        dict(name="pd_round2", teacher=token(pd_teacher(2), lambda d: 2 * d)),
        None,
    ),
    ("pd", "the previous round's step"): (
        pd_run,
        dict(name="pd_round2", teacher=pd_teacher(1), round_=1),
        None,
    ),
    ("pd", "sigma_min not mapped"): (
        pd_run,
        dict(name="pd_round2", teacher=pd_teacher(2), map_sigma=False),
        None,
    ),
    ("pd", "midpoint not clipped"): (
        pd_run,
        dict(name="pd_round2_clip", teacher=pd_teacher(2), method=ProgressiveDistillation()),
        None,
    ),
    ("pd", "no guidance in round 0"): (
        pd_run,
        dict(name="pd_round0_cfg", teacher=pd_teacher(0), method=ProgressiveDistillation()),
        None,
    ),
    ("pd", "online weights teach at the round start"): (
        pd_round_start_run,
        dict(teacher_weights="online"),
        None,
    ),
    ("pd", "d token follows the round"): (
        pd_run,
        dict(name="pd_round2", teacher=pd_teacher(0), method=ProgressiveDistillation()),
        None,
    ),
    ("live_reflow", "EMA weights generate the pairs"): (
        live_reflow_run,
        dict(gen_weights="ema"),
        None,
    ),
    ("live_reflow", "no guidance in the generation"): (
        live_reflow_run,
        dict(gen_cfg_scale=1.0),
        None,
    ),
    ("live_reflow", "4 generation steps"): (live_reflow_run, dict(gen_steps=4), None),
    ("live_reflow", "flow-matching token d = 1"): (
        live_reflow_run,
        {},
        patch(LR, "FLOW_MATCHING_LEVEL", 1.0),
    ),
    ("live_reflow", "sigma_min not mapped"): (live_reflow_run, dict(map_sigma=False), None),
    ("meanflow", "no time reversal"): (
        meanflow_run,
        dict(name="meanflow_kappa", reverse_time=False),
        None,
    ),
    ("meanflow", "JVP tangent +1 on d"): (
        meanflow_run,
        dict(name="meanflow_kappa"),
        patch(torch.func, "jvp", make=jvp_d_tangent_plus_one),
    ),
    ("meanflow", "kappa = 0"): (meanflow_run, dict(name="meanflow_kappa", kappa=0.0), None),
    ("meanflow", "guidance interval left in paper time (wrong rows)"): (
        meanflow_run,
        dict(name="meanflow_interval", map_interval=False),
        None,
    ),
    ("meanflow", "labels dropped on any row"): (
        meanflow_run,
        dict(name="meanflow_kappa", official_drop_rows=False, label_dropout_rows="any"),
        None,
    ),
    ("meanflow", "adaptive weight c = 1e-3"): (
        meanflow_run,
        dict(name="meanflow_kappa", c=1e-3),
        None,
    ),
}


@pytest.mark.parametrize("case", list(PERTURBATIONS), ids=lambda c: f"{c[0]}: {c[1]}")
def test_perturbation_is_caught(case, monkeypatch):
    """Each deliberate error makes some output differ from the official code by more than TOL."""
    run, kwargs, setup = PERTURBATIONS[case]
    if setup is not None:
        setup(monkeypatch)
    got, want = run(mp=monkeypatch, **kwargs)[:2]
    diffs = differences(got, want)
    assert max(diffs.values()) > TOL, f"{case} still matches the official code: {diffs}"
