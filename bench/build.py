"""Builders: everything a job makes from its config before it trains.

The device (``device=auto|cpu|cuda``, one GPU per DDP process) and its determinism setting; the
method, data and network from their YAML ``_target_`` (``make``: Hydra's ``instantiate``, with our
one-sentence errors let through); the steps a ``compute_budget`` buys; the teacher a method names
(``bench.teacher``); the evaluator and its metric suite (``bench.metrics.suites.suite_for``). Each
refuses bad input in one sentence before anything is trained or logged.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from bench import accel
from bench import distributed as ddp
from bench.budget import steps_for_budget, training_budget
from bench.errors import UserError
from bench.identity import pin_precision
from bench.train import check_batch_split

CONFIG_DIR = Path(__file__).resolve().parents[1] / "sweeps"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "device=cuda was requested but no CUDA device is visible; use device=cpu or auto"
        )
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown device {name!r}; choose one of: auto, cpu, cuda")
    return torch.device(name)


def use_deterministic(setting, device: torch.device) -> None:
    """``deterministic``: ``auto`` is on for CPUs (bitwise resume, docs/FAILURES.md) and off for
    GPUs, where deterministic kernels cost speed and resume is exact only up to float tolerance."""
    if setting not in ("auto", True, False):
        raise UserError(
            f"deterministic={setting!r} is not allowed; choose one of auto, true, false"
        )
    on = device.type != "cuda" if setting == "auto" else setting
    if on and device.type == "cuda":  # cuBLAS is deterministic only with a fixed workspace
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)


def setup_device(cfg: DictConfig, world: ddp.World = ddp.SINGLE) -> torch.device:
    """This process's device, its determinism, and (under DDP) the process group."""
    device = ddp.device_for(world, pick_device(cfg.device))
    use_deterministic(cfg.get("deterministic", "auto"), device)
    ddp.init(world, device)
    return device


def make(node: DictConfig, **kwargs):
    """``hydra.utils.instantiate`` that lets our one-sentence ``UserError`` through unwrapped."""
    from hydra.errors import InstantiationException

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def make_method(cfg: DictConfig):
    """The method from ``cfg.method``; ``method.teacher`` names a teacher run (bench.teacher),
    not a constructor argument."""
    node = OmegaConf.to_container(cfg.method, resolve=True)
    node.pop("teacher", None)
    return make(OmegaConf.create(node))


def build(cfg: DictConfig):
    """Data, network and method from the config (no training); the initial weights depend on
    ``cfg.seed`` only. Returns ``(data, net, method, conditional)``."""
    torch.manual_seed(cfg.seed)
    method = make_method(cfg)
    for steps in cfg.eval.budgets:  # fail before any training, not after it
        method.check_budget(steps)
    data = make(cfg.data)
    conditional = bool(cfg.data.get("conditional", False))
    if conditional and data.num_classes == 0:
        raise UserError(
            f"data.conditional=true but {data.name} has no labels; use data.conditional=false"
        )
    if data.kind == "points" and "mlp" not in cfg.size._target_.lower():
        raise UserError(
            f"{data.name} holds {data.shape[0]}-d points; use size=mlp (DiT sizes are for images)"
        )
    # How the method embeds d and t (MeanFlow: linear, 1.0) decides how the network is built.
    embedding = method_embedding(method)
    net = network(cfg, data, conditional, embedding)
    accel.prepare_model(net, cfg.train)  # train.grad_checkpoint, train.compile
    return data, net, method, conditional


def method_embedding(method) -> dict:
    """How ``method`` asks the network to embed ``t`` and ``d`` (``d_embedding``, ``t_scale``,
    ``d_scale``; ``d_scale`` None: the network's default for its ``d_embedding``)."""
    d_scale = getattr(method, "d_scale", None)
    return {
        "d_embedding": method.d_embedding,
        "t_scale": float(method.t_scale),
        "d_scale": None if d_scale is None else float(d_scale),
    }


def network(cfg: DictConfig, data, conditional: bool, embedding: dict) -> torch.nn.Module:
    """An untrained network of ``cfg.size`` for ``data`` that embeds ``t`` and ``d`` as
    ``embedding`` says (``d_embedding``, ``t_scale``)."""
    return make(
        cfg.size,
        input_shape=data.shape,
        num_classes=data.num_classes if conditional else 0,
        **embedding,
    )


def embedding_of(net: torch.nn.Module) -> dict:
    """How ``net`` embeds ``t`` and ``d``; checkpoints record it so a teacher is rebuilt as its
    own run built it, whatever the student embeds."""
    return {
        "d_embedding": net.d_embedding,
        "t_scale": float(net.t_embed.scale),
        "d_scale": float(net.d_embed.scale),
    }


@dataclass
class Parts:
    """What one job trains and evaluates, on its device."""

    data: object  # bench.data.Dataset
    net: torch.nn.Module
    method: torch.nn.Module  # methods.base.Method
    conditional: bool
    device: torch.device


def prepare(cfg: DictConfig, world: ddp.World = ddp.SINGLE) -> Parts:
    """The device and everything built on it; every check that needs no run directory."""
    device = setup_device(cfg, world)
    # Before any identity is taken: auto precision is hashed as what it is on this device.
    pin_precision(cfg, accel.resolve_precision(device, cfg.train.get("precision") or "auto"))
    data, net, method, conditional = build(cfg)
    check_batch_split(cfg.train, world)  # before the MLflow run exists
    return Parts(data, net.to(device), method.to(device), conditional, device)


