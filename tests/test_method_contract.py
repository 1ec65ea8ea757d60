"""The method contract (methods/base.py), checked for every method the configs name.

The methods are the files of ``sweeps/method/`` (globbed, never listed), so a new method and its
YAML are under every check below without editing this file; the last test shows it with a
throwaway eighth method. Each method runs the way the harness runs it -- built by
``bench.run.build`` from its composed config, its teacher trained from ``bench.teacher``'s
derived config and handed over with ``attach_teacher``, then the trainer's calls in the trainer's
order -- on 2-D toy points with a small MLP:

* the config composes and builds; the loss is finite, and within every stage it falls on a fixed
  batch with fixed noise;
* the stated cost (``cost()``) equals the network calls ``CountingNet`` counts: ``per_sample`` at
  every step (MeanFlow's JVP and every teacher forward included) and ``one_off`` (reflow's pairs)
  at the stage starts; ``sample`` spends ``nfe`` evaluations per sample at every budget;
* a checkpoint round trip (network, EMA, optimizer, the method's ``state_dict``) resumes the same
  run: identical losses under the same seeds;
* a bad step budget and every bad option are one sentence naming the value.
"""

from __future__ import annotations

import io
import math
import shutil
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import CONFIG_DIR
from omegaconf import OmegaConf

from bench import options, rng
from bench.budget import Cost, CountingNet
from bench.ema import EMA
from bench.errors import UserError
from methods.base import BUDGETS, Method, Nets, StageContext

#: Training steps of a toy run, shared by the method's stages: enough for every method's loss to
#: fall measurably (MeanFlow's adaptively weighted loss is the slowest), a few seconds per run.
STEPS = 240
RESUME_BEFORE_END = 5  # the round trip resumes this many steps before the end
PROBE = 10**6  # the data index and RNG key of the fixed batch the loss is measured on
TEACHER = "flow_matching"  # what an optional teacher is in this project (bench/teacher.py)
TOY = [
    "data=toy2d",
    "data.n_train=2048",
    "data.n_test=64",
    "size=mlp",
    "size.hidden=64",
    "size.depth=3",
    "train.batch_size=128",
    "train.lr=3e-3",
    "train.ema_rate=0.99",
    "eval.budgets=[1,2,4,8,16,32,64,128]",
]


def method_names(config_dir: Path) -> list[str]:
    return sorted(p.stem for p in (config_dir / "method").glob("*.yaml"))


def method_class(config_dir: Path, name: str) -> type[Method]:
    from hydra.utils import get_class

    return get_class(OmegaConf.load(config_dir / "method" / f"{name}.yaml")._target_)


def cases(config_dir: Path) -> list[tuple[str, bool]]:
    """(method, with a teacher): without one unless required, and with one where allowed."""
    out = []
    for name in method_names(config_dir):
        needs = method_class(config_dir, name).needs_teacher
        out += [(name, False)] if needs != "required" else []
        out += [(name, True)] if needs != "no" else []
    return out


