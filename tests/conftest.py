"""Shared fixtures: an isolated MLflow store per test and Hydra composition of ``sweeps/``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from methods.common import bcast  # noqa: F401 -- the tests' per-row broadcast is the methods' own

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "sweeps"

# Tests are CPU-only with tiny batches, where a second thread buys little and oversubscription
# (subprocess jobs, a parallel run) costs a lot: one thread in the test process.
torch.set_num_threads(1)


#: Overrides that make a job take seconds: tiny batches, frequent checkpoints, a 16-sample evaluation;
#: on the CPU also where a GPU is present (the run directory a test computes is the CPU's:
#: ``precision=auto`` is hashed as what the device makes of it).
SMOKE = [
    "device=cpu",
    "train.batch_size=8",
    "train.log_every=2",
    "train.ckpt_every=2",
    "train.progress=false",
    "eval=smoke",
    "eval.num_samples=16",
    "eval.batch_size=16",
]


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def compose():
    """``compose(*overrides)`` -> the resolved job config, exactly as ``bench.run`` would get it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides))

    return _compose


def run_cli(*args: str, cwd: Path, timeout: float = 600, env: dict | None = None):
    """``python -m bench.run ARGS`` in ``cwd``; returns the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "bench.run", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


class Analytic(torch.nn.Module):
    """A 'network' with a known velocity ``f(x, t, d, y)``; counts evaluated rows."""

    def __init__(self, f, num_classes: int = 0):
        super().__init__()
        self.f, self.num_classes = f, num_classes
        self.calls: list[tuple] = []
        self.rows = 0

    def forward(self, x, t, d, y=None):
        n = x.shape[0]
        t, d = t.expand(n), d.expand(n)
        self.calls.append((x.clone(), t.clone(), d.clone(), None if y is None else y.clone()))
        self.rows += n
        return self.f(x, t, d, y)


@pytest.fixture(autouse=True)
def _no_global_tracking_uri(monkeypatch):
    """Each test starts with MLflow's tracking URI unset. An in-process job given tracking.uri
    sets it for the whole process (and in the environment, for subprocesses); left set, it would
    send a later test's runs to an earlier test's store."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # restored after the test
    mlflow.set_tracking_uri(None)


@pytest.fixture(autouse=True)
def _store_dir(tmp_path, monkeypatch):
    """Packed image stores (bench.store) go under the test's own folder, not the user's cache."""
    monkeypatch.setenv("FEWSTEP_STORE_DIR", str(tmp_path / "stores"))
