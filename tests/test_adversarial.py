"""Tried as a hostile or careless user would: every case is a class of failure, and every test
asserts what the user is owed -- one sentence naming the value and what is allowed, a non-zero
exit, the tracking run FAILED or untouched (never RUNNING, never a second run for one identity),
nothing lost, no secret on disk (docs/FAILURES.md lists them).

In-process where possible (``job`` raises the ``UserError`` that ``bench.run`` prints as
``error: <sentence>`` with exit 2); a subprocess only where an exit code, a signal or Hydra's own
files demand one.
"""

from __future__ import annotations

import json
import math
import os
import typing
from pathlib import Path

import mlflow
import pytest
from conftest import CONFIG_DIR, SMOKE
from omegaconf import OmegaConf

from bench import schema
from bench.errors import UserError
from bench.identity import run_dir
from bench.lock import RunLock
from bench.options import _convert, _Refused, hints
from bench.run import job

TINY = ["train.steps=4", *SMOKE, "eval.budgets=[1,2]"]


def one_sentence(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and "Traceback" not in text and len(text) < 600, text
    return text


def store_runs(uri: str):
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name("fewstep-bench")
    return [] if exp is None else client.search_runs([exp.experiment_id])


# -- 1. every config key: a wrong type, an out-of-range value, a typo -----------------------------
def composed_keys() -> list[tuple[str, object]]:
    """``(spec, dotted key)`` of every key the default config composes (and the image folder's,
    the one data group with every kind of option)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["data=image_folder", "data.path=/x"])
    values = OmegaConf.to_container(cfg, resolve=True)
    specs = {"train": schema.Train, "eval": schema.Eval, "data": schema.ImageFolder}
    specs |= {"paths": schema.Paths, "tracking": schema.Tracking, "objective": schema.Objective}
    # A top-level word that names a config group (recipe=official) is Hydra's choice of a file,
    # checked by Hydra; the rest are the schema's.
    scalars = [k for k, v in values.items() if not isinstance(v, dict)]
    out = [(schema.Top, k) for k in scalars if not (CONFIG_DIR / k).is_dir()]
    for group, spec in specs.items():
        out += [(spec, f"{group}.{k}") for k in values[group] if k != "_target_"]
    # planning and its slurm subgroup (the subgroup is a group, not an option of planning)
    out += [(schema.Planning, f"planning.{k}") for k in values["planning"] if k != "slurm"]
    out += [(schema.PlanningSlurm, f"planning.slurm.{k}") for k in values["planning"]["slurm"]]
    return out


KEYS = composed_keys()
CANDIDATES = [0, -1, math.nan, 1.5, "bogus", "", []]


def accepts(value, hint) -> bool:
    try:
        _convert(value, hint)
        return True
    except _Refused:
        return False


def hint_of(spec, key: str):
    return hints(spec)[key.rsplit(".", 1)[-1]]


def override(value) -> str:
    return "[]" if value == [] else str(value)


def wrong_type(hint):
    """A value of another type than the option takes: a list for a string option, else a word."""
    return [1, 2] if accepts("a/b", hint) else "abc"


def out_of_range(hint, default):
    """A value of the option's own type that its range or choices refuse (None: it has none)."""
    same_type = {bool: (), int: (int,), float: (int, float), str: (str,), list: (list,)}.get(
        type(default), ()
    )
    if default is None:  # an optional option: what it takes when set
        same_type = (int, float) if accepts(1.5, hint) else (str,) if accepts("a", hint) else ()
    if typing.get_origin(hint) is typing.Literal:  # choices: a word that is none of them
        same_type = (*same_type, str)
    for c in CANDIDATES:
        if type(c) in same_type and not accepts(c, hint):
            return c
    return None


@pytest.fixture
def composer(compose):
    return lambda *o: compose("data=image_folder", *o)


def refused(composer, *overrides: str) -> str:
    with pytest.raises(UserError) as e:
        schema.check(composer(*overrides))
    return one_sentence(e.value)


@pytest.mark.parametrize("spec,key", KEYS, ids=[k for _, k in KEYS])
def test_every_key_refuses_a_value_of_the_wrong_type(composer, spec, key):
    value = wrong_type(hint_of(spec, key))
    message = refused(composer, f"{key}={override(value)}")
    assert message.startswith(f"{key}=") and "is not allowed:" in message


def default_of(composer, key):
    return OmegaConf.select(composer(), key)


@pytest.mark.parametrize("spec,key", KEYS, ids=[k for _, k in KEYS])
def test_every_key_with_a_range_or_choices_refuses_a_value_outside_it(composer, spec, key):
    hint = hint_of(spec, key)
    default = default_of(composer, key)
    default = list(default) if OmegaConf.is_list(default) else default
    value = out_of_range(hint, default)
    if value is None:  # a flag, a free string or any integer (a seed): no range to leave
        assert typing.get_origin(hint) is not typing.Literal, key
        pytest.skip(f"{key} has no range or choices")
    message = refused(composer, f"{key}={override(value)}")
    assert message.startswith(f"{key}=") and "is not allowed:" in message


@pytest.mark.parametrize("spec,key", KEYS, ids=[k for _, k in KEYS])
def test_every_key_misspelt_is_refused_and_named(composer, spec, key):
    typo = f"{key}x"
    message = refused(composer, f"+{typo}=1")
    assert message.startswith(f"{typo}=1 is not allowed: not an option; the options are")


def test_every_shipped_group_and_experiment_passes_the_schema(compose):
    variants = [[f"+experiment={p.stem}"] for p in (CONFIG_DIR / "experiment").glob("*.yaml")]
    for group in ("method", "data", "eval", "train", "size"):
        variants += [[f"{group}={p.stem}"] for p in (CONFIG_DIR / group).glob("*.yaml")]
    for v in variants:
        schema.check(compose(*v))


@pytest.mark.parametrize(
    "bad,message",
    [
        ("train.steps=0", "train.steps=0 is not allowed: an integer >= 1"),
        ("train.steps=-5", "train.steps=-5 is not allowed: an integer >= 1"),
        ("train.steps=abc", "train.steps='abc' is not allowed: an integer >= 1"),
        ("train.lr=nan", "train.lr=nan is not allowed: a number > 0"),
        ("train.lr=-1", "train.lr=-1 is not allowed: a number > 0"),
        ("train.log_every=0", "train.log_every=0 is not allowed: an integer >= 1"),
        ("train.ckpt_every=0", "train.ckpt_every=0 is not allowed: an integer >= 1"),
        ("eval.weights=bogus", "eval.weights='bogus' is not allowed: one of ema, online"),
        ("eval.budgets=[2.0]", "eval.budgets=[2.0] is not allowed: a list whose items are"),
        ("+method.teacher.train.steps=0", "method.teacher.train.steps=0 is not allowed"),
    ],
)
def test_the_issues_bad_values_are_refused_before_anything_exists(
    compose, mlflow_uri, tmp_path, bad, message
):
    """Refused before a run directory, a lock or an MLflow run exists: nothing to leave RUNNING."""
    extra = (
        ["method=consistency", "+method.teacher.method=flow_matching"] if "teacher" in bad else []
    )
    with pytest.raises(UserError) as e:
        job(compose(*TINY, *extra, bad, f"paths.root={tmp_path}", f"tracking.uri={mlflow_uri}"))
    assert one_sentence(e.value).startswith(message)
    assert not (tmp_path / "runs").exists() and not store_runs(mlflow_uri)


# -- 2. one job per run directory; damaged state and checkpoints ---------------------------------
@pytest.fixture
def finished(compose, mlflow_uri, tmp_path):
    """A finished tiny run: ``(cfg, run directory)``."""
    cfg = compose(*TINY, f"paths.root={tmp_path}", f"tracking.uri={mlflow_uri}")
    job(cfg)
    return cfg, run_dir(cfg)


def test_a_second_job_on_a_held_run_directory_is_one_sentence_and_touches_nothing(
    compose, mlflow_uri, tmp_path
):
    cfg = compose(*TINY, f"paths.root={tmp_path}", f"tracking.uri={mlflow_uri}")
    with RunLock(run_dir(cfg)):  # another job holds it (flock: per open file, even in-process)
        with pytest.raises(UserError) as e:
            job(cfg)
    message = one_sentence(e.value)
    assert "is in use by another job (pid" in message and str(run_dir(cfg)) in message
    assert not store_runs(mlflow_uri)  # no MLflow run was opened
    job(cfg)  # once the holder is gone, the same command runs
    (run,) = store_runs(mlflow_uri)
    assert run.info.status == "FINISHED"


def test_a_refused_job_leaves_no_run_directory(tmp_path):
    rd = tmp_path / "runs" / "x"
    with pytest.raises(RuntimeError), RunLock(rd):
        raise RuntimeError("the store could not be reached")
    assert not rd.exists()


DAMAGED_STATES = {
    "truncated": lambda text: text[: len(text) // 2],
    "garbage": lambda text: "\x00\xff not json at all",
    "a JSON list": lambda text: "[1, 2, 3]",
    "a JSON string": lambda text: '"finished"',
    "a run id that is a number": lambda text: json.dumps({"mlflow_run_id": 5, "status": "x"}),
    "empty": lambda text: "",
}


def test_a_damaged_or_lost_state_json_is_recovered_from_the_store_never_a_second_run(
    finished, mlflow_uri, capsys
):
    """The run's identity is in its MLflow tags (config_hash, run_dir): whatever happened to
    state.json, the rerun continues that run -- one MLflow run, FINISHED -- and says so."""
    cfg, rd = finished
    (first,) = store_runs(mlflow_uri)
    good = (rd / "state.json").read_text()
    capsys.readouterr()
    for name, damage in [*DAMAGED_STATES.items(), ("deleted", None)]:
        if damage is None:
            (rd / "state.json").unlink()
        else:
            (rd / "state.json").write_text(damage(good))
        job(cfg)
        out = capsys.readouterr().out
        assert f"continuing MLflow run {first.info.run_id} (FINISHED)" in out, (name, out)
        (run,) = store_runs(mlflow_uri)
        assert run.info.status == "FINISHED", name
        assert json.loads((rd / "state.json").read_text())["mlflow_run_id"] == first.info.run_id


def test_a_state_json_naming_another_runs_mlflow_run_is_refused(finished, compose, mlflow_uri):
    """Hostile or copied state: a run id that belongs to another identity is never logged into."""
    cfg, rd = finished
    (first,) = store_runs(mlflow_uri)
    other = compose(*TINY, "seed=1", f"paths.root={rd.parents[1]}", f"tracking.uri={mlflow_uri}")
    ord = run_dir(other)
    ord.mkdir(parents=True)
    (ord / "state.json").write_text(json.dumps({"mlflow_run_id": first.info.run_id}))
    with pytest.raises(UserError) as e:
        job(other)
    assert "belongs to config_hash" in one_sentence(e.value)
    (run,) = store_runs(mlflow_uri)
    assert run.info.status == "FINISHED"  # the victim is untouched


@pytest.mark.parametrize(
    "content",
    ["truncated", "garbage", "a list", "no meta", "another identity"],
)
def test_a_bad_checkpoint_in_a_finished_run_is_one_sentence_and_keeps_it_finished(
    finished, mlflow_uri, content
):
    import torch

    cfg, rd = finished
    ckpt = rd / "checkpoint.pt"
    good = ckpt.read_bytes()
    if content == "truncated":
        ckpt.write_bytes(good[: len(good) // 3])
    elif content == "garbage":
        ckpt.write_bytes(b"\x89PNG not a checkpoint" * 10)
    elif content == "a list":
        torch.save([1, 2, 3], ckpt)
    elif content == "no meta":
        torch.save({"net": {}}, ckpt)
    else:
        state = torch.load(ckpt, weights_only=True)
        state["meta"]["identity"] = "0" * 12
        torch.save(state, ckpt)
    state_before = (rd / "state.json").read_text()
    with pytest.raises(UserError) as e:
        job(cfg)
    assert str(ckpt) in one_sentence(e.value)
    (run,) = store_runs(mlflow_uri)
    assert run.info.status == "FINISHED" and "failure" not in run.data.tags
    assert (rd / "state.json").read_text() == state_before  # nothing lost


def test_an_error_while_re_evaluating_a_finished_run_keeps_it_finished(
    finished, compose, mlflow_uri, monkeypatch
):
    """A finished run asked for a new budget whose evaluation fails keeps FINISHED (its training
    and stored numbers are whole), with the error as ``last_error``; the job still fails."""
    from bench.evaluate import Evaluator

    cfg, rd = finished
    again = compose(
        *TINY[:-1],
        "eval.budgets=[1,2,4]",
        f"paths.root={rd.parents[1]}",
        f"tracking.uri={mlflow_uri}",
    )

    def broken(self, *a, **k):
        raise RuntimeError("the evaluation broke")

    monkeypatch.setattr(Evaluator, "run", broken)
    with pytest.raises(RuntimeError):
        job(again)
    (run,) = store_runs(mlflow_uri)
    assert run.info.status == "FINISHED" and "the evaluation broke" in run.data.tags["last_error"]
    state = json.loads((rd / "state.json").read_text())
    assert state["status"] == "finished" and "evaluated" in state


# -- 3. the data's content is part of the identity ------------------------------------------------
def write_images(folder: Path, names: range, size: int = 16) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in names:
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
            folder / f"{i:04d}.png"
        )


def test_a_changed_image_folder_trains_a_new_run_not_the_old_numbers(
    compose, mlflow_uri, tmp_path, capsys
):
    """The issue's case: delete ten images and add forty, rerun -- a new run directory and MLflow
    run (another config_hash), trained and evaluated on the new files, not "not retraining"."""
    imgs = tmp_path / "imgs"
    write_images(imgs, range(50))
    common = [
        "data=image_folder",
        "data.resolution=16",
        f"data.path={imgs}",
        "eval.features=pixel_pca",
    ]
    cfg = compose(*TINY, *common, f"paths.root={tmp_path}", f"tracking.uri={mlflow_uri}")
    job(cfg)
    for p in sorted(imgs.iterdir())[:10]:
        p.unlink()
    write_images(imgs, range(100, 140))
    capsys.readouterr()
    again = compose(*TINY, *common, f"paths.root={tmp_path}", f"tracking.uri={mlflow_uri}")
    job(again)
    out = capsys.readouterr().out
    assert "not retraining" not in out and "evaluating nothing more" not in out
    runs = store_runs(mlflow_uri)
    assert len(runs) == 2 and len({r.data.tags["config_hash"] for r in runs}) == 2
    assert {r.data.params["data.fingerprint"].split("-")[0] for r in runs} == {"50", "80"}
    assert len(list((tmp_path / "runs").iterdir())) == 2


def test_the_fingerprint_sees_every_change_to_the_files_read_and_nothing_else(compose, tmp_path):
    from bench.identity import identity_hash, pin_data

    imgs = tmp_path / "imgs"
    write_images(imgs, range(5))

    def identity():
        cfg = compose("data=image_folder", f"data.path={imgs}")
        pin_data(cfg)
        return identity_hash(cfg)

    seen = [identity()]
    (imgs / "notes.txt").write_text("not an image")  # not read by the loader: no change
    (imgs / ".fewstep-stats").mkdir()  # the reference-statistics cache lives here
    (imgs / ".fewstep-stats" / "fid-stats.npz").write_bytes(b"x")
    assert identity() == seen[0]
    first = imgs / "0000.png"
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))  # rewritten
    seen.append(identity())
    (imgs / "0001.png").rename(imgs / "sub.png")  # renamed
    seen.append(identity())
    write_images(imgs, range(7, 8))  # added
    seen.append(identity())
    (imgs / "sub.png").unlink()  # removed
    seen.append(identity())
    assert len(set(seen)) == len(seen)
    assert identity() == seen[-1]  # and stable


def test_a_changed_latents_store_is_another_identity(compose, tmp_path):
    import numpy as np

    from bench.identity import identity_hash, pin_data

    store = tmp_path / "lat"
    store.mkdir()
    np.save(store / "a.npy", np.zeros((8, 4, 4, 4), np.float32))

    def identity():
        cfg = compose("data=latents", f"data.path={store}")
        pin_data(cfg)
        return identity_hash(cfg)

    before = identity()
    np.save(store / "a.npy", np.ones((8, 4, 4, 4), np.float32))  # same size, new content
    st = (store / "a.npy").stat()
    os.utime(store / "a.npy", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later write
    assert identity() != before
    (store / "latents.json").write_text("{}")  # bench.encode's metadata is read too
    assert identity() not in (before,)


@pytest.mark.parametrize("count", [1, 2, 12, 39])
def test_an_image_folder_too_small_for_the_metrics_is_one_sentence_naming_the_minimum(
    compose, mlflow_uri, tmp_path, count
):
    imgs = tmp_path / "imgs"
    write_images(imgs, range(count))
    cfg = compose(
        *TINY,
        "data=image_folder",
        "data.resolution=16",
        f"data.path={imgs}",
        "eval.features=pixel_pca",
        f"paths.root={tmp_path}",
        f"tracking.uri={mlflow_uri}",
    )
    with pytest.raises(UserError) as e:
        job(cfg)
    message = one_sentence(e.value)
    assert "need at least 4" in message and "40 images at 0.1" in message
    assert not (tmp_path / "runs").exists() and not store_runs(mlflow_uri)


def test_forty_images_are_enough(compose, mlflow_uri, tmp_path):
    imgs = tmp_path / "imgs"
    write_images(imgs, range(40))
    cfg = compose(
        *TINY,
        "data=image_folder",
        "data.resolution=16",
        f"data.path={imgs}",
        "eval.features=pixel_pca",
        f"paths.root={tmp_path}",
        f"tracking.uri={mlflow_uri}",
    )
    job(cfg)
    (run,) = store_runs(mlflow_uri)
    assert run.info.status == "FINISHED" and math.isfinite(run.data.metrics["precision/steps_1"])


# -- 4. secrets reach neither disk nor the server -------------------------------------------------
def test_userinfo_in_uris_is_redacted_in_params_and_config():
    from bench.track import REDACTED, flatten, redact

    config = {
        "tracking": {"uri": "http://alice:s3cr3t@mlflow.example:5000", "experiment": "x"},
        "data": {"path": "s3://AKIAKEY:wJalr@bucket/data", "sources": ["https://tok@h/x"]},
        "paths": {"root": "/results"},
    }
    flat = flatten(config)
    assert flat["tracking.uri"] == f"http://{REDACTED}@mlflow.example:5000"
    assert flat["data.path"] == f"s3://{REDACTED}@bucket/data"
    text = json.dumps(redact(config))
    assert not any(s in text for s in ("s3cr3t", "alice", "AKIAKEY", "wJalr", "tok@"))
    assert redact({"paths": {"root": "/a@b/c"}}) == {"paths": {"root": "/a@b/c"}}  # not a URI


def test_command_line_secrets_are_moved_out_of_hydras_files(monkeypatch):
    from bench.run import hide_secrets

    argv = hide_secrets(
        ["-m", "train.steps=2", "tracking.uri=http://alice:s3cr3t@h:1", "+data.hf_token=hf_x"]
    )
    assert argv[:2] == ["-m", "train.steps=2"]
    assert argv[2] == "tracking.uri=${oc.env:FEWSTEP_SECRET_2}"
    assert argv[3] == "+data.hf_token=${oc.env:FEWSTEP_SECRET_3}"
    assert os.environ["FEWSTEP_SECRET_2"] == "http://alice:s3cr3t@h:1"
    for name in ("FEWSTEP_SECRET_2", "FEWSTEP_SECRET_3"):
        monkeypatch.delenv(name)


def test_secrets_inside_a_sweep_list_are_moved_out_too(monkeypatch, compose):
    """``-m tracking.uri=a,b``: each secret element of the list becomes an interpolation, the
    others stay as they were, and Hydra's sweeper still expands the list."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from bench.run import hide_secrets

    argv = hide_secrets(["-m", "tracking.uri=http://a:pw1@h:1,sqlite:///x.db,http://b:pw2@h:2"])
    assert "pw1" not in argv[1] and "pw2" not in argv[1]
    (o,) = OverridesParser.create().parse_overrides([argv[1]])
    values = o.value().list
    assert values == [
        "${oc.env:FEWSTEP_SECRET_1_0}",
        "sqlite:///x.db",
        "${oc.env:FEWSTEP_SECRET_1_2}",
    ]
    assert os.environ["FEWSTEP_SECRET_1_0"] == "http://a:pw1@h:1"
    assert os.environ["FEWSTEP_SECRET_1_2"] == "http://b:pw2@h:2"
    # each job resolves its element to the real value
    cfg = compose(f"tracking.uri={values[2]}")
    assert cfg.tracking.uri == "http://b:pw2@h:2"
    for name in ("FEWSTEP_SECRET_1_0", "FEWSTEP_SECRET_1_2"):
        monkeypatch.delenv(name)


@pytest.mark.slow
def test_a_password_in_the_tracking_uri_reaches_no_file_and_no_message(tmp_path):
    """The issue's case, through the real CLI and Hydra: ``tracking.uri=http://user:pw@host``
    (a server nobody listens on). Hydra's own folder (multirun.yaml, .hydra/*.yaml) and the
    error message hold ``***`` or an interpolation, never the password."""
    import socket

    from conftest import run_cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run_cli(
        "-m",
        "train.steps=1",
        # a sweep list: both elements are secrets (the first job already fails)
        f"tracking.uri=http://alice:pw-s3cr3t@127.0.0.1:{port},http://bob:pw-0ther@127.0.0.1:{port}",
        f"paths.root={tmp_path}",
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode != 0
    assert "pw-s3cr3t" not in proc.stderr + proc.stdout
    assert f"MLflow tracking URI http://***@127.0.0.1:{port} cannot be reached" in proc.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "multirun.yaml" for p in written)
    assert any(p.name == "overrides.yaml" for p in written)
    assert not [
        p for p in written if b"pw-s3cr3t" in p.read_bytes() or b"pw-0ther" in p.read_bytes()
    ]


# -- 5. signals at set-up, training and evaluation ------------------------------------------------
def signalled_job(cfg, monkeypatch, where: str, *signums):
    """``job(cfg)`` under ``Preemption`` with ``signums`` raised at ``where``: ``before_open``
    (building the evaluator), ``setup`` (after the MLflow run is opened, before training),
    ``training`` (inside step 2's loss), ``evaluation`` (inside the first budget)."""
    import signal

    import bench.run
    from bench.evaluate import Evaluator
    from bench.preemption import Preemption
    from methods.shortcut import Shortcut

    def fire():
        for s in signums:
            signal.raise_signal(s)

    if where == "before_open":
        real_make = bench.run.make_evaluator
        monkeypatch.setattr(bench.run, "make_evaluator", lambda *a: (fire(), real_make(*a))[1])
    elif where == "setup":
        real_teacher = bench.run.resolve_teacher
        monkeypatch.setattr(bench.run, "resolve_teacher", lambda *a: (fire(), real_teacher(*a))[1])
    elif where == "training":
        real_loss = Shortcut.loss

        def loss(self, nets, batch, step):
            if step == 1:
                fire()
            return real_loss(self, nets, batch, step)

        monkeypatch.setattr(Shortcut, "loss", loss)
    else:
        real_eval, calls = Evaluator.evaluate, []

        def evaluate(self, *a):
            calls.append(1)
            if len(calls) == 1:
                fire()
            return real_eval(self, *a)

        monkeypatch.setattr(Evaluator, "evaluate", evaluate)
    previous = signal.getsignal(signal.SIGINT)
    try:
        with Preemption() as preemption:
            job(cfg, preemption)
    finally:
        assert signal.getsignal(signal.SIGINT) == previous  # handlers restored
        monkeypatch.undo()


@pytest.mark.parametrize(
    "where,expected",
    [
        ("before_open", "preempted by SIGINT during the set-up; no run was opened"),
        ("setup", "preempted by SIGINT during the set-up; nothing trained yet"),
        ("training", "preempted by SIGINT at step 2; checkpoint saved to"),
        ("evaluation", "preempted by SIGINT at step 4; evaluated budgets [1] are saved"),
    ],
)
def test_ctrl_c_is_a_clean_stop_like_sigterm_wherever_it_lands(
    compose, mlflow_uri, tmp_path, monkeypatch, where, expected
):
    """SIGINT is handled as SIGTERM: recorded, acted on at the next boundary (the open, the start
    of training, the end of a step, between budgets), one sentence, the run KILLED (or never
    opened) -- never RUNNING -- and the same command resumes it to FINISHED in the same run."""
    import signal

    from bench.preemption import Preempted

    cfg = compose(*TINY, f"paths.root={tmp_path}", f"tracking.uri={mlflow_uri}")
    with pytest.raises(Preempted) as e:
        signalled_job(cfg, monkeypatch, where, signal.SIGINT)
    assert one_sentence(e.value).startswith(expected)
    runs = store_runs(mlflow_uri)
    if where == "before_open":
        assert not runs and not run_dir(cfg).exists()
    else:
        (run,) = runs
        assert run.info.status == "KILLED" and run.data.tags["preempted"].startswith("SIGINT")
    job(cfg)
    (run,) = store_runs(mlflow_uri)
    assert run.info.status == "FINISHED"
    if where == "training":  # resumed from the signalled step, not from scratch
        assert json.loads((run_dir(cfg) / "state.json").read_text())["status"] == "finished"


def test_sigterm_during_set_up_ends_the_run_killed_not_running(
    compose, mlflow_uri, tmp_path, monkeypatch
):
    import signal

    from bench.preemption import Preempted

    cfg = compose(*TINY, f"paths.root={tmp_path}", f"tracking.uri={mlflow_uri}")
    with pytest.raises(Preempted, match="SIGTERM during the set-up"):
        signalled_job(cfg, monkeypatch, "setup", signal.SIGTERM)
    (run,) = store_runs(mlflow_uri)
    assert run.info.status == "KILLED"
    assert json.loads((run_dir(cfg) / "state.json").read_text())["status"] == "preempted"


def test_ctrl_c_twice_stops_at_once_and_marks_the_run_killed(
    compose, mlflow_uri, tmp_path, monkeypatch
):
    import signal

    cfg = compose(*TINY, f"paths.root={tmp_path}", f"tracking.uri={mlflow_uri}")
    with pytest.raises(KeyboardInterrupt):
        signalled_job(cfg, monkeypatch, "setup", signal.SIGINT, signal.SIGINT)
    (run,) = store_runs(mlflow_uri)
    assert run.info.status == "KILLED"
    assert run.data.tags["failure"] == "interrupted (KeyboardInterrupt)"


# -- 6. a full disk, a failing store ----------------------------------------------------------------
def test_a_full_disk_while_saving_a_checkpoint_is_one_sentence_and_the_run_resumes(
    compose, mlflow_uri, tmp_path, monkeypatch
):
    """ENOSPC in the middle of writing checkpoint 2 of 2: one sentence naming the path, the
    temporary file removed, checkpoint 1 kept, the run FAILED with the sentence; the same command
    with room again resumes from checkpoint 1 and finishes, in the same MLflow run."""
    import errno

    import torch

    from bench import checkpoint

    cfg = compose(*TINY, f"paths.root={tmp_path}", f"tracking.uri={mlflow_uri}")
    real_save = torch.save

    def full_disk(state, f):
        if isinstance(state, dict) and state.get("step") == 4:
            Path(f).write_bytes(b"half a checkpoint")  # what a write cut short leaves
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(state, f)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(UserError) as e:
        job(cfg)
    rd = run_dir(cfg)
    message = one_sentence(e.value)
    assert message.startswith(f"cannot write checkpoint {rd / 'checkpoint.pt'} (No space left")
    assert "previous checkpoint kept" in message
    assert not list(rd.glob(".checkpoint.pt.*.tmp"))
    assert checkpoint.load(rd / "checkpoint.pt")["step"] == 2  # the previous one, whole
    (run,) = store_runs(mlflow_uri)
    assert run.info.status == "FAILED" and "No space left" in run.data.tags["failure"]
    monkeypatch.undo()
    job(cfg)
    (run,) = store_runs(mlflow_uri)
    assert run.info.status == "FINISHED" and checkpoint.load(rd / "checkpoint.pt")["step"] == 4


def test_a_full_disk_on_a_real_small_tmpfs(tmp_path):
    """The same with a real full filesystem, where the machine lets us mount one."""
    import subprocess

    import torch

    from bench import checkpoint

    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()[:80]})")
    try:
        checkpoint.save(mnt / "checkpoint.pt", {"meta": {}, "w": torch.zeros(1000)})
        with pytest.raises(UserError, match="cannot write checkpoint .*previous checkpoint kept"):
            checkpoint.save(mnt / "checkpoint.pt", {"meta": {}, "w": torch.zeros(200_000)})
        assert not list(mnt.glob(".checkpoint.pt.*.tmp"))
        assert checkpoint.load(mnt / "checkpoint.pt")["w"].shape == (1000,)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_full_disk_while_writing_state_json_keeps_the_last_whole_one(tmp_path, monkeypatch):
    import errno

    from bench.record import RunRecord, read_state

    record = RunRecord(tmp_path)
    record.state = {"status": "running", "mlflow_run_id": "abc"}
    record.save()

    def full(self, text, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    record.state["status"] = "finished"
    with pytest.raises(UserError) as e:
        record.save()
    monkeypatch.undo()
    assert one_sentence(e.value).startswith(f"cannot write {tmp_path / 'state.json'}")
    assert read_state(tmp_path)["status"] == "running" and not list(tmp_path.glob("*.tmp"))


def test_a_failing_tracking_store_during_training_does_not_stop_it(
    compose, mlflow_uri, tmp_path, monkeypatch, caplog
):
    """The store refuses the step-2 training points: training goes on, says so once, and the
    points reach the store with the step-4 ones -- the curve is whole, the run FINISHED."""
    from mlflow.tracking import MlflowClient

    cfg = compose(*TINY, f"paths.root={tmp_path}", f"tracking.uri={mlflow_uri}")
    real, refused = MlflowClient.log_batch, []

    def flaky(self, run_id, metrics=(), *a, **k):
        if any(m.key == "train/loss" and m.step == 2 for m in metrics) and not refused:
            refused.append(1)
            raise ConnectionError("the store is restarting")
        return real(self, run_id, metrics, *a, **k)

    monkeypatch.setattr(MlflowClient, "log_batch", flaky)
    with caplog.at_level("WARNING"):
        job(cfg)
    assert refused and "the tracking store failed at step 2" in caplog.text
    (run,) = store_runs(mlflow_uri)
    assert run.info.status == "FINISHED"
    curve = MlflowClient(mlflow_uri).get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in curve) == [2, 4]


# -- 7. hostile files the project reads -------------------------------------------------------------
@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[1, 2]",
        '"latents"',
        json.dumps(
            {"complete": True, "shards": "a.npy", "vae": "v", "scaling_factor": 1, "resolution": 8}
        ),
        json.dumps(
            {
                "complete": True,
                "shards": ["../../etc/passwd"],
                "vae": "v",
                "scaling_factor": 1,
                "resolution": 8,
            }
        ),
        json.dumps({"complete": True, "shards": ["a.npy"]}),
    ],
    ids=["garbage", "list", "string", "shards-not-a-list", "path-traversal", "fields-missing"],
)
def test_a_hostile_latents_json_is_one_sentence(tmp_path, content):
    import numpy as np

    from bench.data import latents

    np.save(tmp_path / "a.npy", np.zeros((8, 4, 4, 4), np.float32))
    (tmp_path / "latents.json").write_text(content)
    with pytest.raises(UserError) as e:
        latents(str(tmp_path))
    assert str(tmp_path / "latents.json") in one_sentence(e.value)


