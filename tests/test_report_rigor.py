"""The report's statistics on synthetic MLflow stores: seed groups and their t-intervals, one
identity never counted twice, protocols never mixed in a column, winners marked only when
significant, paired differences against a baseline, and stores with nothing measured.

Runs are written with the tags the harness logs (``group_hash``, ``config_hash``,
``protocol/steps_N``, ``<metric>/ci95_low|high/steps_N``); expected numbers are computed here from
the values written, with scipy, never copied from a report.
"""

import json
import shlex
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bench.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "reports"
PROTOCOL = {
    "eval.num_samples": "1000",
    "eval.noise_seed": "0",
    "eval.reference": "digits16 train (1000)",
    "eval.extractor": "classifier-digits16",
    "eval.extractor_hash": "abc123",
    "eval.metrics_version": "3",
    "eval.weights": "ema",
    "eval.batch_size": "250",
}


class Store:
    """A sqlite MLflow store in ``tmp_path`` to which runs are added one call each."""

    def __init__(self, tmp_path: Path):
        import mlflow

        self.uri = f"sqlite:///{tmp_path}/mlflow.db"
        mlflow.set_tracking_uri(self.uri)
        self.client = mlflow.tracking.MlflowClient()
        self.exp = self.client.create_experiment("bench", str(tmp_path / "artifacts"))

    def run(
        self,
        method: str,
        seed: int,
        values: dict[int, float],
        metric: str = "fd/train",
        status: str = "FINISHED",
        protocol: dict | None = PROTOCOL,
        protocols: dict[int, dict] | None = None,
        ci: dict[int, tuple[float, float]] | None = None,
        config_hash: str | None = None,
        group: str | None = None,
        extra_tags: dict | None = None,
        raw_metrics: dict | None = None,
    ) -> str:
        tags = {
            "method": method,
            "size": "tiny/4",
            "data": "digits16",
            "seed": str(seed),
            "k_ratio": "",
            "config_hash": config_hash or f"{method}-{group}-{seed}",
            "group_hash": group or f"g-{method}",
            "eval.num_samples": "1000",
            "eval.reference": "digits16 train (1000)",
            "eval.extractor": "classifier-digits16",
            **(extra_tags or {}),
        }
        for steps in values:
            p = (protocols or {}).get(steps, protocol)
            if p is not None:
                tags[f"protocol/steps_{steps}"] = json.dumps(p, sort_keys=True)
        if group == "":
            del tags["group_hash"]
        rid = self.client.create_run(self.exp, run_name=f"{method}-{seed}", tags=tags).info.run_id
        for steps, v in values.items():
            self.client.log_metric(rid, f"{metric}/steps_{steps}", v)
            self.client.log_metric(rid, f"nfe/steps_{steps}", steps)
        for steps, (lo, hi) in (ci or {}).items():
            self.client.log_metric(rid, f"{metric}/ci95_low/steps_{steps}", lo)
            self.client.log_metric(rid, f"{metric}/ci95_high/steps_{steps}", hi)
        for k, v in (raw_metrics or {}).items():
            self.client.log_metric(rid, k, v)
        self.client.log_metric(rid, "budget/forward_equivalents", 1e5)
        if status != "RUNNING":
            self.client.set_terminated(rid, status=status)
        return rid


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path)


def build(uri, out, *overrides):
    from hydra import compose, initialize_config_dir

    from reports.build import build as build_report

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[f"tracking.uri={uri}", f"out={out}", "grids=false", *overrides],
        )
    return build_report(cfg)


def row_of(md: str, method: str) -> str:
    return next(line for line in md.splitlines() if line.startswith("|") and f"/ {method} " in line)


def half(values) -> float:
    v = np.asarray(values, dtype=float)
    return float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))