def compose_in(config_dir: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def method_config(config_dir: Path, name: str, teacher: bool, *overrides: str):
    spec = OmegaConf.load(config_dir / "method" / f"{name}.yaml").get("teacher")
    if teacher and not spec:
        overrides += (f"+method.teacher.method={TEACHER}",)
    if not teacher and spec:
        overrides += ("method.teacher=null",)
    return compose_in(config_dir, f"method={name}", *overrides)


# -- the harness's calls, in the trainer's order -------------------------------------------------
class Spent:
    """Forward-equivalents spent inside the block by every ``CountingNet`` it calls."""

    def __enter__(self) -> Spent:
        self.start: dict[CountingNet, int] = {}

        def note(module, args):
            if isinstance(module, CountingNet) and module not in self.start:
                self.start[module] = module.forward_equivalents()

        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(note)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()
        self.total = sum(m.forward_equivalents() - s for m, s in self.start.items())


@dataclass
class ToyRun:
    """One training run of a method on toy points with ``CountingNet``-wrapped networks."""

    cfg: typing.Any
    run_dir: Path
    teacher_net: torch.nn.Module | None = None  # given: a resumed run gets the same teacher
    losses: list[float] = field(default_factory=list)
    logs: list[dict] = field(default_factory=list)
    per_step: list[float] = field(default_factory=list)  # counted forward-equivalents per row
    one_off: float = 0.0  # counted at the stage starts
    probes: dict[int, list[float]] = field(default_factory=dict)  # stage -> [at start, at end]

    def __post_init__(self):
        from bench import teacher as teachers
        from bench.build import build

        self.data, net, self.method, _ = build(self.cfg)
        self.net = CountingNet(net)
        tcfg = teachers.teacher_config(self.cfg)
        if tcfg is not None and self.teacher_net is None:  # trained the way the job trains it
            teacher = ToyRun(tcfg, self.run_dir / "teacher")
            teacher.fit(tcfg.train.steps)
            self.teacher_net = teacher.ema.net
        if self.teacher_net is not None:
            self.method.attach_teacher(self.teacher_net)
        t, m = self.cfg.train, self.method
        rate = t.ema_rate if m.ema_rate is None else m.ema_rate
        self.ema = EMA(self.net, rate, t.ema_warmup and m.ema_rate is None)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=t.lr)
        self.ctx = StageContext(
            self.run_dir, self.data, torch.device("cpu"), False, self.cfg.seed, self.opt.state.clear
        )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.method.bind(self.ctx)
        self.starts = self.method.stage_starts(t.steps)
        self.step, self.stage = 0, None

    @property
    def nets(self) -> Nets:
        return Nets(self.net, self.ema.net)

    def fit(self, until: int) -> None:
        t = self.cfg.train
        while self.step < until:
            stage = max(i for i, s in enumerate(self.starts) if s <= self.step)
            if stage != self.stage:
                self.stage = stage
                with Spent() as spent:
                    fresh = self.step == self.starts[stage]
                    self.method.begin_stage(stage, self.nets, self.ctx, fresh)
                self.one_off += spent.total
                if fresh:
                    self.probes[stage] = [self.probe()]
            for group in self.opt.param_groups:
                group["lr"] = t.lr * self.method.lr_factor(self.step, t.steps)
            torch.manual_seed(rng.step_key(self.cfg.seed, self.step))
            batch = self.data.batch(t.batch_size, self.cfg.seed, self.step, False)
            with Spent() as spent:
                loss, logs = self.method.loss(self.nets, batch, self.step)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
            self.opt.step()
            self.ema.update(self.net, self.step)
            self.losses.append(float(loss.detach()))
            self.logs.append({k: float(v) for k, v in logs.items()})
            self.per_step.append(spent.total / t.batch_size)
            self.step += 1
            if self.step in (*self.starts[self.stage + 1 :], t.steps) and self.stage in self.probes:
                self.probes[self.stage].append(self.probe())

    def probe(self) -> float:
        """The loss on one fixed batch with fixed noise, as at the stage's first step: what
        training should lower, without the noise of comparing different batches."""
        torch.manual_seed(rng.step_key(self.cfg.seed, PROBE))
        batch = self.data.batch(4 * self.cfg.train.batch_size, self.cfg.seed, PROBE, False)
        with torch.no_grad():
            loss, _ = self.method.loss(self.nets, batch, self.starts[self.stage])
        return float(loss)

    def state(self) -> dict:
        """What a checkpoint carries, through ``torch.save`` and a ``weights_only`` load."""
        buf = io.BytesIO()
        torch.save(
            {
                "net": self.net.state_dict(),
                "ema": self.ema.state_dict(),
                "opt": self.opt.state_dict(),
                "method": self.method.state_dict(),
            },
            buf,
        )
        buf.seek(0)
        return torch.load(buf, weights_only=True)

    def resume(self, state: dict, step: int) -> None:
        self.net.load_state_dict(state["net"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.method.load_state_dict(state["method"])
        self.step = step


@dataclass
class Contract:
    """A method trained end to end once, and the same run resumed from a checkpoint."""

    run: ToyRun
    resumed: ToyRun
    resume_step: int


def contract_run(config_dir: Path, name: str, teacher: bool, work: Path) -> Contract:
    cfg = method_config(config_dir, name, teacher, *TOY, f"train.steps={STEPS}")
    run = ToyRun(cfg, work / "run")
    k = STEPS - RESUME_BEFORE_END
    run.fit(k)
    state = run.state()
    run.fit(STEPS)
    resumed = ToyRun(cfg, work / "run", teacher_net=run.teacher_net)
    resumed.resume(state, k)
    resumed.fit(STEPS)
    return Contract(run, resumed, k)


# -- the checks ----------------------------------------------------------------------------------
def assert_loss_is_finite_and_falls(c: Contract) -> None:
    run = c.run
    assert all(math.isfinite(x) for x in run.losses), run.losses
    assert run.probes, "no stage was trained"
    for stage, (first, last) in run.probes.items():
        assert last < first, f"stage {stage}: the loss did not fall ({first:.5f} -> {last:.5f})"


def assert_stated_cost_is_counted(c: Contract) -> None:
    run, cost = c.run, c.run.method.cost()
    assert isinstance(cost, Cost)
    assert run.per_step == pytest.approx([cost.per_sample] * len(run.per_step))
    assert run.one_off == pytest.approx(cost.one_off)


def assert_sampling_spends_nfe(c: Contract) -> None:
    run = c.run
    x0 = torch.randn(16, *run.data.shape, generator=torch.Generator().manual_seed(0))
    for steps in BUDGETS:
        with Spent() as spent:
            x = run.method.sample(run.ema.net, x0, steps)
        assert x.shape == x0.shape and bool(torch.isfinite(x).all()), steps
        assert spent.total / len(x0) == run.method.nfe(steps, conditional=False), steps


def assert_checkpoint_round_trip(c: Contract) -> None:
    k = c.resume_step
    assert c.resumed.losses == c.run.losses[k:]  # bitwise: the same floats
    assert c.resumed.logs == c.run.logs[k:]


def assert_bad_budget_is_one_sentence(config_dir: Path, name: str, teacher: bool) -> None:
    from bench.build import build

    cfg = method_config(config_dir, name, teacher, *TOY, "eval.budgets=[1,3]")
    with pytest.raises(UserError) as e:
        build(cfg)
    assert "step budget 3 is not allowed" in str(e.value) and "\n" not in str(e.value)
    method = build(method_config(config_dir, name, teacher, *TOY))[2]
    for steps in (3, 0, 256, 1.5, True):
        with pytest.raises(UserError, match=f"step budget {steps!r} is not allowed"):
            method.check_budget(steps)


def bad_values(default, hint) -> list:
    """Values the option's declared type refuses: a wrong type, an integer not among integer
    choices, and each bound overstepped (an open bound: the bound itself)."""
    wrong = ["no-such-choice"] if isinstance(default, str) else ["abc"]
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    for h in typing.get_args(hint) if union else [hint]:  # X | None: the bounds of X
        if typing.get_origin(h) is typing.Literal and all(type(c) is int for c in h.__args__):
            wrong.append(max(h.__args__) + 1)
        if typing.get_origin(h) is typing.Annotated:
            base, *meta = typing.get_args(h)
            step = 1 if base is int else 0.5
            for r in (m for m in meta if isinstance(m, options.Range)):
                wrong += [] if r.lo is None else [r.lo if r.lo_open else r.lo - step]
                wrong += [] if r.hi is None else [r.hi if r.hi_open else r.hi + step]
    return wrong


def assert_bad_options_are_one_sentence(config_dir: Path, name: str) -> None:
    from bench.build import make_method

    node = OmegaConf.to_container(OmegaConf.load(config_dir / "method" / f"{name}.yaml"))
    declared = options.hints(method_class(config_dir, name))
    keys = [k for k in node if k not in ("_target_", "teacher")]
    assert set(keys) <= set(declared), "every YAML key is a declared constructor option"
    for key in keys:
        for value in bad_values(node[key], declared[key]):
            cfg = compose_in(config_dir, f"method={name}", f"method.{key}={value}")
            with pytest.raises(UserError) as e:
                make_method(cfg)
            text = str(e.value)
            assert text.startswith(f"method.{key}={value!r} is not allowed: "), text
            assert "\n" not in text and len(text) < 300, text


# -- every method in sweeps/method/ --------------------------------------------------------------
CASES = cases(CONFIG_DIR)
IDS = [f"{name}+teacher" if teacher else name for name, teacher in CASES]


@pytest.fixture(scope="module")
def contracts(tmp_path_factory):
    memo: dict[tuple[str, bool], Contract] = {}

    def get(name: str, teacher: bool) -> Contract:
        if (name, teacher) not in memo:
            work = tmp_path_factory.mktemp(f"{name}-{teacher}")
            memo[name, teacher] = contract_run(CONFIG_DIR, name, teacher, work)
        return memo[name, teacher]

    return get


@pytest.mark.parametrize("name,teacher", CASES, ids=IDS)
def test_loss_is_finite_and_falls(contracts, name, teacher):
    assert_loss_is_finite_and_falls(contracts(name, teacher))


@pytest.mark.parametrize("name,teacher", CASES, ids=IDS)
def test_stated_cost_equals_counted_calls(contracts, name, teacher):
    assert_stated_cost_is_counted(contracts(name, teacher))


@pytest.mark.parametrize("name,teacher", CASES, ids=IDS)
def test_sampling_spends_what_nfe_states(contracts, name, teacher):
    assert_sampling_spends_nfe(contracts(name, teacher))


@pytest.mark.parametrize("name,teacher", CASES, ids=IDS)
def test_checkpoint_round_trip_resumes_the_same_run(contracts, name, teacher):
    assert_checkpoint_round_trip(contracts(name, teacher))


@pytest.mark.parametrize("name,teacher", CASES, ids=IDS)
def test_a_bad_step_budget_is_one_sentence(name, teacher):
    assert_bad_budget_is_one_sentence(CONFIG_DIR, name, teacher)


@pytest.mark.parametrize("name", method_names(CONFIG_DIR))
def test_every_bad_option_is_one_sentence_naming_it(name):
    assert_bad_options_are_one_sentence(CONFIG_DIR, name)


def test_the_contract_is_abstract():
    with pytest.raises(TypeError, match="abstract"):
        Method()


# -- an eighth method is under every check without a test edit -------------------------------------
EIGHTH = '''
"""A throwaway method for the contract test: flow matching with an optional time weighting."""

from typing import Literal

import torch

from bench.budget import Cost
from bench.dit import FLOW_MATCHING_LEVEL
from bench.options import Probability
from methods.base import Method
from methods.common import interpolate, noise


class Eighth(Method):
    def __init__(self, weighting: Literal["none", "t"] = "none", mix: Probability = 0.5):
        super().__init__()
        self.set_options(locals())

    def loss(self, nets, batch, step):
        x1, x0 = batch.x1, noise(batch)
        t = torch.rand(len(x1))
        v = nets.online(interpolate(x0, x1, t), t, torch.full_like(t, FLOW_MATCHING_LEVEL))
        err = (v - (x1 - x0)).square().flatten(1).mean(1)
        w = (1 + self.mix * t) if self.weighting == "t" else torch.ones_like(t)
        loss = (w * err).mean()
        return loss, {"loss/flow": loss.detach()}

    def cost(self):
        return Cost(per_sample=STATED)
'''


def add_method(tmp_path: Path, monkeypatch, stated: float) -> Path:
    """A copy of the sweeps tree with ``eighth.yaml`` and its module on ``sys.path``."""
    config_dir = tmp_path / "sweeps"
    shutil.copytree(CONFIG_DIR, config_dir)
    (config_dir / "method" / "eighth.yaml").write_text(
        "_target_: eighth_method.Eighth\nweighting: t\nmix: 0.5\n"
    )
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "eighth_method.py").write_text(f"STATED = {stated}\n{EIGHTH}")
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    monkeypatch.delitem(sys.modules, "eighth_method", raising=False)
    return config_dir


def test_an_eighth_method_is_under_every_check_without_a_test_edit(tmp_path, monkeypatch):
    config_dir = add_method(tmp_path, monkeypatch, stated=3.0)
    assert ("eighth", False) in cases(config_dir)  # discovered by the same glob
    c = contract_run(config_dir, "eighth", False, tmp_path / "work")
    assert_loss_is_finite_and_falls(c)
    assert_stated_cost_is_counted(c)
    assert_sampling_spends_nfe(c)
    assert_checkpoint_round_trip(c)
    assert_bad_budget_is_one_sentence(config_dir, "eighth", False)
    assert_bad_options_are_one_sentence(config_dir, "eighth")


def test_an_eighth_method_that_misstates_its_cost_fails_the_contract(tmp_path, monkeypatch):
    config_dir = add_method(tmp_path, monkeypatch, stated=4.0)  # it spends 3 per row
    c = contract_run(config_dir, "eighth", False, tmp_path / "work")
    with pytest.raises(AssertionError):
        assert_stated_cost_is_counted(c)
