"""``python -m bench.run``: one job = build -> train (resumable) -> evaluate at every budget -> log.

Hydra composes the config from ``sweeps/`` (groups ``data``, ``size``, ``method``, ``train``,
``eval``; named grids in ``experiment``); ``-m`` turns any comma list into a sweep, launched by
Hydra's basic launcher or by submitit. Every object is built from its YAML ``_target_``: there is
no method registry and the loop never branches on the method.

A job's identity (``bench.identity``) names its run directory and its MLflow run, so running the
same command again resumes training from the last checkpoint, continues the same MLflow run, and
re-evaluates only the budgets that are missing. Bad input is one sentence on stderr and exit 2.
SIGUSR1/SIGTERM end the current training step (or evaluation budget), save what a rerun needs,
mark the MLflow run KILLED and exit 3 (docs/FAILURES.md lists every failure and its handling).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from bench import accel
from bench import distributed as ddp
from bench.budget import steps_for_budget, training_budget
from bench.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, UserError
from bench.evaluate import METRICS_VERSION, Evaluator, interpolation_grid, save_grid, save_samples
from bench.identity import identity_config, identity_hash, run_dir, short_name
from bench.state import STATE, read_state, write_state
from bench.train import DivergenceError, Preempted, Preemption, Trainer, check_batch_split

log = logging.getLogger("bench.run")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "sweeps"


# -- input checks that must happen before Hydra composes anything ----------------------------------
def group_options(groups: set[str]) -> dict[str, list[str]]:
    """The options Hydra itself finds for each config group: ours in ``sweeps/`` and Hydra's
    (``hydra/launcher``, ``hydra/sweeper``, ... with those of installed plugins such as submitit
    and optuna); ``[]`` for a key that is not a group (``train.steps``)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        return {g: loader.get_group_options(g) for g in groups}


def check_choices(argv: list[str]) -> None:
    """An unknown group option (``method=foo``, ``hydra/launcher=foo``, also inside a sweep list)
    is one clear sentence naming the options Hydra would accept."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # Hydra's own grammar error is already one line
        raise UserError(f"cannot parse the command-line overrides: {str(e).splitlines()[0]}") from e
    parsed = [o for o in parsed if not o.is_delete()]
    options = group_options({o.key_or_group for o in parsed}) if parsed else {}
    for o in parsed:
        group, known = o.key_or_group, options[o.key_or_group]
        if not known:
            continue
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
        for v in values:
            if isinstance(v, str) and v not in known:
                raise UserError(f"unknown {group} {v!r}; choose one of: {', '.join(known)}")


# -- building blocks -------------------------------------------------------------------------------
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
    ``cfg.seed`` only."""
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
    net = make(
        cfg.size,
        input_shape=data.shape,
        num_classes=data.num_classes if conditional else 0,
        d_embedding=method.d_embedding,  # how the method embeds d and t (MeanFlow: linear, 1.0)
        t_scale=method.t_scale,
    )
    accel.prepare_model(net, cfg.train)  # train.grad_checkpoint, train.compile
    return data, net, method, conditional


def eval_key(cfg: DictConfig) -> str:
    """Which evaluation protocol produced stored metrics (re-evaluate when it changes)."""
    e = cfg.eval
    return f"v{METRICS_VERSION}-n{e.num_samples}-seed{e.seed}-{e.weights}"


def print_table(
    results: dict[int, dict[str, float]], protocol: dict[str, str], floor: dict
) -> None:
    points = "eval.extractor" not in protocol
    head = "energy    mmd^2" if points else "FD(train)  FD(test)     KID  prec  recall"
    lines = [f"{'steps':>5} {'NFE':>5}  {head}  samples/s"]
    for steps in sorted(results):
        m, k = results[steps], f"steps_{steps}"
        vals = (
            f"{m[f'energy/{k}']:8.4f} {m[f'mmd/{k}']:8.4f}"
            if points
            else f"{m[f'fd/train/{k}']:9.2f} {m[f'fd/test/{k}']:9.2f} {m[f'kid/{k}']:7.3f}"
            f" {m[f'precision/{k}']:5.2f} {m[f'recall/{k}']:7.2f}"
        )
        lines.append(
            f"{steps:>5} {int(m[f'nfe/{k}']):>5}  {vals}  {m[f'sample/img_per_s_{k}']:9.0f}"
        )
    detail = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in protocol.items())
    floor_txt = ", ".join(f"{k}={v:.3g}" for k, v in floor.items())
    what = (
        "real training points vs the reference" if points else "held-out images vs train statistics"
    )
    print(
        f"{chr(10).join(lines)}\nprotocol: {detail}\nreal-data floor ({what}): {floor_txt}",
        flush=True,
    )


