"""What happens when things fail (docs/FAILURES.md): each guarantee, proved by a test.

The subprocess tests run ``python -m bench.run`` as a user would -- one thread each, a tiny model
and a seconds-long evaluation -- and kill or signal it for real with ``os.kill``.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import ROOT, run_cli

from bench import checkpoint
from bench.build import build
from bench.errors import EXIT_PREEMPTED, UserError
from bench.preemption import Preempted, Preemption
from bench.run import check_choices, job
from bench.track import REDACTED, flatten, is_secret
from bench.train import Trainer

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# 60 steps of 16 images take ~3 s: long enough to be killed mid-training, short enough for CI.
JOB = [
    "train.steps=60",
    "train.batch_size=16",
    "train.log_every=5",
    "train.ckpt_every=5",
    "train.progress=false",
    "eval=smoke",
    "eval.num_samples=16",
    "eval.batch_size=16",
    "eval.budgets=[1,4]",
]


# -- helpers ---------------------------------------------------------------------------------------
def start(root: Path, *extra: str) -> subprocess.Popen:
    """``python -m bench.run JOB paths.root=ROOT`` in the background, with its own sqlite store;
    output goes to files in ROOT (a pipe nobody reads could block the job)."""
    root.mkdir(parents=True, exist_ok=True)
    args = [*JOB, f"paths.root={root}", f"tracking.uri=sqlite:///{root}/mlflow.db", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **ONE_THREAD}
    n = len(list(root.glob("stdout*")))
    with open(root / f"stdout{n}", "w") as out, open(root / f"stderr{n}", "w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "bench.run", *args], cwd=root, stdout=out, stderr=err, env=env
        )


def finish(proc: subprocess.Popen, root: Path, timeout: float = 300) -> tuple[int, str, str]:
    rc = proc.wait(timeout=timeout)
    n = len(list(root.glob("stdout*"))) - 1
    return rc, (root / f"stdout{n}").read_text(), (root / f"stderr{n}").read_text()


def run_to_completion(root: Path, *extra: str) -> str:
    rc, out, err = finish(start(root, *extra), root)
    assert rc == 0, err[-3000:]
    return out


def run_dir(root: Path) -> Path:
    (rd,) = (root / "runs").iterdir()
    return rd


def wait_for_checkpoint(root: Path, proc: subprocess.Popen, min_step: int) -> int:
    """Poll the job's checkpoint until it holds ``min_step`` steps or more; returns its step."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the job ended (rc {proc.returncode}) before step {min_step}"
        for path in root.glob("runs/*/checkpoint.pt"):
            step = checkpoint.load(path)["step"]  # os.replace: never a half-written file
            if step >= min_step:
                return step
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint with step >= {min_step} within 120 s")


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = checkpoint.load(a), checkpoint.load(b)
    assert sa["step"] == sb["step"]
    for part in ("net", "ema"):
        assert sa[part].keys() == sb[part].keys()
        for k in sa[part]:
            assert torch.equal(sa[part][k], sb[part][k]), f"{part}.{k} differs"


def same_number(x: float, y: float) -> bool:
    return x == y or (math.isnan(x) and math.isnan(y))


def is_timing(name: str) -> bool:
    return "img_per_s" in name or name.endswith("_wall_s")


def assert_same_metrics(a: dict, b: dict) -> None:
    """Equal metrics (NaN equals NaN), timings -- throughput, wall time -- aside."""
    keep = sorted(k for k in a if not is_timing(k))
    assert keep == sorted(k for k in b if not is_timing(k))
    differ = [k for k in keep if not same_number(a[k], b[k])]
    assert not differ, {k: (a[k], b[k]) for k in differ}


def evaluated(root: Path) -> dict[str, float]:
    state = json.loads((run_dir(root) / "state.json").read_text())
    (by_budget,) = state["evaluated"].values()
    return {k: v for metrics in by_budget.values() for k, v in metrics.items()}


def mlflow_runs(root: Path) -> list:
    """Every MLflow run in the job's own store."""
    client = mlflow.tracking.MlflowClient(f"sqlite:///{root}/mlflow.db")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.fixture(autouse=True)
