"""Teachers are shared runs, never retrained by accident.

A method that learns from a teacher (consistency distillation, reflow from an existing model,
progressive distillation) names it in its config::

    method:
      teacher:
        method: flow_matching        # a file in sweeps/method/
        train: {steps: 2000}         # optional overrides of the student's train recipe
        options: {embedding: raw}    # optional overrides of the teacher method's options
        # checkpoint: /path/to/checkpoint.pt   (instead: an existing fewstep-bench checkpoint)

The teacher's config is the student's with ``method`` (and ``train`` overrides) replaced, so it
has the same data, size and seed -- and a run identity of its own. ``resolve`` takes a file lock
next to that run directory, trains the teacher through the ordinary job (its own MLflow run) only
when no finished run with that identity exists, and returns its EMA weights. Two jobs of one sweep
needing the same teacher therefore train it once: the second waits on the lock, then loads it.
"""

from __future__ import annotations

import fcntl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from bench import accel, checkpoint
from bench import distributed as ddp
from bench.errors import UserError
from bench.identity import pin_precision, run_dir
from bench.record import read_state
from bench.train import CHECKPOINT

CONFIG_DIR = Path(__file__).resolve().parents[1] / "sweeps"


@dataclass
class Teacher:
    net: nn.Module  # the teacher's EMA weights, frozen, in eval mode
    run_id: str  # its MLflow run ("" for a bare checkpoint)
    forward_equivalents: float  # what training it cost (0 when unknown)
    source: str  # its run directory or checkpoint path


def teacher_config(cfg: DictConfig, auto_means: str = "fp32") -> DictConfig | None:
    """The teacher's job config; ``auto_means``: what ``precision=auto`` is on the device that
    trains it (bench.identity.pin_precision), for a teacher recipe that sets ``auto`` itself."""
    spec = cfg.method.get("teacher")
    if not spec or spec.get("checkpoint"):
        return None
    path = CONFIG_DIR / "method" / f"{spec.method}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise UserError(f"unknown teacher method {spec.method!r}; choose one of: {known}")
    tcfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    tcfg.method = OmegaConf.load(path)
    if spec.get("options"):
        tcfg.method = OmegaConf.merge(tcfg.method, spec.options)
    if spec.get("train"):
        tcfg.train = OmegaConf.merge(tcfg.train, spec.train)
    pin_precision(tcfg, auto_means)  # the run its own job will find, whatever its recipe says
    tcfg.eval_only = False
    tcfg.objective = None
    tcfg.compute_budget = None  # the teacher trains its own recipe; the student pays for it
    return tcfg


def recorded_embedding(meta: dict) -> dict:
    """How the network of a checkpoint embeds ``t`` and ``d`` (``d_embedding``, ``t_scale`` and,
    since the ``embedding`` option, ``d_scale``). Checkpoints written before the meta record held
    it are read from the class defaults of the method that trained them (the only way those runs
    could embed); a record without ``d_scale`` gets the network's default for its ``d_embedding``."""
    if isinstance(meta.get("embedding"), dict):
        return dict(meta["embedding"])
    from bench.build import make_method

    path = CONFIG_DIR / "method" / f"{meta.get('method')}.yaml"
    if not path.exists():
        raise UserError(
            f"teacher checkpoint meta names method {meta.get('method')!r}, which is unknown; "
            "cannot tell how its network embeds t and d"
        )
    node = OmegaConf.load(path)
    method = type(make_method(OmegaConf.create({"method": {"_target_": node._target_}})))
    return {"d_embedding": method.d_embedding, "t_scale": float(method.t_scale)}


def _load(path: Path, student: nn.Module, build: Callable[[dict], nn.Module]) -> nn.Module:
    """The EMA weights of the checkpoint at ``path`` in a network of the student's size, data
    and classes, embedding ``t`` and ``d`` as the teacher's own run did (``build(embedding)``)."""
    state = checkpoint.load(path)
    meta = state["meta"]
    want = {
        "model": student.name,
        "input_shape": list(student.input_shape),
        "num_classes": int(student.num_classes),
    }
    for key, value in want.items():
        if meta.get(key) != value:
            raise UserError(
                f"teacher checkpoint {path} has {key}={meta.get(key)!r}, but the student has "
                f"{key}={value!r}; a teacher must share the student's data and model size"
            )
    net = build(recorded_embedding(meta))
    ema = {k.removeprefix("net."): v for k, v in state["ema"].items() if k.startswith("net.")}
    net.load_state_dict(ema)
    return net.eval().requires_grad_(False)


def resolve(
    cfg: DictConfig,
    student: nn.Module,
    build: Callable[[dict], nn.Module],
    train_job: Callable[[DictConfig], object],
    world: ddp.World = ddp.SINGLE,
) -> Teacher | None:
    """The teacher named by ``cfg.method.teacher`` (None when there is none). Under DDP rank 0
    holds the lock and decides; when the teacher must be trained, every process trains it
    (``train_job`` runs on all ranks, so the teacher gets the same processes as the student).
    ``build(embedding)`` makes an untrained network of the student's size and data that embeds
    ``t`` and ``d`` as the teacher's checkpoint records."""
    spec = cfg.method.get("teacher")
    if not spec:
        return None
    if spec.get("checkpoint"):
        path = Path(spec.checkpoint).expanduser()
        if not path.is_file():
            raise UserError(f"teacher checkpoint {str(path)!r} does not exist")
        return Teacher(_load(path, student, build), "", 0.0, str(path))
    device = next(student.parameters()).device
    tcfg = teacher_config(cfg, accel.resolve_precision(device, "auto"))
    rd = run_dir(tcfg)
    locks = rd.parent / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{rd.name}.lock", "w") as lock:
        if world.main:  # one trainer per teacher; other jobs wait, then load
            fcntl.flock(lock, fcntl.LOCK_EX)
        state = read_state(rd)
        if ddp.any_true(world.main and state.get("status") != "finished", world):
            if world.main:
                print(
                    f"training the teacher {rd.name} first (no finished run with its identity)",
                    flush=True,
                )
            train_job(tcfg)
            ddp.barrier(world)  # rank 0 evaluates and marks it finished after the others stop
            state = read_state(rd)
        elif world.main:
            print(f"reusing the finished teacher {rd.name}", flush=True)
        net = _load(rd / CHECKPOINT, student, build)
    cost = float(state.get("budget", {}).get("budget/forward_equivalents", 0.0))
    return Teacher(net, state.get("mlflow_run_id", ""), cost, str(rd))