def record_preemption(e: Preempted, tracker, state_path: Path, state: dict) -> None:
    """A preempted job is KILLED in MLflow -- neither FINISHED nor left looking RUNNING -- and
    ``preempted`` in state.json; the next start resumes it and sets the MLflow run RUNNING again."""
    tracker.set_tags({"preempted": f"{e.signal_name} at step {e.step}"})
    tracker.finish("KILLED")
    write_state(state_path, {**state, "status": "preempted", "preempted": str(e)})


def resolve_teacher(cfg: DictConfig, method, net, world: ddp.World = ddp.SINGLE, preemption=None):
    """Attach the teacher the method's config names (trained first when no finished run with its
    identity exists), or explain why a teacher is required or refused."""
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
    found = teachers.resolve(
        cfg,
        net,
        lambda: copy.deepcopy(net),
        functools.partial(job, preemption=preemption, world=world),
        world,
    )
    if found is not None:
        method.attach_teacher(found.net.to(next(net.parameters()).device))
    return found


def open_run(cfg, data, net, device, conditional, identity: str, rd: Path, state: dict, world):
    """Rank 0's work before training: the evaluator, the MLflow run, the run directory."""
    from bench.track import Tracker, flatten, redact, standard_tags

    # The evaluator is built before anything is trained or logged: a bad evaluation setting
    # (missing Inception weights, FID on latents) fails first, and costs nothing.
    cache = cfg.eval.get("cache_dir") or (
        Path(cfg.data.path) / ".fewstep-stats"
        if cfg.data.get("path")
        else "~/.cache/fewstep-bench/stats"
    )
    evaluator = Evaluator(
        data,
        cfg.eval.num_samples,
        cfg.eval.seed,
        cfg.eval.batch_size,
        device,
        conditional,
        fid=cfg.eval.get("fid", False),
        inception_dir=cfg.eval.get("inception_dir"),
        cache_dir=cache,
        features=cfg.eval.get("features", "auto"),
        decoder=make(cfg.eval.decoder).to(device).eval() if cfg.eval.get("decoder") else None,
    )
    if cfg.get("eval_only") and state.get("status") != "finished":
        raise UserError(
            f"eval_only=true but {rd} holds no finished run (status: {state.get('status', 'none')}); "
            "run the same command without eval_only first"
        )

    # The tracking store is reached before the run directory exists: a wrong URI leaves nothing.
    tracker = Tracker(
        cfg.tracking.uri, cfg.tracking.experiment, state.get("mlflow_run_id"), rd.name
    )
    rd.mkdir(parents=True, exist_ok=True)
    state.update(mlflow_run_id=tracker.run_id, status="running", identity=identity)
    state.pop("preempted", None)
    write_state(rd / STATE, state)
    # The resolved config, secrets redacted (it is logged as an artifact).
    OmegaConf.save(
        OmegaConf.create(redact(OmegaConf.to_container(cfg, resolve=True))), rd / "config.yaml"
    )
    tracker.log_params(flatten(identity_config(cfg, effective=False)))
    tracker.set_tags(
        {
            **standard_tags(cfg, identity, net.name, device),
            "run_dir": str(rd.resolve()),
            # Not part of the identity: W processes train what one does with grad_accum x W.
            "world_size": str(world.size),
            "compute_budget": str(cfg.get("compute_budget")),
        }
    )
    if not tracker.resumed:
        tracker.log_artifact(rd / "config.yaml")
    return evaluator, tracker


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
        f"({cfg.train.batch_size} x {method.cost()['forward_equivalents_per_sample']:g} per step"
        f"{f', teacher {spent:g}' if spent else ''}"
        f"{f', one-off {method.one_off_cost():g}' if method.one_off_cost() else ''})",
        flush=True,
    )