def one_thread():
    """In-process work runs on one thread too, like the jobs: the bitwise claims hold per thread
    count, and two threads fighting other work over two cores run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_trainer(cfg, rd: Path, preemption: Preemption | None = None) -> Trainer:
    """An in-process trainer on CPU, for the tests that need no MLflow."""
    data, net, method, conditional = build(cfg)
    meta = {"identity": "test", "model": net.name}
    cpu = torch.device("cpu")
    return Trainer(net, method, data, cfg.train, rd, cpu, conditional, meta, None, preemption)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The reference: the JOB command run once, start to end, in its own root and store."""
    root = tmp_path_factory.mktemp("uninterrupted")
    run_to_completion(root)
    return root


# -- 1. crash-resume -------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_uninterrupted_result_bitwise(uninterrupted, tmp_path):
    """A job killed with SIGKILL mid-training and started again with the same command ends with
    exactly the weights (online and EMA, ``torch.equal``) and the metrics of a job that was never
    interrupted -- bitwise, on CPU with one thread: every step reseeds from (seed, step), and the
    resumed job repeats the steps after its last checkpoint from the same state. Its MLflow run
    is continued, not duplicated."""
    proc = start(tmp_path)
    step = wait_for_checkpoint(tmp_path, proc, min_step=10)
    proc.kill()  # SIGKILL: no handler, no cleanup
    assert proc.wait() == -signal.SIGKILL
    ckpt = run_dir(tmp_path) / "checkpoint.pt"
    assert step <= checkpoint.load(ckpt)["step"] < 60  # killed mid-training, "latest" loads

    out = run_to_completion(tmp_path)
    assert "resuming" in out
    assert_same_weights(ckpt, run_dir(uninterrupted) / "checkpoint.pt")
    assert_same_metrics(evaluated(tmp_path), evaluated(uninterrupted))
    (run,) = mlflow_runs(tmp_path)  # one run: continued, not duplicated
    (ref,) = mlflow_runs(uninterrupted)
    assert run.info.status == "FINISHED"
    # log_every == ckpt_every: every logged interval after the resume averages the same steps.
    assert_same_metrics(run.data.metrics, ref.data.metrics)
    assert not list(run_dir(tmp_path).glob(".checkpoint.pt.*.tmp"))


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """A save writes a temporary file and renames it: dying while writing (simulated here by a
    torch.save that writes half a file and stops) leaves the last checkpoint whole."""
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, {"meta": {}, "step": 5})
    real = torch.save

    def dies_midway(obj, f):
        real(obj, f)
        Path(f).write_bytes(Path(f).read_bytes()[:100])
        raise KeyboardInterrupt  # as good as a kill: nothing after this line runs

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, {"meta": {}, "step": 10})
    monkeypatch.undo()
    assert checkpoint.load(path)["step"] == 5
    (leftover,) = tmp_path.glob(".checkpoint.pt.*.tmp")  # ours: this process is alive, so kept
    assert checkpoint.remove_stale_temporaries(path) == [] and leftover.exists()


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_leftover_temporary_does_not_break_resume(compose, tmp_path):
    """A half-written temporary from a killed save is never read; the next start deletes it when
    its process (on this host) is gone, and leaves other hosts' temporaries alone."""
    cfg = compose(
        "train.steps=4", "train.batch_size=8", "train.ckpt_every=2", "train.progress=false"
    )
    make_trainer(cfg, tmp_path).fit(stop_at=2)
    ours = tmp_path / f".checkpoint.pt.{socket.gethostname()}.{dead_pid()}.tmp"
    theirs = tmp_path / ".checkpoint.pt.other-node.cluster.12345.tmp"
    for f in (ours, theirs):
        f.write_bytes(b"PK\x03\x04 half a zip")

    again = make_trainer(cfg, tmp_path)
    assert again.resume() and again.step == 2
    assert not ours.exists() and theirs.exists()
    again.fit()
    assert checkpoint.load(tmp_path / "checkpoint.pt")["step"] == 4


