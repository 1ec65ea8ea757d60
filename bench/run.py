"""``python -m bench.run``: one job = build -> train (resumable) -> evaluate every budget -> record.

Hydra composes the config from ``sweeps/`` (groups ``data``, ``size``, ``method``, ``train``,
``eval``; named grids in ``experiment``); ``-m`` turns any comma list into a sweep, launched by
Hydra's basic launcher or by submitit. Every object is built from its YAML ``_target_``
(``bench.build``): there is no method registry and the loop never branches on the method.

A job is three phases, each owned by one module: training (``bench.train.Trainer``), evaluation
(``bench.evaluate.Evaluator``) and the record of both (``bench.record.RunRecord``: state.json and
the MLflow run). A job's identity (``bench.identity``) names its run directory and its MLflow run,
so running the same command again resumes training from the last checkpoint, continues the same
MLflow run, and evaluates only the budgets missing under the current evaluation protocol. Bad
input is one sentence on stderr and exit 2. SIGUSR1/SIGTERM/SIGINT end the current training step
(or evaluation budget, or the set-up), save what a rerun needs, mark the MLflow run KILLED and
exit 3; any other error after the MLflow run is opened marks it FAILED with the reason
(docs/FAILURES.md).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from bench import checkpoint, plan, schema, shard
from bench import distributed as ddp
from bench.budget import training_budget
from bench.build import (
    CONFIG_DIR,
    Parts,
    apply_compute_budget,
    build,  # noqa: F401 -- tests and methods' docs name bench.run.build
    embedding_of,
    make_evaluator,
    prepare,
    resolve_teacher,
)
from bench.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_USER_ERROR, UserError
from bench.identity import identity_hash, pin_data, run_dir, short_name
from bench.lock import RunLock
from bench.objective import check_objective, objective_value, sweeper_choice
from bench.preemption import Preempted, Preemption
from bench.record import RunRecord
from bench.train import CHECKPOINT, DivergenceError, Trainer


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


def hide_secrets(argv: list[str]) -> list[str]:
    """``argv`` with every command-line secret (a secret-named key, or a URI with userinfo such
    as ``tracking.uri=http://user:pw@host``) moved into this process's environment and replaced
    by an ``${oc.env:...}`` interpolation. Hydra writes the command line and the composed config
    to its own output folder (``.hydra/overrides.yaml``, ``config.yaml``, ``hydra.yaml``,
    ``multirun.yaml``) before any job code runs: this way it writes the interpolation, never the
    secret, while the job -- and subprocesses it launches, which inherit the environment --
    resolves the real value. Our own records redact it as well (``bench.track.redact``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from bench.track import has_secret

    parser, out = OverridesParser.create(), []
    for i, arg in enumerate(argv):
        if "=" not in arg or arg.startswith("-"):
            out.append(arg)
            continue
        try:
            (o,) = parser.parse_overrides([arg])
        except Exception:  # check_choices reports it in one sentence
            out.append(arg)
            continue
        head = arg.split("=", 1)[0]
        if o.is_sweep_override():
            out.append(hide_in_sweep(o, arg, i) if o.is_choice_sweep() else arg)
            continue
        value = None if o.is_delete() else o.value()
        if not isinstance(value, str | int | float) or not has_secret(o.key_or_group, value):
            out.append(arg)
            continue
        name = f"FEWSTEP_SECRET_{i}"
        os.environ[name] = str(value)
        out.append(f"{head}=${{oc.env:{name}}}")
    return out


def hide_in_sweep(o, arg: str, i: int) -> str:
    """A sweep list (``key=a,b``) with each secret element moved into the environment as in
    ``hide_secrets`` (``FEWSTEP_SECRET_<arg>_<element>``); the other elements are written back
    as Hydra spells them, so the sweeper expands the same list."""
    from bench.track import has_secret

    values = o.value().list  # the elements as parsed; their override spelling below
    spelled = list(o.sweep_string_iterator())
    if not any(isinstance(v, str) and has_secret(o.key_or_group, v) for v in values):
        return arg
    parts = []
    for j, (v, text) in enumerate(zip(values, spelled, strict=True)):
        if isinstance(v, str) and has_secret(o.key_or_group, v):
            name = f"FEWSTEP_SECRET_{i}_{j}"
            os.environ[name] = v
            parts.append(f"${{oc.env:{name}}}")
        else:
            parts.append(text)
    return f"{arg.split('=', 1)[0]}={','.join(parts)}"


# -- the job ---------------------------------------------------------------------------------------
def job(
    cfg: DictConfig, preemption: Preemption | None = None, world: ddp.World = ddp.SINGLE
) -> float | None:
    """One job. ``preemption`` (installed by ``main``) carries stop signals to the training loop
    and the evaluation loop; without it a signal has its default effect. Under DDP (``world``,
    bench.distributed) every process trains and samples its share of the evaluation
    (bench.shard); rank 0 alone computes the metrics and records."""
    schema.check(cfg)  # every train/eval/data key, before anything exists (bench/schema.py)
    pin_data(cfg)  # the data's content is part of the identity (bench/identity.py)
    apply_compute_budget(cfg)  # before the identity: the derived steps are part of it
    parts = prepare(cfg, world)
    estimate = plan.guard(cfg, parts.device, parts.data)  # a CPU job over an hour stops here
    if not world.main:
        ddp.main_ready(world)  # rank 0 has opened the run (or failed to)
        trainer = train(cfg, parts, None, preemption, world)
        # Evaluation: this rank samples its share of each budget rank 0 announces (bench.shard).
        evaluator = make_evaluator(cfg, parts.data, parts.device, parts.conditional, world)
        net = trainer.nets.ema if evaluator.weights == "ema" else trainer.nets.online
        net.eval()
        shard.follow(lambda steps: evaluator.sample(parts.method, net, steps), world)
        return None

    record = RunRecord(run_dir(cfg))
    with contextlib.ExitStack() as held:
        # From the lock on, a stop signal (SIGTERM, SIGINT, ...) is only recorded, and acted on at
        # the next boundary (the start of training, a step, a budget): the run ends KILLED with
        # one sentence, never killed mid-set-up and left RUNNING.
        if preemption is not None:
            held.enter_context(preemption.watching())
        try:
            evaluator = make_evaluator(cfg, parts.data, parts.device, parts.conditional, world)
            held.enter_context(RunLock(record.dir))  # one job per run directory at a time
            # A damaged checkpoint is refused before the MLflow run is touched: a FINISHED run
            # stays FINISHED (the checkpoint is read once, here, and handed to the trainer).
            saved = load_checkpoint(record.dir / CHECKPOINT, checkpoint_meta(cfg, parts))
            if preemption is not None:  # a signal so far: stop before a run is even opened
                preemption.check(None, "no run was opened")
            record.open(cfg, parts.net.name, parts.device, world)
            record.tags(plan.tags(estimate))
        except BaseException:
            ddp.main_ready(world, failed=True)
            raise
        with record:  # from here on any error ends the MLflow run FAILED (KILLED) with its reason
            ddp.main_ready(world)  # the other ranks may start
            trainer = train(cfg, parts, record, preemption, world, saved)
            results = evaluator.run(parts.method, trainer.nets, record, preemption, trainer.step)
            record.finished()
    return objective_value(cfg, results)


def checkpoint_meta(cfg: DictConfig, parts: Parts) -> dict:
    """What a checkpoint of this job records, and what a checkpoint it resumes must match."""
    return {
        "identity": identity_hash(cfg),
        "model": parts.net.name,
        "input_shape": list(parts.data.shape),
        "num_classes": int(parts.net.num_classes),
        "method": short_name(cfg.method._target_),
        "embedding": embedding_of(parts.net),  # how a teacher built from it must embed t, d
    }


def load_checkpoint(path: Path, meta: dict) -> dict | None:
    """The run's last checkpoint, checked against ``meta`` (None when there is none yet)."""
    checkpoint.remove_stale_temporaries(path)
    return checkpoint.load(path, meta) if path.exists() else None


def train(
    cfg: DictConfig,
    parts: Parts,
    record: RunRecord | None,
    preemption: Preemption | None,
    world: ddp.World,
    saved: dict | None = None,
) -> Trainer:
    """The training phase, on every process: the teacher (trained first when it must be), then
    training from the last checkpoint to ``train.steps``. Rank 0, which holds the ``record``,
    reports it and records the budget; other ranks train their share of every batch, with no
    tracking and no files (they read the checkpoint rank 0 wrote to resume)."""
    teacher_job = functools.partial(job, preemption=preemption, world=world)
    teacher = resolve_teacher(cfg, parts.method, parts.net, teacher_job, world)
    meta = checkpoint_meta(cfg, parts)
    trainer = Trainer(
        parts.net,
        parts.method,
        parts.data,
        cfg.train,
        run_dir(cfg),
        parts.device,
        parts.conditional,
        meta,
        record.tracker if record is not None else None,
        preemption,
        world,
    )
    if cfg.eval.get("every"):  # evaluation during training: curves (bench.curves)
        from bench.curves import Curves

        tracker = record.tracker if record is not None else None
        trainer.hooks.append(Curves(cfg, parts, run_dir(cfg), tracker, world))
    resumed = trainer.resume(saved)
    if record is None:
        try:
            trainer.fit()
        except DivergenceError as e:  # rank 0 reports it and marks the run FAILED
            raise UserError(str(e)) from e
        return trainer

    if teacher is not None:
        record.tags({"teacher_run_id": teacher.run_id, "teacher_source": teacher.source})
    if resumed:
        print(f"resuming {record.dir} from step {trainer.step} of {cfg.train.steps}", flush=True)
    if trainer.step >= cfg.train.steps:
        print(
            f"{record.dir.name}: training already finished ({trainer.step} steps); not retraining",
            flush=True,
        )
    with record.training():
        trainer.fit()
    # Training budget (docs/methods.md): samples seen, network forward-equivalents (a backward
    # counts as two forwards; the method states its per-sample cost), wall time over every start
    # that trained.
    budget = training_budget(parts.method, trainer.step, cfg.train.batch_size)
    if teacher is not None:  # the teacher's own training is part of what this result cost
        budget["budget/teacher_forward_equivalents"] = teacher.forward_equivalents
        budget["budget/forward_equivalents"] += teacher.forward_equivalents
    record.store_budget(budget, trainer.step)
    return trainer


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
    except KeyboardInterrupt:  # Ctrl-C twice: stopped at once, without a checkpoint of its own
        print(
            "interrupted (Ctrl-C twice); the run is marked KILLED; run the same command again "
            "to resume from its last checkpoint",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(EXIT_INTERRUPTED)
    finally:
        ddp.shutdown()


def cli() -> None:
    try:
        check_choices(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    sys.argv[1:] = hide_secrets(sys.argv[1:])  # before Hydra writes its own copy of them
    sys.argv = plan.argv(sys.argv)  # plan=true: the same sweep, planned, not launched
    main()


if __name__ == "__main__":
    cli()