# -- the job ---------------------------------------------------------------------------------------
def job(
    cfg: DictConfig, preemption: Preemption | None = None, world: ddp.World = ddp.SINGLE
) -> float | None:
    """One job. ``preemption`` (installed by ``main``) carries stop signals to the training loop
    and the evaluation loop; without it a signal has its default effect. Under DDP (``world``,
    bench.distributed) every process trains; rank 0 alone logs, writes and evaluates."""
    apply_compute_budget(cfg)  # before the identity: the derived steps are part of it
    device = ddp.device_for(world, pick_device(cfg.device))
    use_deterministic(cfg.get("deterministic", "auto"), device)
    ddp.init(world, device)
    data, net, method, conditional = build(cfg)
    check_batch_split(cfg.train, world)  # before the MLflow run exists
    net = net.to(device)
    method = method.to(device)
    identity = identity_hash(cfg)
    rd = run_dir(cfg)
    state_path = rd / STATE
    state = read_state(state_path)
    meta = {
        "identity": identity,
        "model": net.name,
        "input_shape": list(data.shape),
        "num_classes": int(net.num_classes),
        "method": short_name(cfg.method._target_),
    }
    if not world.main:
        return train_on_rank(cfg, net, method, data, conditional, device, meta, preemption, world)

    try:
        evaluator, tracker = open_run(
            cfg, data, net, device, conditional, identity, rd, state, world
        )
    except BaseException:
        ddp.main_ready(world, failed=True)
        raise
    ddp.main_ready(world)
    teacher = resolve_teacher(cfg, method, net, world, preemption)
    if teacher is not None:
        tracker.set_tags({"teacher_run_id": teacher.run_id, "teacher_source": teacher.source})
    trainer = Trainer(
        net, method, data, cfg.train, rd, device, conditional, meta, tracker, preemption, world
    )
    if trainer.resume():
        print(f"resuming {rd} from step {trainer.step} of {cfg.train.steps}", flush=True)
    if trainer.step >= cfg.train.steps:
        print(
            f"{rd.name}: training already finished ({trainer.step} steps); not retraining",
            flush=True,
        )
    tick = time.perf_counter()
    try:
        trainer.fit()
    except DivergenceError as e:
        tracker.set_tags({"failure": str(e), "failure_step": str(e.step)})
        tracker.finish("FAILED")
        write_state(state_path, {**state, "status": "failed", "failure": str(e)})
        raise UserError(
            f"{e}; the run is marked FAILED and its last good checkpoint is kept in {rd}"
        ) from e
    except Preempted as e:
        state["train_wall_s"] = state.get("train_wall_s", 0.0) + (time.perf_counter() - tick)
        record_preemption(e, tracker, state_path, state)
        raise
    tracker.set_tags({"train.steps_done": str(trainer.step)})
    # Training budget (docs/methods.md): samples seen, network forward-equivalents
    # (a backward counts as two forwards; the method states its per-sample cost), wall time
    # summed over every invocation that trained.
    state["train_wall_s"] = state.get("train_wall_s", 0.0) + (time.perf_counter() - tick)
    write_state(state_path, state)
    budget = training_budget(method, trainer.step, cfg.train.batch_size)
    if teacher is not None:  # the teacher's own training is part of what this result cost
        budget["budget/teacher_forward_equivalents"] = teacher.forward_equivalents
        budget["budget/forward_equivalents"] += teacher.forward_equivalents
    state["budget"] = budget
    write_state(state_path, state)
    tracker.log_metrics({**budget, "budget/train_wall_s": state["train_wall_s"]})

    eval_net = trainer.ema.net if cfg.eval.weights == "ema" else trainer.net
    protocol = evaluator.protocol()
    tracker.set_tags({**protocol, "eval.weights": cfg.eval.weights})
    tracker.log_metrics(evaluator.floor)
    key = eval_key(cfg)
    done = state.get("evaluated", {}).get(key, {})
    results: dict[int, dict[str, float]] = {}
    missing = [s for s in cfg.eval.budgets if str(s) not in done]
    if len(missing) < len(cfg.eval.budgets):
        print(
            f"already evaluated at {sorted(set(cfg.eval.budgets) - set(missing))} steps; "
            f"evaluating {missing or 'nothing more'}",
            flush=True,
        )
    # Budgets are watched for stop signals between them (each finished one is saved).
    with preemption.watching() if preemption else contextlib.nullcontext():
        for steps in cfg.eval.budgets:
            if str(steps) in done:
                results[steps] = done[str(steps)]
                continue
            # Between budgets: each finished one is saved.
            if preemption is not None and preemption.requested:
                e = Preempted(
                    preemption.signal_name,
                    trainer.step,
                    f"evaluated budgets {sorted(map(int, done))} are saved",
                )
                record_preemption(e, tracker, state_path, state)
                raise e
            r = evaluator.evaluate(method, eval_net, steps)
            tracker.log_metrics(r.metrics)
            if cfg.eval.grids and (
                grid := save_grid(r.samples, rd / "grids" / f"steps_{steps}.png", data.kind)
            ):
                tracker.log_artifact(grid, "grids")
            if cfg.eval.save_samples:
                save_samples(r.samples, evaluator.y, rd / "samples" / f"steps_{steps}.npz")
            results[steps] = r.metrics
            done[str(steps)] = r.metrics
            state.setdefault("evaluated", {})[key] = done
            write_state(state_path, state)  # a crash mid-evaluation keeps the budgets already done

    if cfg.eval.interpolation:
        grid = interpolation_grid(
            method,
            eval_net,
            data,
            rd / "grids" / "interpolation.png",
            seed=cfg.eval.seed,
            device=device,
        )
        if grid is not None:
            tracker.log_artifact(grid, "grids")
    print_table(results, protocol, evaluator.floor)
    state["status"] = "finished"
    write_state(state_path, state)
    tracker.finish("FINISHED")
    return objective_value(cfg, results)