def test_runs_differing_only_in_seed_are_one_cell_with_a_t_interval(store, tmp_path):
    a, b = [10.0, 11.0, 12.5], [4.0, 4.5]
    for seed, v in enumerate(a):
        store.run("shortcut", seed, {1: v, 4: b[seed]} if seed < 2 else {1: v})
    out = build(store.uri, tmp_path / "r")
    row = row_of((out / "report.md").read_text(), "shortcut")
    assert f"{np.mean(a):.2f} ± {half(a):.2f}" in row
    assert f"{np.mean(b):.2f} ± {half(b):.2f} (n=2)" in row  # fewer seeds than its row
    assert row.rstrip(" |").endswith("3")  # the seeds column
    cells = pd.read_csv(out / "cells.csv")
    cell = next(cells[cells.steps == 1].itertuples())
    assert cell.n == 3 and cell.interval == "t" and cell.seeds == "0 1 2"
    assert cell.low == pytest.approx(np.mean(a) - half(a))


def test_two_configurations_of_one_method_stay_two_rows(store, tmp_path):
    store.run("shortcut", 0, {1: 10.0}, group="lr-1")
    store.run("shortcut", 1, {1: 11.0}, group="lr-1")
    store.run("shortcut", 0, {1: 30.0}, group="lr-2")
    md = (build(store.uri, tmp_path / "r") / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| digits16 / tiny/4 / shortcut [")]
    assert len(rows) == 2, md
    assert any("10.50 ±" in r for r in rows) and any("30.00" in r and "±" not in r for r in rows)


def test_runs_without_group_hash_are_grouped_by_params_minus_seed(store, tmp_path):
    for seed, v in enumerate([4.0, 6.0]):
        rid = store.run("flow_matching", seed, {1: v}, group="")
        store.client.log_param(rid, "seed", str(seed))
        store.client.log_param(rid, "train.seed", str(seed))  # train.seed: ${seed}
        store.client.log_param(rid, "train.lr", "0.0001")
    md = (build(store.uri, tmp_path / "r") / "report.md").read_text()
    assert f"5.00 ± {half([4, 6]):.2f}" in row_of(md, "flow_matching")
    assert "2 of 2 runs carry no group_hash tag" in md


def test_one_identity_logged_twice_is_counted_once(store, tmp_path):
    store.run("shortcut", 0, {1: 10.0}, config_hash="same")
    time.sleep(0.05)
    kept = store.run("shortcut", 0, {1: 12.0}, config_hash="same")
    time.sleep(0.05)
    store.run("shortcut", 0, {}, config_hash="same", status="FAILED")  # later, but not FINISHED
    out = build(store.uri, tmp_path / "r")
    md = (out / "report.md").read_text()
    row = row_of(md, "shortcut")
    assert "12.00" in row and "±" not in row and row.rstrip(" |").endswith("1")
    assert "config same was logged 3 times (one identity, not 3 seeds)" in md
    assert kept[:8] in md
    tidy = pd.read_csv(out / "tidy.csv")
    assert tidy["run_id"].tolist() == [kept]


def test_a_clear_winner_is_bold_by_welchs_test(store, tmp_path):
    a, b = [10.0, 10.5, 9.5], [20.0, 21.0, 19.0]
    for seed in range(3):
        store.run("shortcut", seed, {1: a[seed]})
        store.run("flow_matching", seed, {1: b[seed]})
    md = (build(store.uri, tmp_path / "r") / "report.md").read_text()
    assert f"**{np.mean(a):.2f} ± {half(a):.2f}**" in row_of(md, "shortcut")
    assert "**" not in row_of(md, "flow_matching").split("|")[2]
    assert "Significant winners at 1 step: shortcut." in md
    p = stats.ttest_ind(a, b, equal_var=False).pvalue
    assert "digits16 / tiny/4, 1 step: shortcut is significantly best (Welch's t-test" in md
    assert f"p={p:.3g}" in md


def test_overlapping_seeds_are_a_tie_not_a_winner(store, tmp_path):
    a, b, c = [10.0, 12.0, 14.0], [11.0, 13.0, 15.0], [40.0, 41.0, 42.0]
    for seed in range(3):
        store.run("shortcut", seed, {1: a[seed]})
        store.run("flow_matching", seed, {1: b[seed]})
        store.run("reflow", seed, {1: c[seed]})
    md = (build(store.uri, tmp_path / "r") / "report.md").read_text()
    assert f"*{np.mean(a):.2f} ± {half(a):.2f}*" in row_of(md, "shortcut")
    assert f"*{np.mean(b):.2f} ± {half(b):.2f}*" in row_of(md, "flow_matching")
    assert "**" not in md.split("| reflow")[0].split("\n")[-1]
    reflow = row_of(md, "reflow").split("|")[2]
    assert "*" not in reflow  # significantly worse than the best: not in the tied group
    assert "digits16 / tiny/4, 1 step: no significant winner; tied: " in md
    assert "No significant difference between the best cells at 1 step." in md


def test_one_seed_is_compared_by_its_bootstrap_interval(store, tmp_path):
    store.run("shortcut", 0, {1: 10.0, 4: 5.0}, ci={1: (9.0, 11.0), 4: (4.0, 6.0)})
    store.run("flow_matching", 0, {1: 20.0, 4: 5.5}, ci={1: (18.0, 22.0), 4: (5.2, 5.8)})
    md = (build(store.uri, tmp_path / "r") / "report.md").read_text()
    sc, fm = row_of(md, "shortcut"), row_of(md, "flow_matching")
    assert "**10.00 [9.00, 11.00]**" in sc  # disjoint from [18, 22]: a winner
    assert "*5.00 [4.00, 6.00]*" in sc and "*5.50 [5.20, 5.80]*" in fm  # overlap: tied
    assert "digits16 / tiny/4, 1 step: shortcut is significantly best (95% intervals)" in md
    assert "intervals overlap" in md


def test_mixed_protocols_are_split_loudly_or_refused(store, tmp_path):
    small = {**PROTOCOL, "eval.num_samples": "32"}
    store.run("shortcut", 0, {1: 10.0})
    store.run("flow_matching", 0, {1: 3.0}, protocol=small)
    md = (build(store.uri, tmp_path / "r") / "report.md").read_text()
    assert "PROTOCOLS DIFFER" in md
    header = next(line for line in md.splitlines() if line.startswith("| data / size"))
    assert "1 step [A]" in header and "1 step [B]" in header
    assert "1 step [A]: eval.num_samples=1000" in md and "1 step [B]: eval.num_samples=32" in md
    assert "samples per budget: 1000 | 32;" in md  # not the run-level tag both runs carry
    # each column has one cell: nothing is compared across protocols
    assert "significantly best" not in md and "tied:" not in md and "has the best mean" not in md
    with pytest.raises(UserError, match=r"the 1 step results were measured under 2 protocols"):
        build(store.uri, tmp_path / "r2", "protocols=refuse")
    with pytest.raises(UserError, match=r"protocols='mix' is not allowed; choose one of split"):
        build(store.uri, tmp_path / "r3", "protocols=mix")


@pytest.mark.parametrize("field", ["eval.extractor_hash", "eval.metrics_version", "recipe"])
def test_every_protocol_field_splits_a_column(store, tmp_path, field):
    store.run("shortcut", 0, {1: 10.0})
    store.run("flow_matching", 0, {1: 3.0}, protocol={**PROTOCOL, field: "other"})
    md = (build(store.uri, tmp_path / "r") / "report.md").read_text()
    assert f"1 step [B]: {field}=other" in md or f"1 step [A]: {field}=other" in md


def test_a_run_whose_budgets_have_different_protocols_is_flagged(store, tmp_path):
    store.run(
        "shortcut",
        0,
        {1: 10.0, 2: 8.0},
        protocols={
            1: {**PROTOCOL, "eval.num_samples": "32"},
            2: {**PROTOCOL, "eval.num_samples": "16"},
        },
    )
    md = (build(store.uri, tmp_path / "r") / "report.md").read_text()
    assert "PROTOCOL MIXED WITHIN A RUN: shortcut-0" in md
    assert "steps_1: eval.num_samples=32; steps_2: eval.num_samples=16" in md


def test_old_runs_fall_back_to_run_level_eval_tags_and_say_so(store, tmp_path):
    store.run("shortcut", 0, {1: 10.0}, protocol=None)
    store.run("flow_matching", 0, {1: 5.0}, protocol=None, extra_tags={"eval.num_samples": "64"})
    md = (build(store.uri, tmp_path / "r") / "report.md").read_text()
    assert "2 runs carry no per-budget protocol" in md and "run-level eval.* tags" in md
    assert "1 step [A]: eval.num_samples=1000" in md  # run-level tags still split the column


def test_paired_differences_against_a_baseline(store, tmp_path):
    base = [10.0, 14.0, 12.0]
    new = [8.0, 12.5, 9.0]  # seed by seed below the baseline, though the seed spread is larger
    for seed in range(3):
        store.run("flow_matching", seed, {1: base[seed]})
        store.run("shortcut", seed, {1: new[seed]})
    store.run("reflow", 0, {1: 11.0})
    md = (build(store.uri, tmp_path / "r", "baseline=flow_matching") / "report.md").read_text()
    part = md.split("## Paired differences vs flow_matching")[1]
    d = np.subtract(new, base)
    assert f"**{d.mean():.2f} ± {half(d):.2f} (n=3)**" in row_of(part, "shortcut")
    assert "1.00 (1 pair)" in row_of(part, "reflow")  # 11 - 10, one common seed
    # unpaired, the same two cells are not significantly different
    assert (
        "digits16 / tiny/4, 1 step: no significant winner" in md or "significantly best" not in md
    )
    with pytest.raises(UserError, match=r"baseline='bogus' has no runs here; methods: "):
        build(store.uri, tmp_path / "r2", "baseline=bogus")


def test_a_store_whose_runs_all_failed_or_run_is_reported(store, tmp_path):
    store.run("shortcut", 0, {}, status="FAILED", extra_tags={"failure": "train.lr=nan"})
    store.run("flow_matching", 0, {}, status="RUNNING")
    out = build(store.uri, tmp_path / "r")
    md = (out / "report.md").read_text()
    assert "no run logged any metric (2 runs: 1 FAILED, 1 RUNNING)" in md
    assert "train.lr=nan" in md and "RUNNING" in row_of(md, "flow_matching")
    page = (out / "report.html").read_text()
    assert "<table" in page and "train.lr=nan" in page and "RUNNING" in page
    assert "FAILED" in (out / "table.tex").read_text()


def test_float_budget_names_are_read_as_their_integer(store, tmp_path):
    store.run("shortcut", 0, {}, raw_metrics={"fd/train/steps_2.0": 7.0, "nfe/steps_2.0": 2})
    out = build(store.uri, tmp_path / "r")
    md = (out / "report.md").read_text()
    assert "2 steps" in md and "7.00" in row_of(md, "shortcut")
    assert "budgets logged with a float step count" in md and "fd/train/steps_2.0" in md


def test_the_documented_filter_examples_are_accepted_verbatim(store, tmp_path):
    store.run("shortcut", 0, {1: 10.0})
    rid = store.run("flow_matching", 0, {1: 5.0})
    store.client.set_tag(rid, "data", "other")
    docs = (ROOT / "README.md").read_text() + (ROOT / "docs" / "reports.md").read_text()
    examples = [w for line in docs.splitlines() for w in _words(line) if w.startswith("filter=")]
    assert len(examples) >= 2, "the README and docs/reports.md show a filter example"
    for arg in examples:
        out = build(store.uri, tmp_path / "r", arg)
        md = (out / "report.md").read_text()
        assert "/ shortcut" in md and "flow_matching" not in md


def _words(line: str) -> list[str]:
    """Shell words of the backquoted snippets and command lines of one README line."""
    out = []
    for chunk in line.split("`")[1::2] + ([line] if line.startswith("python -m") else []):
        try:
            out += shlex.split(chunk, comments=True)
        except ValueError:
            continue
    return out


def test_a_malformed_filter_is_one_sentence(store, tmp_path):
    store.run("shortcut", 0, {1: 10.0})
    with pytest.raises(UserError, match=r"filter='tags.data = digits16' is not an MLflow filter"):
        build(store.uri, tmp_path / "r", "filter='tags.data = digits16'")


# -- the statistics on their own ----------------------------------------------------------------


def test_the_t_interval_covers_the_true_mean_at_its_stated_rate():
    from reports.significance import Cell

    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(4000):
        c = Cell(["0", "1", "2"], rng.normal(5.0, 2.0, 3))
        low, high, kind = c.interval
        hits += low <= 5.0 <= high
    assert kind == "t" and abs(hits / 4000 - 0.95) < 0.012


def test_a_winner_is_rarely_marked_between_equal_methods_and_usually_between_different_ones():
    from reports.significance import Cell, mark

    rng = np.random.default_rng(1)

    def win_rate(shift: float, seeds: int = 3, trials: int = 2000) -> float:
        wins = 0
        for _ in range(trials):
            cells = {
                "a": Cell([str(i) for i in range(seeds)], rng.normal(10.0, 1.0, seeds)),
                "b": Cell([str(i) for i in range(seeds)], rng.normal(10.0 + shift, 1.0, seeds)),
            }
            marks, _ = mark(cells, lower_is_better=True)
            wins += "win" in marks.values()
        return wins / trials

    assert win_rate(0.0) <= 0.06  # Welch at 5%: a false winner in at most ~5% of columns
    assert win_rate(4.0, seeds=5) >= 0.9


def test_holm_adjustment_and_interval_comparisons():
    from reports.significance import Cell, compare, holm

    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    one = lambda v, lo, hi: Cell(["0"], np.array([v]), lo, hi)  # noqa: E731
    assert compare(one(1, 0.5, 1.5), one(3, 2.5, 3.5)) == (
        "intervals",
        pytest.approx(np.nan, nan_ok=True),
        True,
    )
    assert compare(one(1, 0.5, 2.6), one(3, 2.5, 3.5))[2] is False
    assert compare(one(1, np.nan, np.nan), one(3, 2.5, 3.5))[0] == ""  # no interval: untested


def test_the_pareto_front_keeps_the_undominated_points():
    from reports.figures import pareto_front

    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([5.0, 3.0, 4.0, 1.0])
    assert pareto_front(x, y).tolist() == [0, 1, 3]
    assert pareto_front(x, y, lower_is_better=False).tolist() == [0]


def test_small_values_keep_their_digits(store, tmp_path):
    from reports.tables import fmt

    assert fmt(1.234e-6) == "1.2e-06" and fmt(0.0) == "0.00" and fmt(34.567) == "34.57"
    store.run("shortcut", 0, {1: 2.5e-6})
    store.run("shortcut", 1, {1: 3.5e-6})
    md = (build(store.uri, tmp_path / "r") / "report.md").read_text()
    assert f"3e-06 ± {fmt(half([2.5e-6, 3.5e-6]))}" in row_of(md, "shortcut")


def test_size_and_k_ratio_ablations_are_drawn_when_they_vary(store, tmp_path):
    from PIL import Image

    for seed in range(2):
        for size in ("tiny/4", "S/2"):
            for k in ("0.25", "0.5"):
                store.run(
                    "shortcut",
                    seed,
                    {1: 10.0 + seed + float(k), 4: 5.0 + seed},
                    group=f"{size}-{k}",
                    extra_tags={"size": size, "k_ratio": k},
                )
    out = build(store.uri, tmp_path / "r")
    md = (out / "report.md").read_text()
    assert "not shown: k-ratio" not in md and "not shown: fd/train vs model size" not in md
    for name in ("k_ratio", "metric_vs_size"):
        with Image.open(out / "figures" / f"{name}.png") as im:
            assert np.asarray(im.convert("L")).std() > 5
    # the two sizes are ranked apart: a winner or a tie in each block of the 1-step column
    assert "tiny/4, 1 step:" in md and "S/2, 1 step:" in md