def make_evaluator(
    cfg: DictConfig, data, device: torch.device, conditional: bool, world=ddp.SINGLE
):
    """The evaluator of ``cfg.eval`` and its data kind's metric suite. Built before anything is
    trained or logged: a bad evaluation setting (missing Inception weights, FID on latents
    without a decoder) fails first, and costs nothing. Under DDP every process samples its share
    (bench.shard); only rank 0 builds the suite that computes the metrics."""
    from bench.evaluate import Evaluator
    from bench.metrics.suites import suite_for

    e = cfg.eval
    # The decoder: rank 0's suite holds it; another process needs it only to featurize for FID.
    wanted = e.get("decoder") and (world.main or e.get("fid", False))
    decoder = make(e.decoder).to(device).eval() if wanted else None
    if not world.main:  # samples (and featurizes for FID) its share of every budget; no metrics
        from bench.metrics.suites import SampleFeatures

        featurize = None
        if e.get("fid", False):
            featurize = SampleFeatures.load(data, device, e.get("inception_dir"), decoder)
        return Evaluator(
            None,
            data,
            e.num_samples,
            e.seed,
            e.batch_size,
            device,
            conditional,
            budgets=tuple(e.budgets),
            weights=e.weights,
            world=world,
            featurize=featurize,
        )
    cache = e.get("cache_dir") or (
        Path(cfg.data.path) / ".fewstep-stats"
        if cfg.data.get("path")
        else "~/.cache/fewstep-bench/stats"
    )
    suite = suite_for(
        data,
        e.num_samples,
        e.seed,
        device,
        fid=e.get("fid", False),
        features=e.get("features", "auto"),
        resamples=e.get("bootstrap", 200),
        inception_dir=e.get("inception_dir"),
        cache_dir=cache,
        decoder=decoder,
    )
    return Evaluator(
        suite,
        data,
        e.num_samples,
        e.seed,
        e.batch_size,
        device,
        conditional,
        budgets=tuple(e.budgets),
        weights=e.weights,
        grids=e.grids,
        save_samples=e.save_samples,
        interpolation=e.interpolation,
        world=world,
        featurize=getattr(suite, "fid_features", None),
    )


def resolve_teacher(
    cfg: DictConfig, method, net, train_job: Callable[[DictConfig], object], world=ddp.SINGLE
):
    """Attach the teacher the method's config names (``train_job`` trains it first when no
    finished run with its identity exists), or explain why a teacher is required or refused.
    Returns the ``bench.teacher.Teacher`` (None without one)."""
    from bench import teacher as teachers

    spec = cfg.method.get("teacher")
    name = type(method).__name__
    if spec and method.needs_teacher == "no":
        raise UserError(
            f"method.teacher is set, but {name} learns without a teacher; remove method.teacher"
        )
    if not spec and method.needs_teacher == "required":
        raise UserError(
            f"{name} needs a teacher: set method.teacher.method (e.g. flow_matching) or method.teacher.checkpoint"
        )

    def teacher_net(embedding: dict) -> torch.nn.Module:
        """The student's size, data and classes; the teacher's own embedding. Built without
        touching the global RNG (its weights are loaded right after)."""
        with torch.random.fork_rng(devices=[]):
            return make(
                cfg.size, input_shape=net.input_shape, num_classes=net.num_classes, **embedding
            )

    found = teachers.resolve(cfg, net, teacher_net, train_job, world)
    if found is not None:
        method.attach_teacher(found.net.to(next(net.parameters()).device))
    return found


def apply_compute_budget(cfg: DictConfig) -> None:
    """``compute_budget`` set: replace ``train.steps`` by the steps that spend it (teacher
    training and one-off work counted), and pin the teacher's own steps so the teacher the job
    attaches is the one that was paid for."""
    total = cfg.get("compute_budget")
    if total is None:
        return
    from bench import teacher as teachers

    method = make_method(cfg)
    if cfg.method.get("teacher"):  # a teacher's forwards are part of the per-sample cost (CD)
        method.attach_teacher(torch.nn.Identity())
    spent, tcfg = 0.0, teachers.teacher_config(cfg)
    if tcfg is not None:
        tsteps, tbatch = int(tcfg.train.steps), int(tcfg.train.batch_size)
        key = "budget/forward_equivalents"
        spent = training_budget(make_method(tcfg), tsteps, tbatch)[key]
    steps = steps_for_budget(total, method, cfg.train.batch_size, spent)
    with open_dict(cfg):
        if tcfg is not None:
            cfg.method.teacher.train = OmegaConf.merge(
                cfg.method.teacher.get("train") or {}, {"steps": int(tcfg.train.steps)}
            )
        cfg.train.steps = steps
    print(
        f"compute_budget={float(total):g} forward-equivalents: train.steps={steps} "
        f"({cfg.train.batch_size} x {method.cost().per_sample:g} per step"
        f"{f', teacher {spent:g}' if spent else ''}"
        f"{f', one-off {method.cost().one_off:g}' if method.cost().one_off else ''})",
        flush=True,
    )
