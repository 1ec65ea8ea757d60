"""The record of one run: its ``state.json`` and its MLflow run, kept in step.

A run directory (named by the run identity, ``bench.identity``) holds ``state.json``: the MLflow
run id, the status (``running``, ``finished``, ``failed``, ``preempted``), the training budget and
the evaluated metrics of every budget under each evaluation protocol. The MLflow run holds the same
facts for people and reports. ``RunRecord`` is the one owner of both: each status transition is
one method that writes both places, and ``with record:`` around a job's body turns any error after
the MLflow run was opened into an ended run with its reason -- FAILED (tag ``failure``), or KILLED
for a stop signal (tag ``preempted``) or an interrupt -- never one left RUNNING. Only a kill that
runs no Python (SIGKILL, an OOM kill, a node crash) leaves a run RUNNING; the rerun resumes it.

``state.json`` is written atomically (temporary file + ``os.replace``). A file cut short by a
crash reads as empty: the checkpoint and MLflow are the truth, and the next start rebuilds the rest.

Provenance: every start tags the git commit of the code (``git_commit``) and whether its tracked
files differ from that commit (``git_dirty``); a dirty tree's ``git diff HEAD`` is logged as an
artifact (``provenance/<commit>-<hash of the diff>.diff``, named by the tag ``git_diff``), so a
number can be traced to the exact code that produced it. Untracked files are not in the diff.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bench import distributed as ddp
from bench.checkpoint import write_error
from bench.errors import UserError
from bench.identity import identity_config, identity_hash
from bench.preemption import Preempted
from bench.train import CHECKPOINT, DivergenceError

log = logging.getLogger(__name__)
STATE = "state.json"
CODE_ROOT = Path(__file__).resolve().parents[1]
MAX_REASON = 1000  # characters of an error kept in the ``failure`` tag


def load_state(run_dir: Path) -> tuple[dict, str | None]:
    """A run directory's ``state.json`` and what is wrong with it: ``({}, None)`` when there is
    none; ``({}, reason)`` when it is cut short, not JSON, not an object, or names its MLflow run
    with something other than a string (garbage is never half-trusted)."""
    path = Path(run_dir) / STATE
    if not path.exists():
        return {}, None
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return {}, f"unreadable ({type(e).__name__})"
    if not isinstance(state, dict):
        return {}, f"a JSON {type(state).__name__}, not an object"
    if not isinstance(state.get("mlflow_run_id", ""), str) or not isinstance(
        state.get("status", ""), str
    ):
        return {}, "holding a run id or status that is not a string"
    return state, None


def read_state(run_dir: Path) -> dict:
    """A run directory's ``state.json`` (empty when missing or damaged: ``load_state``)."""
    return load_state(run_dir)[0]


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
    ).stdout