@pytest.mark.parametrize("kind", ["truncated", "garbage", "decompression-bomb"])
def test_a_hostile_image_is_one_sentence_naming_it(tmp_path, monkeypatch, kind):
    from PIL import Image

    from bench.data import image_folder

    write_images(tmp_path, range(3))
    bad = tmp_path / "0001.png"
    if kind == "truncated":
        bad.write_bytes(bad.read_bytes()[:60])
    elif kind == "garbage":
        bad.write_bytes(b"this is not an image\n" * 20)
    else:  # a small file that declares more pixels than PIL agrees to decode
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)
    with pytest.raises(UserError) as e:
        image_folder(str(tmp_path), resolution=16)
    assert "cannot read image" in one_sentence(e.value)


# -- 8. concurrent starts, for real -----------------------------------------------------------------
@pytest.mark.slow
def test_the_same_command_started_twice_at_once_trains_once(tmp_path):
    """Two real processes, one command: the second exits 2 with one sentence while the first
    trains; one MLflow run, FINISHED (the issue saw two FINISHED runs for one identity)."""
    import subprocess
    import sys
    import time

    from conftest import ROOT, run_cli

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # Long enough that the first still trains when the second has imported torch (~10 s).
    args = [*TINY, "train.steps=2000", f"paths.root={tmp_path}", f"tracking.uri={uri}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "bench.run", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not any(p.read_text() for p in (tmp_path / "runs").glob("*/.job.lock")):
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.2)
        second = run_cli(*args, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    finally:
        out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 2, second.stderr[-2000:]
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith("error: run directory ") and "is in use by another job (pid" in last
    (run,) = store_runs(uri)
    assert run.info.status == "FINISHED"
