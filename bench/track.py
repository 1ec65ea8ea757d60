"""MLflow tracking (schema in README.md, "Where results go"): one MLflow run per job, found
again by its run id; ``bench.record`` decides what is logged and when.

Params are the run's identity config (flattened); evaluation settings and the metric protocol are
tags, because they may change when a finished run is re-evaluated and MLflow params are immutable.
Uses ``MlflowClient`` with explicit run ids (no global active-run state), so a resumed job keeps
logging into the run it started. The default store needs no server; any ``MLFLOW_TRACKING_URI``
(sqlite, a ``mlflow server``) works unchanged.

The first contact with the store (``first_contact``) is where the failure modes live: a fresh
sqlite file is created and migrated under an exclusive file lock (parallel jobs that first touch
it otherwise race on the migrations, docs/install.md), and a store that cannot be reached is one
sentence within seconds instead of minutes of HTTP retries. Config keys that name a secret
(password, secret, token, key, ...) are logged as ``***``.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.errors import UserError

MAX_PARAM_LEN = 500  # MLflow's limit on a param value
SECRET_WORDS = frozenset({"password", "passwd", "secret", "secrets", "credential", "credentials"})
SECRET_LAST_WORDS = frozenset({"key", "apikey", "token"})  # api_key, hf_token; not key_dim
REDACTED = "***"
# The first request to a server: 2 quick retries and a 10 s timeout instead of MLflow's defaults
# (7 retries with exponential back-off, 120 s timeout: minutes before a typo is reported).
FIRST_CONTACT_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def is_secret(key: str) -> bool:
    """Whether a config key names a secret, by whole words in snake or camel case: ``api_key``,
    ``hf_token``, ``dbPassword``, ``client_secret_file`` are; ``monkey``, ``num_tokens``,
    ``key_dim``, ``k_ratio`` are not ("key" and "token" count only as the last word)."""
    words = re.split(r"[^0-9a-z]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key).lower())
    return not SECRET_WORDS.isdisjoint(words) or words[-1] in SECRET_LAST_WORDS


#: ``scheme://user:password@host`` (or ``scheme://token@host``): the userinfo of a URI.
USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]+@")


def redact_value(v):
    """A value with the userinfo of every URI in it replaced: ``http://***@host`` (strings inside
    lists too); other values unchanged."""
    if isinstance(v, str):
        return USERINFO.sub(rf"\1{REDACTED}@", v)
    if isinstance(v, list | tuple):
        return type(v)(redact_value(i) for i in v)
    return v


def has_secret(key: str, value) -> bool:
    """Whether ``key=value`` carries a secret: a secret-named key or a URI with userinfo."""
    return is_secret(key.rsplit(".", 1)[-1]) or redact_value(value) != value


def redact(d: dict) -> dict:
    """``d`` with the value of every secret-named key (a whole sub-tree too) replaced by ``***``
    and the userinfo of every URI (``http://user:pw@host``, in ``tracking.uri`` or anywhere)
    replaced by ``***``."""
    return {
        k: REDACTED
        if is_secret(str(k))
        else (redact(v) if isinstance(v, dict) else redact_value(v))
        for k, v in d.items()
    }


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"a.b": "value"}`` MLflow params, secrets redacted."""
    out: dict[str, str] = {}
    for k, v in redact(d).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:MAX_PARAM_LEN]
    return out


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for servers and in-memory databases)."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    db = make_url(uri).database
    return Path(db) if db and db != ":memory:" else None


@contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def first_contact(uri: str) -> Iterator[None]:
    """Wrap the first requests to the store at ``uri``: fast-failing for servers, under an
    exclusive lock (``<db>.lock``) for sqlite so only one process at a time creates or migrates
    the file, and any failure becomes one sentence naming the URI."""
    db = sqlite_path(uri)
    if db is not None and not db.resolve().parent.is_dir():
        raise UserError(
            f"MLflow tracking URI {redact_value(uri)} cannot be reached: the folder {db.resolve().parent} does "
            "not exist; create it or fix tracking.uri / MLFLOW_TRACKING_URI"
        )
    try:
        with (
            _env(FIRST_CONTACT_ENV),
            open(db.with_name(db.name + ".lock") if db is not None else os.devnull, "a") as lock,
        ):
            if db is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            yield
    except UserError:
        raise
    except Exception as e:
        text = str(e).strip() or type(e).__name__
        # The OS's words when there are some ("[Errno 111] Connection refused"), not urllib3's.
        errno = re.search(r"\[Errno -?\d+\] [^\"')]+", text)
        reason = errno.group(0) if errno else text.splitlines()[0][:200]
        raise UserError(
            f"MLflow tracking URI {redact_value(uri)} cannot be reached or used "
            f"({redact_value(reason)}); start the server "
            "or fix tracking.uri / MLFLOW_TRACKING_URI"
        ) from e


