"""The report builder against an MLflow store with known runs (a failed run, a missing cell)."""

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats

from bench.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "reports"
VOID = {"meta", "img", "br", "hr", "link", "input"}


def make_run(client, exp, tags, metrics, status="FINISHED", grids=()):
    run = client.create_run(exp, run_name=f"{tags['method']}-{tags['seed']}", tags=tags)
    rid = run.info.run_id
    for k, v in metrics.items():
        client.log_metric(rid, k, v)
    for step, loss in [(10, 1.0), (20, 0.5)]:
        client.log_metric(rid, "train/loss", loss, step=step)
    if "fd/train/steps_1" in metrics:  # evaluation during training (bench.curves), two budgets
        for steps in (1, 4):
            for step, fall in [(10, 3.0), (20, 2.0), (30, 1.5)]:
                value = metrics[f"fd/train/steps_{steps}"] * fall
                client.log_metric(rid, f"curve/fd/train/steps_{steps}", value, step=step)
                client.log_metric(rid, f"curve/fd/train/ci95_low/steps_{steps}", 0.0, step=step)
    for grid in grids:
        client.log_artifact(rid, str(grid), "grids")
    client.set_terminated(rid, status=status)
    return rid


@pytest.fixture
def store(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    client = mlflow.tracking.MlflowClient()
    exp = client.create_experiment("bench", artifact_location=str(tmp_path / "artifacts"))
    grids = {}
    for method, shade in (("shortcut", 255), ("flow_matching", 128)):
        for steps in (1, 4, 128):
            grid = tmp_path / method / f"steps_{steps}.png"
            grid.parent.mkdir(exist_ok=True)
            noise = np.random.default_rng(steps).random((34, 34))  # one noise for every method
            Image.fromarray((noise * shade).astype(np.uint8)).save(grid)
            grids.setdefault(method, []).append(grid)
    common = {
        "size": "tiny/4",
        "data": "digits16",
        "eval.num_samples": "1000",
        "eval.reference": "digits16 train",
        "eval.extractor": "classifier-digits16",
        "eval.extractor_hash": "abc123",
    }
    budget = {
        "budget/train_samples": 128000,
        "budget/forward_equivalents": 4.5e5,
        "budget/train_wall_s": 100,
    }
    for seed, (one, four, last) in enumerate([(10.0, 5.0, 2.0), (12.0, 7.0, 2.5)]):
        make_run(
            client,
            exp,
            {**common, "method": "shortcut", "seed": str(seed), "k_ratio": "0.25"},
            {
                "fd/train/steps_1": one,
                "fd/train/steps_4": four,
                "fd/train/steps_128": last,
                "nfe/steps_1": 1,
                "nfe/steps_4": 4,
                "nfe/steps_128": 256,
                **budget,
            },
            grids=grids["shortcut"] if seed == 0 else (),
        )
    # flow matching was never evaluated at 128 steps: a missing cell
    make_run(
        client,
        exp,
        {**common, "method": "flow_matching", "seed": "0", "k_ratio": ""},
        {
            "fd/train/steps_1": 100.0,
            "fd/train/steps_4": 4.0,
            "nfe/steps_1": 1,
            "nfe/steps_4": 4,
            **budget,
        },
        grids=grids["flow_matching"][:2],
    )
    make_run(
        client,
        exp,
        {
            **common,
            "method": "consistency",
            "seed": "0",
            "k_ratio": "",
            "failure": "training diverged at step 7",
        },
        {},
        status="FAILED",
    )
    return uri


def build(uri, out, *overrides):
    from hydra import compose, initialize_config_dir

    from reports.build import build as build_report

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config", overrides=[f"tracking.uri={uri}", f"out={out}", *overrides]
        )
    return build_report(cfg)


def test_tables_hold_exactly_the_logged_numbers(store, tmp_path):
    out = build(store, tmp_path / "report")
    md = (out / "report.md").read_text()
    row = next(l for l in md.splitlines() if "/ shortcut" in l)
    # mean +- half-width of the 95% t-interval over the two seeds (t_{0.975,1} s / sqrt(2))
    half = lambda a, b: stats.t.ppf(0.975, 1) * np.std([a, b], ddof=1) / np.sqrt(2)  # noqa: E731
    assert f"11.00 ± {half(10, 12):.2f}" in row and f"6.00 ± {half(5, 7):.2f}" in row
    assert f"2.25 ± {half(2, 2.5):.2f}" in row
    fm = next(l for l in md.splitlines() if "/ flow_matching" in l)
    # one seed, no bootstrap bounds: the best mean cannot be tested, and says so (°)
    assert "100.00" in fm and "**4.00**°" in fm and "not measured" in fm
    assert "**6.00" not in row and "*6.00" not in row
    failed = next(l for l in md.splitlines() if "/ consistency" in l)
    assert "failed: training diverged at step 7" in failed
    assert "1:1, 4:4, 128:256" not in row and "128:256" in row  # NFE differs from steps only at 128
    assert "450,000" in row  # forward-equivalents budget column
    assert "samples per budget: 1000" in md and "classifier-digits16 (weights abc123)" in md

    tidy = pd.read_csv(out / "tidy.csv")
    sc = tidy[(tidy.method == "shortcut") & (tidy.metric == "fd/train") & (tidy.steps == 1)]
    assert sorted(sc.value) == [10.0, 12.0]
    tex = (out / "table.tex").read_text()
    assert "\\textbf{4.00}$^\\circ$" in tex and "\\begin{tabular}" in tex
    assert f"11.00 $\\pm$ {half(10, 12):.2f}" in tex


