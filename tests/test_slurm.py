"""Sweeps on a real SLURM cluster through ``hydra/launcher=slurm`` (docs/CLUSTER.md).

The slow tests submit real jobs to the single-node cluster that ``scripts/slurm_up.sh`` brings up
(``.ci/run`` starts it before pytest and stops it afterwards). Without ``sinfo``, or with a
cluster that does not answer, they are skipped with the reason -- never passed. The quick tests
only compose the launcher presets and need no cluster.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import CONFIG_DIR, ROOT, SMOKE

from bench import checkpoint
from bench.run import check_choices

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TOY = [
    "train.steps=4",
    *SMOKE,
]
SWEEP = ["-m", "method=shortcut,flow_matching", "size=tiny"]
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL"}


# -- is there a cluster? ---------------------------------------------------------------------------
def cluster_problem() -> str | None:
    """None when a SLURM cluster with accounting answers; otherwise why the tests cannot run."""
    if shutil.which("sinfo") is None or shutil.which("sacct") is None:
        return (
            "SLURM is not installed here (no `sinfo`/`sacct`); `sudo scripts/slurm_up.sh` "
            "installs and starts a single-node cluster (.ci/run does)"
        )
    try:
        info = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=30
        )
        acct = subprocess.run(
            ["sacct", "-n", "-X", "-S", "now"], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired as e:
        return f"the SLURM cluster is not up (`{' '.join(e.cmd)}` did not answer in 30 s)"
    if info.returncode != 0:
        why = (info.stderr.strip().splitlines() or ["no output"])[-1]
        return (
            f"the SLURM cluster is not up (`sinfo`: {why}); `sudo scripts/slurm_up.sh` starts one"
        )
    states = [s.rstrip("*~#!%$@^-") for s in info.stdout.split()]
    if not {"idle", "mixed", "allocated"} & set(states):
        return f"no SLURM node can run jobs (node states: {states or 'none'})"
    if acct.returncode != 0:
        why = (acct.stderr.strip().splitlines() or ["no output"])[-1]
        return f"SLURM accounting does not answer (`sacct`: {why}); submitit needs it"
    return None


@pytest.fixture(scope="module")
def slurm() -> None:
    problem = cluster_problem()
    if problem:
        pytest.skip(problem)


# -- helpers ---------------------------------------------------------------------------------------
def start_sweep(root: Path, *extra: str) -> subprocess.Popen:
    """The 2-point toy sweep in the background, with its own sqlite store in ``root``; its output
    goes to files there (a pipe nobody reads could block it)."""
    root.mkdir(parents=True, exist_ok=True)
    args = [*SWEEP, *TOY, f"paths.root={root}", f"tracking.uri=sqlite:///{root}/m.db", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **ONE_THREAD}
    with open(root / "sweep.out", "w") as out, open(root / "sweep.err", "w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "bench.run", *args], cwd=root, env=env, stdout=out, stderr=err
        )


def finish_sweep(proc: subprocess.Popen, root: Path) -> str:
    """Wait for a sweep started by ``start_sweep``; its stdout."""
    rc = proc.wait(timeout=600)
    assert rc == 0, (root / "sweep.err").read_text()[-4000:]
    return (root / "sweep.out").read_text()


def job_folders(root: Path) -> list[Path]:
    """submitit's folder of each submitted job (named by its SLURM job id: ``12`` or ``12_0``)."""
    folders = [
        p
        for p in root.glob("hydra/multirun_*/.submitit/*")
        if p.is_dir() and re.fullmatch(r"\d+(_\d+)?", p.name)
    ]
    with_logs = [p for p in folders if list(p.glob("*_log.out")) or list(p.glob("*.pkl"))]
    return sorted(with_logs, key=lambda p: p.name)


def sacct_states(job_ids: list[str], duplicates: bool = False) -> dict[str, list[str]]:
    flags = ["-D"] if duplicates else []
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", *flags, "-j", ",".join(job_ids), "-o", "JobID,State"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    states: dict[str, list[str]] = {}
    for line in out.strip().splitlines():
        jid, state = line.split("|")
        states.setdefault(jid, []).append(state.split()[0])  # "CANCELLED by 0" -> CANCELLED
    return states