class Tracker:
    def __init__(
        self,
        uri: str | None,
        experiment: str,
        run_id: str | None = None,
        run_name: str | None = None,
        recover: dict[str, str] | None = None,
        identity: str | None = None,
    ):
        """Resume ``run_id``, or -- with ``recover`` (tags that identify the run: its
        ``config_hash`` and ``run_dir``) -- the latest run of the experiment carrying them
        (``recovered`` is then its status before this start), or create a new run."""
        import mlflow
        from mlflow.tracking import MlflowClient

        if uri:
            mlflow.set_tracking_uri(uri)
        self.uri = mlflow.get_tracking_uri()
        self.resumed = False
        self.recovered: str | None = None
        with first_contact(self.uri):
            self.client = MlflowClient()
            exp_id = self._experiment_id(experiment)
            if run_id is None and recover:
                found = self._find(exp_id, recover)
                if found is not None:
                    run_id, self.recovered = found.info.run_id, found.info.status
            if run_id is not None and self._exists(run_id, identity):
                self.client.update_run(run_id, status="RUNNING")
                self.run_id, self.resumed = run_id, True
                return
            self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id

    def _find(self, exp_id: str, tags: dict[str, str]):
        """The latest run of the experiment whose tags hold ``tags`` (None if there is none).
        Searched by ``config_hash`` (hex: safe inside the filter's quotes), the rest compared here."""
        runs = self.client.search_runs(
            [exp_id],
            filter_string=f"tags.config_hash = '{tags['config_hash']}'",
            order_by=["attributes.start_time DESC"],
            max_results=1000,
        )
        for run in runs:
            if all(run.data.tags.get(k) == v for k, v in tags.items()):
                return run
        return None

    def _exists(self, run_id: str, identity: str | None = None) -> bool:
        """Whether the store still holds ``run_id`` (it was wiped or moved if not). Any other
        error propagates: a flaky server must not make a resumed job start a duplicate run. A run
        tagged with another ``config_hash`` than ``identity`` (a copied or forged state.json) is
        refused: its numbers are another run's."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException as e:
            if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return False
            raise
        theirs = run.data.tags.get("config_hash")
        if identity is not None and theirs is not None and theirs != identity:
            raise UserError(
                f"MLflow run {run_id} named by this run directory's state.json belongs to "
                f"config_hash={theirs}, not to this run's {identity}; delete that state.json "
                "(the run is then found in the store by its identity)"
            )
        return True

    def _experiment_id(self, name: str) -> str:
        # Two jobs of one sweep may create the experiment at the same moment: retry the lookup.
        for attempt in range(5):
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                return exp.experiment_id
            try:
                return self.client.create_experiment(name)
            except Exception:
                time.sleep(0.2 * (attempt + 1))
        raise UserError(
            f"cannot create or find MLflow experiment {name!r} at {redact_value(self.uri)}"
        )

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=new[i : i + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def log_training(self, metrics: dict[str, float], step: int) -> str | None:
        """Training-curve points, kept and retried when the store fails: a server restart or a
        locked sqlite file during a week-long run must not kill the training. Each call first
        sends what earlier failed calls kept (in order, with their original times), with the
        quick first-contact retries instead of MLflow's minutes; returns None when everything
        is logged, else the store's error in a few words (the points stay kept)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending = [
            *getattr(self, "pending", []),
            *(Metric(k, float(v), now, step) for k, v in metrics.items()),
        ]
        try:
            with _env(FIRST_CONTACT_ENV):
                while self.pending:
                    self.client.log_batch(self.run_id, metrics=self.pending[:1000])
                    self.pending = self.pending[1000:]
        except Exception as e:
            return redact_value(str(e).strip().splitlines()[0][:200] or type(e).__name__)
        return None

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def metrics(self) -> dict[str, float]:
        return dict(self.client.get_run(self.run_id).data.metrics)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def standard_tags(cfg, identity: str, net_name: str, device) -> dict[str, str]:
    """The tags every run carries: method, size, data, seed, k_ratio, config hash, host, device
    (the git commit is provenance: ``bench.record``), and the seed group (identity minus seed)."""
    from bench.identity import group_hash

    method = cfg.method._target_.rsplit(".", 1)[0].rsplit(".", 1)[-1]
    return {
        "method": method,
        "size": net_name,
        "data": cfg.data._target_.rsplit(".", 1)[-1],
        "seed": str(cfg.seed),
        "k_ratio": str(cfg.method.get("k_ratio", "")),
        "config_hash": identity,
        "group_hash": group_hash(cfg),
        "host": socket.gethostname(),
        "device": str(device),
        "pid": str(os.getpid()),
    }