# -- 2. preemption ---------------------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_a_stop_signal_saves_at_the_end_of_the_step_and_resumes_bitwise(compose, tmp_path, signum):
    """SIGUSR1/SIGTERM during step 7 (index 6): the step finishes, a checkpoint at step 7 is
    saved, ``Preempted`` is raised, the previous handlers come back, and resuming from step 7
    gives the weights of an uninterrupted run."""
    cfg = compose(
        "train.steps=10", "train.batch_size=8", "train.ckpt_every=4", "train.progress=false"
    )

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = make_trainer(cfg, tmp_path / "a")
    straight.fit()

    before = signal.getsignal(signum)
    with Preemption() as preemption:
        stopped = make_trainer(cfg, tmp_path / "b", preemption)
        after_step = stopped.method.after_step

        def signalled(nets, step):
            after_step(nets, step)
            if step == 6:
                signal.raise_signal(signum)  # runs the Python handler before returning

        stopped.method.after_step = signalled
        with pytest.raises(Preempted, match=f"preempted by {signum.name} at step 7"):
            stopped.fit()
    assert signal.getsignal(signum) is before
    assert checkpoint.load(tmp_path / "b" / "checkpoint.pt")["step"] == 7

    resumed = make_trainer(cfg, tmp_path / "b")
    assert resumed.resume() and resumed.step == 7
    resumed.fit()
    assert_same_weights(tmp_path / "a" / "checkpoint.pt", tmp_path / "b" / "checkpoint.pt")