def final_states(job_ids: list[str], timeout: float = 60) -> dict[str, str]:
    """Each job's last state once SLURM's accounting has it (it lags the job by a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        last = {j: s[-1] for j, s in sacct_states(job_ids).items()}
        if set(last) == set(job_ids) and set(last.values()) <= FINAL:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"jobs not finished in sacct after {timeout} s: {last}")
        time.sleep(0.5)


def mlflow_runs(root: Path) -> list:
    client = mlflow.tracking.MlflowClient(f"sqlite:///{root}/m.db")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def is_timing(name: str) -> bool:
    return "img_per_s" in name or name.endswith("_wall_s")


def evaluated(rd: Path) -> dict[str, float]:
    state = json.loads((rd / "state.json").read_text())
    assert state["status"] == "finished", state
    (by_budget,) = state["evaluated"].values()
    return {k: v for m in by_budget.values() for k, v in m.items() if not is_timing(k)}


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


# -- the presets (no cluster needed) ---------------------------------------------------------------
def hydra_cfg(tmp_path: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(
            "config", overrides=[f"paths.root={tmp_path}", *overrides], return_hydra_config=True
        )


def test_the_launcher_presets_compose_and_are_accepted_names(tmp_path):
    from omegaconf import OmegaConf

    cfg = hydra_cfg(tmp_path, "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=2")
    launcher = cfg.hydra.launcher
    # the plugin's SLURM launcher, its request sized per job (bench/plan.py; tests/test_plan.py)
    assert launcher._target_ == "hydra_plugins.fewstep_bench.launchers.PlannedSlurmLauncher"
    assert launcher.nodes == 1 and launcher.tasks_per_node == 1 and launcher.gpus_per_node is None
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0
    # submitit's files go under paths.root, beside Hydra's job folders
    folder = OmegaConf.to_container(launcher, resolve=True)["submitit_folder"]
    assert folder.startswith(f"{tmp_path}/hydra/multirun_") and folder.endswith("/.submitit/%j")
    assert launcher.setup == [
        "export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2",
        "export SLURM_KILL_BAD_EXIT=1",
    ]
    local = hydra_cfg(tmp_path, "hydra/launcher=local").hydra.launcher
    assert local._target_.endswith("basic_launcher.BasicLauncher")
    check_choices(["-m", "hydra/launcher=slurm,local,submitit_local"])


# -- a real sweep on SLURM -------------------------------------------------------------------------
@pytest.mark.slow
def test_a_two_point_sweep_on_slurm_matches_the_same_sweep_run_locally(slurm, tmp_path):
    """`python -m bench.run -m method=shortcut,flow_matching size=tiny hydra/launcher=slurm`:
    one job array, both tasks COMPLETED in sacct, both runs FINISHED in MLflow with their
    metrics, and the same weights and metrics as the basic launcher's run of the same sweep."""
    on_slurm, local = tmp_path / "slurm", tmp_path / "local"
    # The reference runs meanwhile: the basic launcher, one job after another, in one process.
    reference = start_sweep(local)
    slurm_sweep = start_sweep(on_slurm, "hydra/launcher=slurm")
    try:
        assert "Submitit 'slurm' sweep output dir" in finish_sweep(slurm_sweep, on_slurm)
        finish_sweep(reference, local)
    finally:  # a failure leaves no process and no SLURM job behind
        for proc in (slurm_sweep, reference):
            if proc.poll() is None:
                proc.kill()
        if slurm_sweep.returncode != 0:
            subprocess.run(["scancel", *(p.name for p in job_folders(on_slurm))], check=False)

    folders = job_folders(on_slurm)
    job_ids = [p.name for p in folders]
    assert len(job_ids) == 2 and len({j.split("_")[0] for j in job_ids}) == 1, job_ids  # 1 array
    assert final_states(job_ids) == {j: "COMPLETED" for j in job_ids}

    runs = mlflow_runs(on_slurm)
    assert sorted(r.data.tags["method"] for r in runs) == ["flow_matching", "shortcut"]
    client = mlflow.tracking.MlflowClient(f"sqlite:///{on_slurm}/m.db")
    for r in runs:
        assert r.info.status == "FINISHED"
        for steps in (1, 4):
            assert math.isfinite(r.data.metrics[f"fd/train/steps_{steps}"])
        history = client.get_metric_history(r.info.run_id, "train/loss")
        assert [m.step for m in history] == [2, 4]

    names = sorted(p.name for p in (on_slurm / "runs").iterdir())
    assert names == sorted(p.name for p in (local / "runs").iterdir())  # same identities
    for name in names:
        a, b = on_slurm / "runs" / name, local / "runs" / name
        ma, mb = evaluated(a), evaluated(b)
        assert sorted(ma) == sorted(mb)
        assert all(same(ma[k], mb[k]) for k in ma), {k: (ma[k], mb[k]) for k in ma}
        sa, sb = checkpoint.load(a / "checkpoint.pt"), checkpoint.load(b / "checkpoint.pt")
        assert sa["step"] == sb["step"] == 4
        for part in ("net", "ema"):
            assert all(torch.equal(sa[part][k], sb[part][k]) for k in sa[part]), part