def train_on_rank(cfg, net, method, data, conditional, device, meta, preemption, world) -> None:
    """A process of rank > 0: the same training steps as rank 0 (its share of every batch), no
    tracking, no files, no evaluation. It reads the checkpoint rank 0 wrote to resume."""
    ddp.main_ready(world)  # rank 0 has opened the run (or failed to)
    resolve_teacher(cfg, method, net, world, preemption)
    trainer = Trainer(
        net,
        method,
        data,
        cfg.train,
        run_dir(cfg),
        device,
        conditional,
        meta,
        None,
        preemption,
        world,
    )
    trainer.resume()
    try:
        trainer.fit()
    except DivergenceError as e:  # rank 0 reports it and marks the run FAILED
        raise UserError(str(e)) from e
    return None


# -- the value a job returns to a Hydra sweeper (Optuna) --------------------------------------------
# ``objective.metric`` names an MLflow metric family and ``objective.steps`` the step budget it is
# read at: ``metric=fd/train steps=1`` -> the job returns ``fd/train/steps_1`` (a ``{k}`` in the
# metric is replaced by ``steps_N`` instead). ``metric: null`` (the default): the job returns None.
# sweeps/config.yaml declares the keys; sweeps/experiment/optuna_lr.yaml is a search that uses them.
def objective_name(cfg: DictConfig) -> str | None:
    spec = cfg.get("objective")
    if not spec or not spec.get("metric"):
        return None
    metric, k = str(spec.metric), f"steps_{int(spec.steps)}"
    return metric.replace("{k}", k) if "{k}" in metric else f"{metric}/{k}"


def sweeper_choice() -> str | None:
    """The ``hydra/sweeper`` option of the running job (None outside a Hydra run)."""
    from hydra.core.hydra_config import HydraConfig

    return (
        HydraConfig.get().runtime.choices.get("hydra/sweeper")
        if HydraConfig.initialized()
        else None
    )


def check_objective(cfg: DictConfig, sweeper: str | None) -> None:
    """Before anything trains: an optimising sweeper has a value to optimise, and the objective's
    step budget is one the job evaluates."""
    name = objective_name(cfg)
    if name is None:
        if sweeper and sweeper.startswith("optuna"):
            raise UserError(
                f"hydra/sweeper={sweeper} needs a value to minimise: set objective.metric and "
                "objective.steps (e.g. objective.metric=fd/train objective.steps=1), or use "
                "+experiment=optuna_lr"
            )
        return
    if int(cfg.objective.steps) not in [int(s) for s in cfg.eval.budgets]:
        raise UserError(
            f"objective.steps={cfg.objective.steps} is not among eval.budgets="
            f"{list(cfg.eval.budgets)}; add it to eval.budgets"
        )


def objective_value(cfg: DictConfig, results: dict[int, dict[str, float]]) -> float | None:
    """The objective of a finished job, read from the metrics it evaluated (None without one)."""
    name = objective_name(cfg)
    if name is None:
        return None
    metrics = results.get(int(cfg.objective.steps), {})
    if name not in metrics:
        raise UserError(
            f"objective metric {name!r} was not measured by this job; it measured: "
            f"{', '.join(sorted(metrics)) or 'nothing at that budget'}"
        )
    return float(metrics[name])


@hydra.main(config_path="../sweeps", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    preemption = Preemption()
    try:
        check_objective(cfg, sweeper_choice())
        with preemption:  # this process's main thread; restored after the job
            return job(cfg, preemption, ddp.detect())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    except Preempted as e:
        print(str(e), file=sys.stderr, flush=True)
        # Inside a submitit job its own handler (requeue, then exit) gets the signal now that
        # the checkpoint is saved; anywhere else this is a no-op and we exit 3.
        preemption.forward()
        sys.exit(EXIT_PREEMPTED)
    finally:
        ddp.shutdown()


def cli() -> None:
    try:
        check_choices(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    main()


if __name__ == "__main__":
    cli()
