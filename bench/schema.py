"""The job config's specification: every key of the ``train``, ``eval`` and ``data`` groups and the
top-level settings, declared once as typed dataclass fields and checked in one call.

``check(cfg)`` runs first in every job (``bench.run.job``), before a run directory, a lock or an
MLflow run exists, so a bad value costs nothing and leaves nothing behind. Each refusal is one
sentence naming the key, the value and what is allowed (``bench.options``)::

    train.steps=0 is not allowed: an integer >= 1
    eval.weights='bogus' is not allowed: one of ema, online
    train.lr=nan is not allowed: a number > 0
    eval.budgets=[2.0] is not allowed: a list whose items are each an integer >= 1
    train.stpes=10 is not allowed: not an option; the options are steps, batch_size, ...

An unknown key is refused too (a typo would otherwise be ignored silently). The method group is
checked by each method's constructor signature and the model size by its constructor; a data
``_target_`` this module does not list (a user's own loader) has only its ``conditional`` checked.
Adding a key to a YAML group means declaring it here: ``tests/test_adversarial.py`` composes every
group and experiment and fails on an undeclared key.

Why dataclasses and not Hydra structured configs: the same reasons as ``bench.options`` (ranges,
one-sentence errors, YAML composition unchanged); the dataclass is only the specification.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from omegaconf import DictConfig, OmegaConf

from bench.errors import UserError
from bench.options import Positive, PositiveInt, Probability, Range, Rule, validate
from bench.track import is_secret

#: The parts of a config that are not options: Hydra's own tree.
NOT_CHECKED = ("hydra",)

NonNegative = Annotated[float, Range(0)]
Beta = Annotated[float, Range(0, 1, hi_open=True)]
Fraction = Annotated[float, Range(0, 1, hi_open=True)]
NonEmpty = Annotated[str, Rule(lambda s: bool(s.strip()), "not empty")]
Budgets = Annotated[tuple[PositiveInt, ...], Rule(lambda b: len(b) > 0, "(at least one)")]


@dataclass
class Train:
    """``sweeps/train/*.yaml``."""

    steps: PositiveInt
    batch_size: PositiveInt
    lr: Positive
    betas: tuple[Beta, Beta]
    weight_decay: NonNegative
    grad_clip: Positive | None
    grad_accum: PositiveInt
    ema_rate: Probability
    ema_warmup: bool
    log_every: PositiveInt
    ckpt_every: PositiveInt
    progress: bool
    precision: Literal["auto", "fp32", "bf16"]
    tf32: bool
    compile: Literal[False, True, "default", "reduce-overhead", "max-autotune"]
    grad_checkpoint: bool
    seed: int


@dataclass
class Eval:
    """``sweeps/eval/*.yaml``."""

    budgets: Budgets
    num_samples: PositiveInt
    seed: int
    batch_size: PositiveInt
    weights: Literal["ema", "online"]
    grids: bool
    save_samples: bool
    interpolation: bool
    fid: bool
    inception_dir: str | None
    cache_dir: str | None
    features: Literal["auto", "classifier", "random_cnn", "pixel_pca"]
    decoder: dict | None
    bootstrap: Annotated[int, Range(0)]  # 0 or >= 20: the suite says so (bench.metrics.suites)
    every: Annotated[int, Range(0)]  # 0: no evaluation during training (bench.curves)
    every_budgets: Budgets | None
    every_num_samples: PositiveInt


@dataclass
class Digits16:
    _target_: str
    conditional: bool


@dataclass
class Shapes16:
    _target_: str
    conditional: bool
    n_train: Annotated[int, Range(2)]
    n_test: PositiveInt


@dataclass
class Toy2d:
    _target_: str
    conditional: bool
    name: Literal["8gaussians", "moons", "checkerboard"]
    n_train: Annotated[int, Range(2)]
    n_test: PositiveInt


@dataclass
class ImageFolder:
    _target_: str
    conditional: bool
    path: str | None  # None is refused by the loader with an example path
    resolution: PositiveInt
    channels: Literal[1, 3]
    test_fraction: Fraction
    fingerprint: str  # set by bench.identity.pin_data, never by hand
    flip: bool
    store: str | None  # the packed store's folder (bench.store); None: the default cache
    progress: bool


@dataclass
class Latents:
    _target_: str
    conditional: bool
    path: str | None
    test_fraction: Fraction
    fingerprint: str
    flip: bool
    posterior: Literal["sample", "mean"]


@dataclass
class AnyData:
    """A data loader this module does not know: only what every loader shares."""

    _target_: str
    conditional: bool


DATA = {
    "bench.data.digits16": Digits16,
    "bench.data.shapes16": Shapes16,
    "bench.data.toy2d": Toy2d,
    "bench.data.image_folder": ImageFolder,
    "bench.data.latents": Latents,
}


@dataclass
class Paths:
    root: NonEmpty


@dataclass
class Tracking:
    uri: NonEmpty | None
    experiment: NonEmpty


@dataclass
class Objective:
    metric: NonEmpty | None
    steps: PositiveInt


@dataclass
class PlanningSlurm:
    """``planning.slurm``: how a job's SLURM request is derived from its plan (bench.plan)."""

    size: bool
    margin: Positive  # time limit = estimate x margin + lead + extra_min
    extra_min: NonNegative
    mem_margin: Positive
    max_timeout_min: PositiveInt
    min_mem_gb: PositiveInt


@dataclass
class Planning:
    """``planning``: what the estimates of ``plan=true`` and the SLURM requests are for."""

    device: Literal["auto", "cpu", "H100", "H200", "A100"]  # bench.plan.CARDS, and cpu/auto
    records: NonEmpty | None  # a folder of bench.perf records; bench.plan.records checks it is one
    utilisation: Annotated[float, Range(0, 1, lo_open=True)] | None
    slurm: Any  # its own spec, PlanningSlurm


def check_planning(values) -> None:
    """The ``planning`` group (a mapping), one sentence for the first bad key. Checked by the job
    and, before anything is planned or submitted, by the plan and the SLURM launcher: a bad value
    there would otherwise fall back to the preset's request without a word."""
    _group(Planning, values, "planning")
    _group(PlanningSlurm, values["slurm"], "planning.slurm")


@dataclass
class Top:
    """The top-level scalars of ``sweeps/config.yaml`` (groups are checked on their own)."""

    seed: int
    device: Literal["auto", "cpu", "cuda"]
    deterministic: Literal["auto", True, False]
    eval_only: bool
    compute_budget: Positive | None
    plan: bool  # bench.plan: print what a sweep costs, train nothing
    allow_long_cpu: bool  # bench.plan.guard: let a CPU job estimated over an hour start
    # The groups, each checked by its own spec below (or by its constructor). ``recipe`` is a
    # Hydra config group too: Hydra refuses a choice it has no file for.
    recipe: Any
    planning: Any
    # The groups, each checked by its own spec below (or by its constructor).
    data: Any
    size: Any
    method: Any
    train: Any
    eval: Any
    paths: Any
    tracking: Any
    objective: Any


def _group(spec, values, prefix: str) -> None:
    if not isinstance(values, dict):
        raise UserError(f"{prefix}={values!r} is not allowed: a group of options (key=value)")
    # Credentials (``+data.hub_token=...``) are for plugins and the environment, not options:
    # they are let through, and redacted wherever the config is written (bench.track.redact).
    validate(spec, {k: v for k, v in values.items() if not is_secret(str(k))}, prefix)


def check(cfg: DictConfig) -> None:
    """Every declared key of ``cfg`` has an allowed value and no undeclared key is present; one
    sentence naming the first one that does not."""
    try:
        values = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # an interpolation to a missing key: Hydra's message is one line
        raise UserError(f"the config cannot be resolved: {str(e).splitlines()[0]}") from e
    for key in NOT_CHECKED:
        values.pop(key, None)
    validate(Top, {k: v for k, v in values.items() if not is_secret(str(k))})
    _group(Train, values["train"], "train")
    _group(Eval, values["eval"], "eval")
    data = values["data"]
    spec = DATA.get(data.get("_target_")) if isinstance(data, dict) else None
    if spec is None and isinstance(data, dict):  # a user's own loader: its own keys are its own
        data = {k: data[k] for k in ("_target_", "conditional") if k in data}
    _group(spec or AnyData, data, "data")
    _group(Paths, values["paths"], "paths")
    _group(Tracking, values["tracking"], "tracking")
    if "planning" in values:
        check_planning(values["planning"])
    if values["objective"] is not None:  # a teacher's job has none
        _group(Objective, values["objective"], "objective")
    teacher = values["method"].get("teacher") if isinstance(values["method"], dict) else None
    if isinstance(teacher, dict) and teacher.get("train"):  # the teacher's own recipe overrides
        _group(Train, teacher["train"], "method.teacher.train")


def declared(group: str) -> tuple[str, ...]:
    """The keys declared for a group (``train``, ``eval``): for tests and docs."""
    spec = {"train": Train, "eval": Eval, "": Top}[group]
    return tuple(f.name for f in dataclasses.fields(spec))