@pytest.mark.slow
def test_jobs_of_different_sizes_ask_slurm_for_different_time_limits(slurm, tmp_path):
    """`size=tiny,S` with a large planning margin: each job's request comes from its own plan
    (bench/plan.py), so the two jobs go out as two job arrays whose sbatch scripts ask for
    different time limits; both complete, and the plan prints the same requests."""
    margin = ["planning.slurm.margin=60", "planning.slurm.extra_min=1"]
    sizes = ["-m", "method=flow_matching", "size=tiny,S", *TOY, *margin, "hydra/launcher=slurm"]
    root = tmp_path / "sized"
    planned = subprocess.run(
        [sys.executable, "-m", "bench.run", *sizes, "plan=true", f"paths.root={root}"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300,
    )  # fmt: skip
    assert planned.returncode == 0, planned.stderr[-3000:]
    asked = re.findall(r"--time=(\d+)", planned.stdout)
    assert len(asked) == 2 and asked[0] != asked[1], planned.stdout
    store = [f"paths.root={root}", f"tracking.uri=sqlite:///{root}/m.db"]
    with open(tmp_path / "sweep.out", "w") as out, open(tmp_path / "sweep.err", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.run", *sizes, *store], cwd=tmp_path, stdout=out,
            stderr=err, env={**os.environ, "PYTHONPATH": str(ROOT), **ONE_THREAD},
        )  # fmt: skip
    try:
        assert proc.wait(timeout=600) == 0, (tmp_path / "sweep.err").read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["scancel", *(p.name for p in job_folders(root))], check=False)
    folders = job_folders(root)
    assert len({p.name.split("_")[0] for p in folders}) == 2  # one array per distinct request
    scripts = [f.read_text() for f in root.glob("hydra/multirun_*/.submitit/*/*_submission.sh")]
    times = sorted({m for s in scripts for m in re.findall(r"#SBATCH --time=(\d+)", s)}, key=int)
    assert times == sorted(asked, key=int), (times, asked)
    assert set(final_states([p.name for p in folders]).values()) == {"COMPLETED"}


# -- requeue: the job resumes its run --------------------------------------------------------------
LONG = [
    "train.steps=120",
    "train.batch_size=16",
    "train.log_every=10",
    "train.ckpt_every=10",
    "train.progress=false",
    "eval=smoke",
    "eval.num_samples=16",
    "eval.batch_size=16",
    "eval.budgets=[1]",
]


def wait_until(what: str, check, timeout: float, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep ended (rc {proc.returncode}) while waiting for {what}")
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {timeout} s")


def checkpoint_step(root: Path) -> int:
    for path in root.glob("runs/*/checkpoint.pt"):
        return checkpoint.load(path)["step"]  # written with os.replace: never half a file
    return 0


def requeue(job_id: str) -> None:
    """What preemption does: SLURM stops the job with SIGTERM and queues it again."""
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)