def test_curves_during_training_are_the_logged_histories_per_budget(store, tmp_path):
    """eval.every's curves (curve/<metric>/steps_N at each training step): every logged point,
    labelled by the run's table row and its budget, intervals' bounds left out."""
    out = build(store, tmp_path / "report")
    curves = pd.read_csv(out / "eval_curves.csv")
    assert set(curves.columns) >= {"row", "seed", "budget", "step", "value"}
    sc = curves[curves["row"].str.contains("shortcut")]
    assert len(sc) == 2 * 2 * 3  # two seeds x two budgets x three training steps
    one = sc[(sc.budget == 1) & (sc.step == 20)].sort_values("seed")
    assert one["value"].tolist() == [10.0 * 2.0, 12.0 * 2.0]
    assert (curves["value"] > 0).all(), "the ci95 bounds are not curves"
    assert "fd/train during training" in (out / "report.md").read_text()
    # A curve point is measured at the curves' own sample count: never a table cell under the
    # final evaluation's protocol.
    tidy = pd.read_csv(out / "tidy.csv")
    assert not tidy["metric"].str.startswith("curve/").any()


def test_figures_grids_and_a_well_formed_local_html(store, tmp_path):
    out = build(store, tmp_path / "report")
    for name in ("metric_vs_nfe", "metric_vs_compute", "samples", "loss", "eval_curves"):
        path = out / "figures" / f"{name}.png"
        with Image.open(path) as im:
            assert im.width > 100 and np.asarray(im.convert("L")).std() > 5
        assert path.with_suffix(".pdf").read_bytes().startswith(b"%PDF")
    # rows = configurations with grids, columns = 1 / 4 / 128 steps
    with Image.open(out / "figures" / "samples.png") as im:
        assert im.height > 1.2 * 2.4 * 130 and im.width > 3 * 2.4 * 130
    tex = (out / "figures.tex").read_text()
    for pdf in ("metric_vs_nfe.pdf", "samples.pdf", "metric_vs_compute.pdf", "eval_curves.pdf"):
        assert f"\\includegraphics[width=\\linewidth]{{figures/{pdf}}}" in tex

    class Checker(HTMLParser):
        def __init__(self):
            super().__init__()
            self.stack, self.refs = [], []

        def handle_starttag(self, tag, attrs):
            self.refs += [v for k, v in attrs if k in ("src", "href") and v]
            if tag not in VOID:
                self.stack.append(tag)

        def handle_endtag(self, tag):
            assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"

    checker = Checker()
    checker.feed((out / "report.html").read_text())
    assert checker.stack == []
    assert checker.refs, "the report shows figures"
    for ref in checker.refs:
        target = (out / ref).resolve()
        assert "://" not in ref and target.is_relative_to(out.resolve()) and target.exists(), ref
    assert any("grids/" in r and r.endswith("steps_1.png") for r in checker.refs)


def test_empty_and_unreachable_stores_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="no runs found"):
        build(f"sqlite:///{tmp_path}/empty.db", tmp_path / "r")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    with pytest.raises(UserError, match="127.0.0.1:9"):
        build("http://127.0.0.1:9", tmp_path / "r")


def test_an_unlogged_metric_names_what_was_logged(store, tmp_path):
    with pytest.raises(
        UserError, match=r"metric 'fid' was not logged by these runs; logged: fd/train"
    ):
        build(store, tmp_path / "r", "metric=fid")


def test_budgets_picks_the_columns_and_refuses_what_is_not_a_step_count(store, tmp_path):
    """Runs evaluated at more budgets than a table needs (a shared run reused by a smaller
    experiment): ``budgets=[1,128]`` keeps those columns only, and says so above the table."""
    out = build(store, tmp_path / "two", "budgets=[1,128]", "grids=false")
    md = (out / "report.md").read_text()
    header = next(l for l in md.splitlines() if l.startswith("| data"))
    assert "1 step" in header and "128 steps" in header and "4 steps" not in header
    assert "step budgets shown: 1, 128 (budgets=[1, 128])" in md
    tidy = pd.read_csv(out / "tidy.csv")
    assert set(tidy.steps) == {1, 128}
    for bad, named in (("[0]", "0"), ("[-4]", "-4"), ("[1.5]", "1.5"), ("abc", "abc"),
                       ("[true]", "True")):  # fmt: skip
        with pytest.raises(UserError, match=rf"budgets=.*{re.escape(named)}.*whole numbers of steps"):
            build(store, tmp_path / "bad", f"budgets={bad}", "grids=false")
    with pytest.raises(UserError, match=r"budgets=\[8\]: none was logged by these runs; logged: 1, 4, 128"):
        build(store, tmp_path / "none", "budgets=[8]", "grids=false")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    CHROMIUM is None, reason="no headless Chromium installed (.ci/run installs Debian's chromium)"
)
def test_the_html_report_renders_in_a_real_headless_browser(store, tmp_path):
    out = build(store, tmp_path / "report")
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--hide-scrollbars",
            "--window-size=1200,4000",
            f"--screenshot={shot}",
            (out / "report.html").resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert shot.exists(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (4000, 1200)
    top, below = pixels[:400], pixels[400:]
    assert (top < 128).mean() > 0.01, "the title and table render as dark text"
    # every figure is a block of non-white rows; the report shows at least its four figures
    rows_drawn = (below < 250).mean(axis=1) > 0.05
    blocks = np.flatnonzero(np.diff(rows_drawn.astype(int)) == 1)
    assert below.std() > 20 and len(blocks) >= 4, "the figures render below the table"
