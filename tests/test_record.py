"""The run record (bench.record): state.json and the MLflow run end every job in step -- FAILED,
KILLED or FINISHED with the reason, never left RUNNING -- and carry the code's provenance."""

from __future__ import annotations

import json
import signal
import subprocess

import mlflow
import pytest
import torch

from bench.errors import UserError
from bench.identity import run_dir
from bench.preemption import Preempted
from bench.record import RunRecord, provenance, read_state


@pytest.fixture
def opened(compose, mlflow_uri, tmp_path):
    """A record opened for the default config in its own root and store."""
    cfg = compose(f"paths.root={tmp_path}", f"tracking.uri={mlflow_uri}")
    record = RunRecord(run_dir(cfg))
    record.open(cfg, "tiny/4", torch.device("cpu"))
    return record


def mlflow_run(record: RunRecord):
    return mlflow.tracking.MlflowClient().get_run(record.tracker.run_id)


def test_open_marks_both_places_running(opened):
    assert opened.status == "running" and read_state(opened.dir)["status"] == "running"
    run = mlflow_run(opened)
    assert run.info.status == "RUNNING" and run.data.tags["config_hash"] in opened.dir.name
    assert run.data.tags["git_commit"] and run.data.tags["git_dirty"] in ("true", "false")


@pytest.mark.parametrize(
    "error,mlflow_status,status,tag,reason",
    [
        (RuntimeError("disk full"), "FAILED", "failed", "failure", "RuntimeError: disk full"),
        (UserError("bad value"), "FAILED", "failed", "failure", "bad value"),
        (KeyboardInterrupt(), "KILLED", "failed", "failure", "interrupted (KeyboardInterrupt)"),
        (Preempted("SIGTERM", 7, "saved"), "KILLED", "preempted", "preempted", "SIGTERM at step 7"),
    ],
    ids=["error", "user-error", "interrupt", "preempted"],
)
def test_any_error_inside_the_record_ends_the_run_with_its_reason(
    opened, error, mlflow_status, status, tag, reason
):
    with pytest.raises(type(error)):  # the error goes on, after the run is ended
        with opened:
            raise error
    run = mlflow_run(opened)
    assert run.info.status == mlflow_status and run.data.tags[tag] == reason
    assert read_state(opened.dir)["status"] == status


def test_a_failure_while_opening_leaves_the_run_failed_not_running(
    compose, mlflow_uri, tmp_path, monkeypatch
):
    from bench.track import Tracker

    cfg = compose(f"paths.root={tmp_path}", f"tracking.uri={mlflow_uri}")
    record = RunRecord(run_dir(cfg))

    def refuse(self, params):
        raise RuntimeError("the store refused the params")

    monkeypatch.setattr(Tracker, "log_params", refuse)
    with pytest.raises(RuntimeError, match="refused"):
        record.open(cfg, "tiny/4", torch.device("cpu"))
    run = mlflow_run(record)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure"] == "RuntimeError: the store refused the params"


def test_a_run_that_ended_is_not_ended_again(opened):
    with opened:
        opened.finished()
    with pytest.raises(RuntimeError):  # e.g. the objective is read after the run finished
        with opened:
            raise RuntimeError("after the end")
    assert mlflow_run(opened).info.status == "FINISHED" and opened.status == "finished"


def test_reopening_resumes_the_same_mlflow_run_and_clears_the_last_end(opened, compose):
    with pytest.raises(Preempted), opened:
        raise Preempted(signal.Signals.SIGUSR1.name, 3, "saved")
    again = RunRecord(opened.dir)
    cfg = compose(f"paths.root={opened.dir.parents[1]}", f"tracking.uri={opened.tracker.uri}")
    again.open(cfg, "tiny/4", torch.device("cpu"))
    assert again.tracker.run_id == opened.tracker.run_id and again.tracker.resumed
    state = json.loads((opened.dir / "state.json").read_text())
    assert state["status"] == "running" and "preempted" not in state


def git(root, *args):
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def test_provenance_is_the_commit_and_the_diff_of_a_dirty_tree(opened, tmp_path):
    repo = tmp_path / "code"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "sampler.py").write_text("steps = 1\n")
    git(repo, "add", "sampler.py")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    commit, diff = provenance(repo)
    assert len(commit) == 12 and diff == ""
    (repo / "sub").mkdir()
    assert provenance(repo / "sub") == ("unknown", "")  # code inside another repository's tree
    assert provenance(tmp_path) == ("unknown", "")  # not a checkout at all

    (repo / "sampler.py").write_text("steps = 2\n")
    commit, diff = provenance(repo)
    assert "-steps = 1" in diff and "+steps = 2" in diff
    opened.record_provenance(repo)
    tags = mlflow_run(opened).data.tags
    assert tags["git_commit"] == commit and tags["git_dirty"] == "true"
    client = mlflow.tracking.MlflowClient()
    local = client.download_artifacts(opened.tracker.run_id, tags["git_diff"], str(tmp_path))
    assert open(local).read() == diff