@pytest.mark.slow
def test_sigterm_exits_3_marks_the_run_killed_and_the_rerun_resumes(uninterrupted, tmp_path):
    """SIGTERM from outside, as a scheduler sends it: exit code 3 with one line saying where the
    checkpoint is; MLflow run KILLED (not FINISHED, not left RUNNING), state.json ``preempted``.
    The same command again resumes from that step, continues the same MLflow run to FINISHED,
    and ends with the uninterrupted weights."""
    proc = start(tmp_path)
    wait_for_checkpoint(tmp_path, proc, min_step=5)
    proc.send_signal(signal.SIGTERM)
    rc, _, err = finish(proc, tmp_path)
    assert rc == EXIT_PREEMPTED, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("preempted by SIGTERM at step ") and "run the same command again" in last
    assert "Traceback" not in err
    step = int(last.split("at step ")[1].split(";")[0])
    assert 5 <= step < 60 and checkpoint.load(run_dir(tmp_path) / "checkpoint.pt")["step"] == step
    state = json.loads((run_dir(tmp_path) / "state.json").read_text())
    assert state["status"] == "preempted"
    (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "KILLED" and run.data.tags["preempted"] == f"SIGTERM at step {step}"

    out = run_to_completion(tmp_path)
    assert f"from step {step} of 60" in out
    (again,) = mlflow_runs(tmp_path)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert json.loads((run_dir(tmp_path) / "state.json").read_text())["status"] == "finished"
    assert_same_weights(
        run_dir(tmp_path) / "checkpoint.pt", run_dir(uninterrupted) / "checkpoint.pt"
    )
    assert_same_metrics(evaluated(tmp_path), evaluated(uninterrupted))


@pytest.mark.slow
def test_a_stop_signal_during_evaluation_keeps_the_budgets_done(
    compose, mlflow_uri, tmp_path, monkeypatch, capsys
):
    """A signal after training stops between evaluation budgets: those done stay in state.json,
    the MLflow run is KILLED, and the rerun evaluates only the rest. A finished run that is only
    re-evaluated keeps FINISHED (its numbers are whole) and records the stop as ``last_error``."""
    from bench.evaluate import Evaluator

    common = [*JOB, "train.steps=2", f"paths.root={tmp_path}", f"tracking.uri={mlflow_uri}"]
    stopped = Preemption()
    store = Evaluator.store

    def store_then_signal(self, *args, **kwargs):  # SIGUSR1 arrives once a budget is stored
        store(self, *args, **kwargs)
        stopped.signum = signal.SIGUSR1  # as if the handler had run

    monkeypatch.setattr(Evaluator, "store", store_then_signal)
    with pytest.raises(Preempted, match=r"SIGUSR1 at step 2; evaluated budgets \[1\] are saved"):
        job(compose(*common, "eval.budgets=[1,4]"), stopped)
    state = json.loads((run_dir(tmp_path) / "state.json").read_text())
    assert state["status"] == "preempted" and list(state["evaluated"].values())[0].keys() == {"1"}
    client = mlflow.tracking.MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fewstep-bench").experiment_id])
    assert run.info.status == "KILLED" and "fd/train/steps_4" not in run.data.metrics

    monkeypatch.setattr(Evaluator, "store", store)
    capsys.readouterr()
    job(compose(*common, "eval.budgets=[1,4]"))
    assert "already evaluated at [1] steps; evaluating [4]" in capsys.readouterr().out
    (run,) = client.search_runs([run.info.experiment_id])
    assert run.info.status == "FINISHED" and "fd/train/steps_4" in run.data.metrics

    # Re-evaluating the finished run at a new budget, stopped before it: still FINISHED.
    stopped.signum = None
    monkeypatch.setattr(Evaluator, "store", store_then_signal)
    with pytest.raises(Preempted, match=r"evaluated budgets \[1, 4\] are saved"):
        job(compose(*common, "eval.budgets=[1,4,8]"), stopped)
    state = json.loads((run_dir(tmp_path) / "state.json").read_text())
    assert state["status"] == "finished" and "SIGUSR1" in state["last_error"]
    (run,) = client.search_runs([run.info.experiment_id])
    assert run.info.status == "FINISHED" and "fd/train/steps_8" not in run.data.metrics


# -- 4. concurrency --------------------------------------------------------------------------------
@pytest.mark.slow
def test_eight_jobs_at_once_on_a_fresh_sqlite_store_all_log_complete_runs(tmp_path):
    """8 jobs started together against one sqlite store that does not exist yet: the first touch
    (create + migrate) happens under a file lock, so all 8 finish with their params, metrics and
    artifacts (docs/install.md: 1 of 4 failed without it when measured)."""
    args = [*JOB, "train.steps=2", "train.log_every=1", "train.ckpt_every=2", "eval.budgets=[1]"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **ONE_THREAD}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logs = [open(tmp_path / f"stderr{seed}", "w") for seed in range(8)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.run", *args, f"seed={seed}", f"paths.root={tmp_path}"],
            cwd=tmp_path,
            env={**env, "MLFLOW_TRACKING_URI": uri},
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        for seed, log in enumerate(logs)
    ]
    codes = [p.wait(timeout=600) for p in procs]
    for log in logs:
        log.close()
    assert codes == [0] * 8, [(tmp_path / f"stderr{i}").read_text()[-1500:] for i in range(8)]

    client = mlflow.tracking.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("fewstep-bench").experiment_id])
    assert len(runs) == 8 and {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.data.params["seed"] for r in runs) == [str(s) for s in range(8)]
    nparams = {len(r.data.params) for r in runs}
    assert len(nparams) == 1, nparams  # no run lost a param
    for r in runs:
        assert math.isfinite(r.data.metrics["fd/train/steps_1"])
        assert [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")] == [1, 2]
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert "config.yaml" in artifacts and "grids" in artifacts


# -- 6. bad input: tracking store and launcher -----------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["server", "sqlite"])
def test_an_unreachable_tracking_uri_is_one_sentence_and_nothing_trains(tmp_path, where):
    """A server nobody listens on, or a sqlite file in a folder that does not exist: one sentence
    naming the URI, exit 2, within seconds (not MLflow's minutes of retries), no run directory."""
    uri = (
        f"http://127.0.0.1:{free_port()}"
        if where == "server"
        else f"sqlite:///{tmp_path}/missing/mlflow.db"
    )
    begin = time.monotonic()
    proc = run_cli(
        *JOB, f"paths.root={tmp_path}", f"tracking.uri={uri}", cwd=tmp_path, env=ONE_THREAD
    )
    assert time.monotonic() - begin < 60
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: MLflow tracking URI {uri} cannot be reached"), last
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("runs/*"))


def test_an_unknown_launcher_lists_the_launchers(tmp_path):
    """``hydra/launcher=foo`` names Hydra's own launchers, installed plugins included."""
    proc = run_cli("hydra/launcher=foo", f"paths.root={tmp_path}", cwd=tmp_path, env=ONE_THREAD)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: unknown hydra/launcher 'foo'; choose one of: "
        "basic, local, slurm, submitit_local, submitit_slurm"
    )


def test_hydra_groups_are_checked_like_ours():
    with pytest.raises(
        UserError, match="unknown hydra/sweeper 'grid'; choose one of: basic, optuna"
    ):
        check_choices(["-m", "hydra/sweeper=grid"])
    with pytest.raises(UserError, match="unknown hydra/launcher 'pbs'"):
        check_choices(["-m", "hydra/launcher=basic,pbs"])
    check_choices(["-m", "hydra/launcher=slurm,local"])  # our presets in sweeps/hydra/launcher/
    check_choices(["hydra/launcher=submitit_local", "hydra.run.dir=x", "train.steps=3"])


