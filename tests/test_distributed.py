"""Data-parallel training (bench.distributed): two CPU processes under gloo train exactly the run
that one process trains with ``grad_accum=2`` -- the same global batch, rows and noise -- up to
float summation order; every rank ends with the same weights; only rank 0 writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from bench import checkpoint
from bench import distributed as ddp
from bench.build import build
from bench.errors import UserError
from bench.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.batch_size=16", "train.log_every=2", "train.ckpt_every=2", "train.progress=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compose_cfg(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "sweeps"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def make_trainer(cfg, run_dir: Path, world: ddp.World = ddp.SINGLE, explicit_sync=None):
    data, net, method, conditional = build(cfg)
    if explicit_sync is not None:  # force the other gradient path than the method's own
        method.explicit_grad_sync = explicit_sync
    meta = {"identity": "test", "model": net.name}
    return Trainer(
        net, method, data, cfg.train, run_dir, torch.device("cpu"), conditional, meta, world=world
    )


def _rank(rank: int, port: int, overrides: list[str], out: str, explicit_sync: bool) -> None:
    """One of two processes (torch.multiprocessing.spawn target)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    world = ddp.World(rank, rank, 2)
    ddp.init(world, torch.device("cpu"))
    try:
        trainer = make_trainer(compose_cfg(*overrides), Path(out), world, explicit_sync)
        trainer.fit()
        torch.save(
            {"net": trainer.net.state_dict(), "ema": trainer.ema.state_dict()},
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        ddp.shutdown()


def assert_close(a: dict, b: dict, what: str, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (
            f"{what}: {k} differs by {(a[k] - b[k]).abs().max():.3g}"
        )


@pytest.mark.parametrize(
    "method,explicit_sync",
    [("flow_matching", None), ("shortcut", None), ("flow_matching", True), ("meanflow", None)],
    ids=[
        "flow_matching-ddp_wrapper",
        "shortcut-ddp_wrapper",
        "flow_matching-explicit_allreduce",
        "meanflow-jvp_explicit_allreduce",  # MeanFlow's own path: torch.func.jvp, no DDP hooks
    ],
)
def test_two_gloo_processes_train_the_single_process_run_with_the_same_global_batch(
    tmp_path, method, explicit_sync
):
    overrides = [f"method={method}", "train.steps=4", *FAST]
    if method == "meanflow":
        assert build(compose_cfg(*overrides))[2].explicit_grad_sync
    single = make_trainer(compose_cfg(*overrides, "train.grad_accum=2"), tmp_path / "one")
    (tmp_path / "one").mkdir()
    single.fit()

    (tmp_path / "two").mkdir()
    mp.spawn(_rank, args=(free_port(), overrides, str(tmp_path / "two"), explicit_sync), nprocs=2)
    r0, r1 = (torch.load(tmp_path / "two" / f"rank{r}.pt") for r in (0, 1))
    for part in ("net", "ema"):
        # The ranks hold identical weights (the gradients were averaged, not per rank) ...
        assert_close(r0[part], r1[part], f"rank 0 vs rank 1 {part}", atol=0)
        # ... equal to one process that accumulated both halves of each batch (float order
        # differs: a sum of two halves vs an all-reduce of two halves).
        assert_close(
            r0[part],
            single.net.state_dict() if part == "net" else single.ema.state_dict(),
            f"{part}",
            atol=2e-5,
        )
    # The two processes did train: the weights moved away from their initialisation.
    fresh = make_trainer(compose_cfg(*overrides), tmp_path / "fresh")
    moved = max((r0["net"][k] - v).abs().max() for k, v in fresh.net.state_dict().items())
    assert moved > 1e-3
    # Only rank 0 wrote the checkpoint, and it holds rank 0's weights.
    saved = checkpoint.load(tmp_path / "two" / "checkpoint.pt")
    assert saved["step"] == 4
    assert_close(saved["net"], r0["net"], "checkpoint", atol=0)


def test_a_batch_that_does_not_split_over_the_processes_is_refused(tmp_path):
    cfg = compose_cfg("train.steps=2", "train.batch_size=10", "train.grad_accum=2")
    with pytest.raises(
        UserError,
        match=r"train.batch_size=10 must split evenly into 6 micro-batches \(3 processes x train.grad_accum=2\); use a multiple of 6",
    ):
        make_trainer(cfg, tmp_path, ddp.World(0, 0, 3))


def test_world_detection_reads_torchrun_and_slurm_variables(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    assert ddp.detect() == ddp.SINGLE
    # The batch script of `sbatch -n 2` (what the test cluster sets there): one process.
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert ddp.detect() == ddp.SINGLE
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # a one-task srun step is one process
    assert ddp.detect() == ddp.SINGLE
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert ddp.detect() == ddp.World(rank=3, local_rank=1, size=4)


@pytest.mark.slow
def test_torchrun_with_two_processes_logs_one_run_and_matches_grad_accum_2(tmp_path, mlflow_uri):
    """The user's command under torchrun: one MLflow run, one run directory written by rank 0,
    the same final weights as the single-process run with grad_accum=2."""
    smoke = [
        "train.steps=4",
        *FAST,
        "eval=smoke",
        "eval.num_samples=16",
        "eval.batch_size=16",
        "eval.budgets=[1]",
        "tracking.experiment=ddp",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            "-m",
            "bench.run",
            *smoke,
            f"paths.root={tmp_path / 'two'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-4000:]
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            *smoke,
            "train.grad_accum=2",
            f"paths.root={tmp_path / 'one'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-4000:]

    (rd2,) = (tmp_path / "two" / "runs").iterdir()
    (rd1,) = (tmp_path / "one" / "runs").iterdir()
    assert rd2.name == rd1.name  # one identity: 2 processes x 1 = 1 process x 2 micro-batches
    state = json.loads((rd2 / "state.json").read_text())
    assert state["status"] == "finished"
    c2, c1 = checkpoint.load(rd2 / "checkpoint.pt"), checkpoint.load(rd1 / "checkpoint.pt")
    assert c2["step"] == c1["step"] == 4
    assert_close(c2["net"], c1["net"], "torchrun vs grad_accum=2", atol=2e-5)

    import mlflow

    # The store of this test by name: an earlier test's in-process job may have set MLflow's
    # global tracking URI to its own store.
    client = mlflow.tracking.MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 2  # one per command: rank 1 logged nothing of its own
    by_dir = {r.data.tags["run_dir"]: r for r in runs}
    run = by_dir[str(rd2.resolve())]
    assert run.info.status == "FINISHED"
    assert "fd/train/steps_1" in run.data.metrics


def test_a_batch_that_does_not_split_fails_before_any_run_exists(tmp_path, mlflow_uri):
    from conftest import SMOKE, run_cli

    r = run_cli(
        "train.steps=2", *SMOKE, "train.grad_accum=3", f"paths.root={tmp_path}", cwd=tmp_path
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "error: train.batch_size=8 must split evenly into 3 micro-batches "
        "(1 processes x train.grad_accum=3); use a multiple of 3"
    )
    assert not (tmp_path / "runs").exists()  # no run directory, no MLflow run left RUNNING
    import mlflow

    client = mlflow.tracking.MlflowClient(mlflow_uri)  # this test's store, whatever is global
    assert client.search_experiments() == [] or all(
        client.search_runs([e.experiment_id]) == [] for e in client.search_experiments()
    )
