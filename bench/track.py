"""MLflow tracking (schema in DESIGN.md): one MLflow run per job, found again by its run id.

Params are the run's identity config (flattened); evaluation settings and the metric protocol are
tags, because they may change when a finished run is re-evaluated and MLflow params are immutable.
Uses ``MlflowClient`` with explicit run ids (no global active-run state), so a resumed job keeps
logging into the run it started. The default store needs no server; any ``MLFLOW_TRACKING_URI``
(sqlite, a ``mlflow server``) works unchanged.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from bench.errors import UserError

MAX_PARAM_LEN = 500  # MLflow's limit on a param value


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:MAX_PARAM_LEN]
    return out


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    def __init__(
        self,
        uri: str | None,
        experiment: str,
        run_id: str | None = None,
        run_name: str | None = None,
    ):
        import mlflow
        from mlflow.tracking import MlflowClient

        if uri:
            mlflow.set_tracking_uri(uri)
        self.client = MlflowClient()
        self.uri = mlflow.get_tracking_uri()
        exp_id = self._experiment_id(experiment)
        self.resumed = False
        if run_id is not None:
            try:
                self.client.get_run(run_id)
                self.client.update_run(run_id, status="RUNNING")
                self.run_id, self.resumed = run_id, True
                return
            except Exception:  # the store was wiped or moved: start a fresh run
                pass
        self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id

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
        raise UserError(f"cannot create or find MLflow experiment {name!r} at {self.uri}")

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

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def metrics(self) -> dict[str, float]:
        return dict(self.client.get_run(self.run_id).data.metrics)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def standard_tags(cfg, identity: str, net_name: str, device) -> dict[str, str]:
    """DESIGN.md's tags: method, size, data, seed, k_ratio, config hash, git commit, host, device."""
    method = cfg.method._target_.rsplit(".", 1)[0].rsplit(".", 1)[-1]
    return {
        "method": method,
        "size": net_name,
        "data": cfg.data._target_.rsplit(".", 1)[-1],
        "seed": str(cfg.seed),
        "k_ratio": str(cfg.method.get("k_ratio", "")),
        "config_hash": identity,
        "git_commit": git_commit(),
        "host": socket.gethostname(),
        "device": str(device),
        "pid": str(os.getpid()),
    }