@pytest.mark.parametrize(
    "override,message",
    [
        ("eval.budgets=[1,256]", "step budget 256 is not allowed for Shortcut"),
        ("eval.budgets=[0]", "step budget 0 is not allowed"),
        ("method.k_ratio=1.0", "method.k_ratio=1.0 is not allowed: a number in [0, 1)"),
        ("method.k_ratio=-0.1", "method.k_ratio=-0.1 is not allowed: a number in [0, 1)"),
    ],
)
def test_budgets_and_k_ratio_at_the_edges_fail_before_training(compose, override, message):
    """The edges the CLI test (tests/test_run.py) leaves out: above 128, zero, k_ratio = 1, < 0."""
    with pytest.raises(UserError, match=re.escape(message)):
        build(compose(override))


# -- 7. safety -------------------------------------------------------------------------------------
class RunsCode:
    """Unpickling this calls ``Path.touch(marker)``: a stand-in for arbitrary code in a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(tmp_path):
    """Checkpoints load with ``weights_only=True``: a file that would run code when unpickled is
    one sentence, and the code does not run."""
    path, marker = tmp_path / "checkpoint.pt", tmp_path / "ran"
    torch.save({"meta": {}, "step": 1, "payload": RunsCode(marker)}, path)
    with pytest.raises(UserError, match="holds pickled objects other than tensors"):
        checkpoint.load(path)
    assert not marker.exists()


def test_secret_named_keys_are_redacted():
    params = flatten(
        {
            "data": {"api_key": "sk-1", "hf_token": "hf_2", "dbPassword": "p", "path": "/d"},
            "secrets": {"s3": "x"},
            "size": {"num_tokens": 64, "key_dim": 8, "monkey": 1},
        }
    )
    assert params == {
        "data.api_key": REDACTED,
        "data.hf_token": REDACTED,
        "data.dbPassword": REDACTED,
        "data.path": "/d",
        "secrets": REDACTED,
        "size.num_tokens": "64",
        "size.key_dim": "8",
        "size.monkey": "1",
    }
    assert is_secret("ACCESS_TOKEN") and is_secret("key") and is_secret("client_secret_file")
    assert not is_secret("k_ratio") and not is_secret("keys") and not is_secret("token_dim")


@pytest.mark.slow
def test_a_secret_in_the_config_reaches_neither_params_nor_artifacts(compose, mlflow_uri, tmp_path):
    """A token in the config is logged as ``***`` and is absent from the config.yaml artifact."""
    cfg = compose(
        *JOB,
        "train.steps=2",
        "eval.budgets=[1]",
        "+train.hub_token=hf_SECRET",
        f"paths.root={tmp_path}",
        f"tracking.uri={mlflow_uri}",
    )
    job(cfg)
    client = mlflow.tracking.MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fewstep-bench").experiment_id])
    assert run.data.params["train.hub_token"] == REDACTED
    assert not any("hf_SECRET" in v for v in run.data.params.values())
    local = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path)))
    assert "hub_token: '***'" in local.read_text() and "hf_SECRET" not in local.read_text()


def test_a_signal_outside_a_watched_loop_goes_to_the_handler_that_was_there_before():
    """submitit installs its SIGUSR2 handler (requeue, exit) before our job runs. Inside a watched
    loop (training, the evaluation budgets) the signal is only recorded, and ``forward`` hands it
    on once the checkpoint is saved; outside one (setup, a teacher's evaluation) it goes straight
    to the earlier handler, so a time-limit signal there still gets submitit's requeue."""
    seen = []
    before = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    try:
        with Preemption() as preemption:
            signal.raise_signal(signal.SIGUSR2)  # nobody is watching: the earlier handler runs
            assert seen == [signal.SIGUSR2] and not preemption.requested
            with preemption.watching():
                signal.raise_signal(signal.SIGUSR2)  # a loop is watching: recorded only
            assert seen == [signal.SIGUSR2] and preemption.requested
        preemption.forward()  # after the checkpoint: the earlier handler gets it
        assert seen == [signal.SIGUSR2, signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, before)