def provenance(root: Path = CODE_ROOT) -> tuple[str, str]:
    """The code's git commit (12 hex digits, ``unknown`` outside a checkout) and ``git diff
    HEAD`` of its tracked files (empty when clean). Only ``root``'s own repository counts: a
    package installed inside another repository's tree is ``unknown``."""
    try:
        if Path(_git(root, "rev-parse", "--show-toplevel").strip()).resolve() != root.resolve():
            return "unknown", ""
        return _git(root, "rev-parse", "--short=12", "HEAD").strip(), _git(root, "diff", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return "unknown", ""


class RunRecord:
    """``state.json`` and the MLflow run of one run directory."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.state, self.damage = load_state(self.dir)
        self.tracker = None  # bench.track.Tracker, once ``open`` has reached the store
        self.ended = False  # a status transition ended the MLflow run
        self.was_finished = False  # FINISHED when this start opened it: an error keeps it so

    @property
    def status(self) -> str:
        return self.state.get("status", "none")

    def save(self) -> None:
        path = self.dir / STATE
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.state, indent=1, sort_keys=True))
        except OSError as e:  # a full disk: the last whole state.json stays
            tmp.unlink(missing_ok=True)
            raise UserError(
                f"cannot write {path} ({write_error(e, self.dir)}); the previous one is kept: "
                "free space, then run the same command again"
            ) from e
        os.replace(tmp, path)

    # -- opening ------------------------------------------------------------------------------
    def open(self, cfg: DictConfig, net_name: str, device, world: ddp.World = ddp.SINGLE) -> None:
        """Start or resume the MLflow run and mark the run ``running`` in both places. The store
        is reached before the run directory exists: a wrong URI leaves nothing behind."""
        from bench.track import Tracker, flatten, redact, standard_tags

        if cfg.get("eval_only") and self.status != "finished":
            raise UserError(
                f"eval_only=true but {self.dir} holds no finished run (status: {self.status}); "
                "run the same command without eval_only first"
            )
        identity = identity_hash(cfg)
        uri, experiment = cfg.tracking.uri, cfg.tracking.experiment
        run_id = self.state.get("mlflow_run_id")
        # No run id, but this directory has a past (a damaged state.json, or a checkpoint whose
        # state.json was lost): find its MLflow run by the identity in its tags instead of
        # silently opening a second run for one identity.
        recover = None
        if run_id is None and (self.damage or (self.dir / CHECKPOINT).exists()):
            recover = {"config_hash": identity, "run_dir": str(self.dir.resolve())}
        self.tracker = Tracker(uri, experiment, run_id, self.dir.name, recover, identity)
        if recover is not None:
            what = f"{STATE} is {self.damage}" if self.damage else f"{STATE} is missing"
            found = (
                f"continuing MLflow run {self.tracker.run_id} ({self.tracker.recovered}), found "
                f"by config_hash={identity}; its evaluations are measured again"
                if self.tracker.recovered
                else f"no MLflow run with config_hash={identity} for it in the store: a new one"
            )
            print(f"{self.dir.name}: {what}; {found}", flush=True)
        self.was_finished = (
            self.status == "finished" or self.tracker.recovered == "FINISHED"
        ) and self.tracker.resumed
        self.ended = False
        with self:  # from here on a failure ends the MLflow run with its reason
            self.dir.mkdir(parents=True, exist_ok=True)
            self.state.update(
                mlflow_run_id=self.tracker.run_id, status="running", identity=identity
            )
            for ended in ("preempted", "failure", "last_error"):  # how the last start ended
                self.state.pop(ended, None)
            self.save()
            # The resolved config, secrets redacted (it is logged as an artifact).
            config = OmegaConf.create(redact(OmegaConf.to_container(cfg, resolve=True)))
            OmegaConf.save(config, self.dir / "config.yaml")
            # recipe: shared | official (sweeps/recipe/); its settings are in the params already
            recipe = str(cfg.get("recipe") or "shared")
            params = flatten(identity_config(cfg, effective=False))
            self.tracker.log_params({**params, "recipe": recipe})
            self.tags(
                {
                    **standard_tags(cfg, identity, net_name, device),
                    "run_dir": str(self.dir.resolve()),
                    # Not part of the identity: W processes train what one does with grad_accum x W.
                    "world_size": str(world.size),
                    "compute_budget": str(cfg.get("compute_budget")),
                    "recipe": recipe,
                }
            )
            if not self.tracker.resumed:
                self.artifact(self.dir / "config.yaml")
            self.record_provenance()

    def record_provenance(self, root: Path = CODE_ROOT) -> None:
        """Tag the commit of the code this start runs and whether its tracked files differ from
        it; a dirty tree's diff becomes an artifact (``git_diff`` names it, ``none`` when clean)."""
        commit, diff = provenance(root)
        dirty = "unknown" if commit == "unknown" else str(bool(diff)).lower()
        tags = {"git_commit": commit, "git_dirty": dirty, "git_diff": "none"}
        if diff:
            name = f"{commit}-{hashlib.sha256(diff.encode()).hexdigest()[:12]}.diff"
            path = self.dir / "provenance" / name
            path.parent.mkdir(exist_ok=True)
            path.write_text(diff)
            self.artifact(path, "provenance")
            tags["git_diff"] = f"provenance/{name}"
        self.tags(tags)

    # -- the MLflow run -----------------------------------------------------------------------
    def tags(self, tags: dict[str, str]) -> None:
        self.tracker.set_tags(tags)

    def metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self.tracker.log_metrics(metrics, step=step)

    def artifact(self, path: Path, folder: str | None = None) -> None:
        self.tracker.log_artifact(path, folder)

    # -- status transitions: each writes state.json, then MLflow --------------------------------
    def finished(self) -> None:
        self._end("finished", "FINISHED", {})

    def failed(self, reason: str, **tags: str) -> None:
        self._end("failed", "FAILED", {"failure": reason[:MAX_REASON], **tags}, failure=reason)

    def preempted(self, e: Preempted) -> None:
        """KILLED in MLflow -- neither FINISHED nor left looking RUNNING -- and ``preempted`` in
        state.json; the next start resumes the run and sets it RUNNING again."""
        tags = {"preempted": f"{e.signal_name} {e.when}"}
        self._end("preempted", "KILLED", tags, preempted=str(e))

    def interrupted(self, e: BaseException) -> None:
        """Stopped from outside without a checkpoint of its own (Ctrl-C): KILLED, ``failed``."""
        reason = f"interrupted ({type(e).__name__})"
        self._end("failed", "KILLED", {"failure": reason}, failure=reason)

    def _end(self, status: str, mlflow_status: str, tags: dict[str, str], **fields) -> None:
        self.ended = True
        if self.was_finished and status != "finished":
            # A finished run that was only re-evaluated (or re-checked) keeps its status: its
            # training and stored numbers are whole; the error is kept as ``last_error``.
            reason = tags.get("failure") or tags.get("preempted") or status
            status, mlflow_status = "finished", "FINISHED"
            tags, fields = {"last_error": reason[:MAX_REASON]}, {"last_error": reason}
        self.state.update(status=status, **fields)
        try:
            self.save()
        finally:  # MLflow is told even when the run directory cannot be written
            if tags:
                self.tags(tags)
            self.tracker.finish(mlflow_status)

    def __enter__(self) -> RunRecord:
        return self

    def __exit__(self, kind, e, tb) -> bool:
        """An error inside ``with record:`` ends a run that is still ``running`` with its
        reason; the error itself goes on (this never swallows it)."""
        if e is None or self.tracker is None or self.ended:
            return False
        try:
            if isinstance(e, Preempted):
                self.preempted(e)
            elif not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit
                self.interrupted(e)
            else:
                self.failed(str(e) if isinstance(e, UserError) else f"{kind.__name__}: {e}")
        except Exception as again:  # the store went away too: keep the first error
            log.warning("could not mark the run ended (%s) after: %s", again, e)
        return False

    # -- training -----------------------------------------------------------------------------
    @contextmanager
    def training(self) -> Iterator[None]:
        """Around ``Trainer.fit``: adds its wall time to ``train_wall_s`` (summed over every
        start that trained); a divergence marks the run FAILED with its step and becomes one
        sentence."""
        tick = time.perf_counter()
        try:
            yield
        except DivergenceError as e:
            self.failed(str(e), failure_step=str(e.step))
            raise UserError(
                f"{e}; the run is marked FAILED and its last good checkpoint is kept in {self.dir}"
            ) from e
        finally:
            self._add_wall("train_wall_s", tick)

    def _add_wall(self, key: str, tick: float) -> None:
        """Adds the time since ``tick`` to ``state[key]`` (summed over every start) and saves."""
        self.state[key] = self.state.get(key, 0.0) + (time.perf_counter() - tick)
        self.save()

    def store_budget(self, budget: dict[str, float], steps_done: int) -> None:
        """The training budget (bench.budget: samples seen, forward-equivalents, a teacher's
        included) and the wall time, in state.json and as MLflow metrics."""
        self.tags({"train.steps_done": str(steps_done)})
        self.state["budget"] = budget
        self.save()
        self.metrics({**budget, "budget/train_wall_s": self.state["train_wall_s"]})

    # -- evaluation ---------------------------------------------------------------------------
    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Around the evaluation phase: adds its wall time to ``eval_wall_s`` (summed over every
        start that evaluated), in state.json and, when the phase ends well, as an MLflow metric."""
        tick = time.perf_counter()
        try:
            yield
        finally:
            self._add_wall("eval_wall_s", tick)
        self.metrics({"budget/eval_wall_s": self.state["eval_wall_s"]})

    def evaluated(self, key: str) -> dict[str, dict[str, float]]:
        """The metrics stored under the evaluation protocol ``key``, by budget (``"1"``, ...)."""
        return dict(self.state.get("evaluated", {}).get(key, {}))

    def store_evaluation(
        self, key: str, settings: dict[str, str], steps: int, metrics: dict[str, float]
    ) -> None:
        """One evaluated budget, saved at once: a crash mid-evaluation keeps those done."""
        self.state.setdefault("evaluated", {}).setdefault(key, {})[str(steps)] = metrics
        self.state.setdefault("protocols", {})[key] = settings
        self.state.setdefault("latest", {})[str(steps)] = key  # what the tracking run shows
        self.save()