def time_limit_signal(job_id: str) -> None:
    """What SLURM sends ``signal_delay_s`` before the time limit (``--signal=USR2@N``), sent now:
    submitit's handler requeues the job once our handler has saved the checkpoint."""
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize(
    "interrupt,signal_name",
    [(requeue, "SIGTERM"), (time_limit_signal, "SIGUSR2")],
    ids=["scontrol_requeue", "time_limit_signal"],
)
def test_an_interrupted_job_saves_is_requeued_and_resumes_its_run(
    slurm, tmp_path, interrupt, signal_name
):
    """`scontrol requeue` of a running job (preemption: SLURM stops it with SIGTERM), or the
    signal SLURM sends before the time limit (SIGUSR2, which submitit answers by requeueing):
    the job saves a checkpoint at the end of its step and exits; SLURM runs it again, and the
    rerun finds its run directory by the config hash, resumes from that checkpoint and finishes
    the same MLflow run. Hydra's sweep waits through it all and ends with exit code 0."""
    args = ["-m", "hydra/launcher=slurm", *LONG, f"paths.root={tmp_path}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **ONE_THREAD}
    with open(tmp_path / "sweep.out", "w") as out, open(tmp_path / "sweep.err", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.run", *args, f"tracking.uri=sqlite:///{tmp_path}/m.db"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=err,
        )
    try:
        wait_until("checkpoint", lambda: checkpoint_step(tmp_path) >= 10, 180, proc)
        (folder,) = job_folders(tmp_path)
        job_id = folder.name
        interrupt(job_id)
        # SLURM holds a requeued job for its credential lifetime (120 s by default) before it may
        # start again; release it at once so the test takes seconds, not minutes.
        pending = ["squeue", "-h", "-j", job_id, "-o", "%T"]
        wait_until(
            "PENDING after the requeue",
            lambda: (
                subprocess.run(pending, capture_output=True, text=True).stdout.strip() == "PENDING"
            ),
            60,
            proc,
        )
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["scancel", *(p.name for p in job_folders(tmp_path))], check=False)
    assert rc == 0, (tmp_path / "sweep.err").read_text()[-4000:]

    log_out = "".join(p.read_text() for p in folder.glob("*_log.out"))
    log_err = "".join(p.read_text() for p in folder.glob("*_log.err"))
    stopped = re.search(rf"preempted by {signal_name} at step (\d+); checkpoint saved", log_err)
    assert stopped, log_err[-3000:]
    step = int(stopped.group(1))
    assert 10 <= step < 120
    (rd,) = (tmp_path / "runs").iterdir()
    assert f"resuming {rd} from step {step} of 120" in log_out, log_out[-3000:]
    assert checkpoint.load(rd / "checkpoint.pt")["step"] == 120
    assert json.loads((rd / "state.json").read_text())["status"] == "finished"

    (run,) = mlflow_runs(tmp_path)  # one run: the rerun continued it
    assert run.info.status == "FINISHED"
    assert run.data.tags["preempted"] == f"{signal_name} at step {step}"
    assert math.isfinite(run.data.metrics["fd/train/steps_1"])
    final_states([job_id])
    assert sacct_states([job_id], duplicates=True)[job_id] == ["REQUEUED", "COMPLETED"]


# -- DDP inside a SLURM job --------------------------------------------------------------------------
@pytest.mark.slow
def test_a_two_task_slurm_job_trains_one_run_with_ddp(slurm, tmp_path):
    """`hydra.launcher.tasks_per_node=2`: SLURM starts two processes, submitit's environment gives
    them their ranks, they train one run under gloo (rank 0 logs and evaluates), and the weights
    equal the single-process run with grad_accum=2 (same global batch, same rows and noise)."""
    from conftest import run_cli

    toy = ["method=flow_matching", "size=tiny", *TOY, "train.batch_size=16", "eval.budgets=[1]"]
    on_slurm, local = tmp_path / "slurm", tmp_path / "local"
    on_slurm.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), **ONE_THREAD}
    sweep = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "-m",
            *toy,
            "hydra/launcher=slurm",
            "hydra.launcher.tasks_per_node=2",
            f"paths.root={on_slurm}",
            f"tracking.uri=sqlite:///{on_slurm}/m.db",
        ],
        cwd=on_slurm,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert sweep.returncode == 0, sweep.stderr[-4000:]
    (folder,) = job_folders(on_slurm)
    assert final_states([folder.name]) == {folder.name: "COMPLETED"}
    logs = {p.name: p.read_text() for p in folder.glob("*_log.err")}
    assert len(logs) == 2, sorted(logs)  # one log per task: two processes ran
    (run,) = mlflow_runs(on_slurm)  # rank 1 logged nothing of its own
    assert run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2"

    local.mkdir()
    one = run_cli(
        *toy,
        "train.grad_accum=2",
        f"paths.root={local}",
        f"tracking.uri=sqlite:///{local}/m.db",
        cwd=local,
        env=ONE_THREAD,
    )
    assert one.returncode == 0, one.stderr[-4000:]
    (a,), (b,) = (list((root / "runs").iterdir()) for root in (on_slurm, local))
    assert a.name == b.name  # one identity: 2 tasks x 1 = 1 process x 2 micro-batches
    sa, sb = checkpoint.load(a / "checkpoint.pt"), checkpoint.load(b / "checkpoint.pt")
    assert sa["step"] == sb["step"] == 4
    for k in sa["net"]:
        assert torch.allclose(sa["net"][k], sb["net"][k], atol=2e-5, rtol=0), k
