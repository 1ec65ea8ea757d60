"""Every stored metric carries the protocol it was measured under (issue: numbers you can trust).

A run evaluated at one sample count and then re-evaluated at another for some budgets holds
budgets of two protocols. Each budget's tags (``protocol/steps_N``: the settings as JSON,
``protocol_key/steps_N``: the reuse key) name the protocol of the numbers the tracking run shows
for it, and the printed table names the budgets it does not show, never as rows of its own.
"""

from __future__ import annotations

import json

import pytest
import torch

from bench.data import toy2d
from bench.evaluate import Evaluator
from bench.metrics.suites import PointSuite
from bench.record import RunRecord


class Scaled:
    """A sampler that returns its noise scaled by 1/steps (so budgets differ)."""

    def sample(self, net, x0, steps, y):
        return x0 / steps

    def nfe(self, steps, conditional):
        return steps


class Nets:
    ema = online = torch.nn.Identity()


class Tracker:
    """The latest value of every tag and metric, as the tracking store shows them."""

    def __init__(self):
        self.tags, self.metrics = {}, {}

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_metrics(self, metrics, step=0):
        self.metrics.update(metrics)

    def log_artifact(self, path, folder=None):
        pass


def evaluate(data, record, n, budgets, capsys):
    ev = Evaluator(PointSuite(data, n, 0), data, n, 0, n, torch.device("cpu"), False, budgets)
    ev.grids = False
    results = ev.run(Scaled(), Nets(), record)
    return ev, results, capsys.readouterr().out


def test_each_budget_carries_its_own_protocol_and_the_table_names_the_others(tmp_path, capsys):
    data = toy2d(n_train=256, n_test=128)
    record = RunRecord(tmp_path)
    record.tracker = tracker = Tracker()

    at64, results64, _ = evaluate(data, record, 64, (1, 2), capsys)
    assert tracker.tags["protocol_key/steps_2"] == at64.reuse_key()
    assert json.loads(tracker.tags["protocol/steps_2"]) == at64.settings()

    # Budget 1 again at 32 samples: budget 2 keeps its 64-sample protocol, and says so.
    at32, results32, out = evaluate(data, record, 32, (1,), capsys)
    assert at32.reuse_key() != at64.reuse_key()
    assert tracker.tags["protocol_key/steps_1"] == at32.reuse_key()
    assert tracker.tags["protocol_key/steps_2"] == at64.reuse_key()
    assert json.loads(tracker.tags["protocol/steps_1"])["eval.num_samples"] == "32"
    assert tracker.metrics["energy/steps_1"] == results32[1]["energy/steps_1"]
    assert tracker.metrics["energy/steps_2"] == results64[2]["energy/steps_2"]
    (note,) = [line for line in out.splitlines() if "NOT IN THIS TABLE" in line]
    assert "steps 2" in note and "num_samples=64 (here 32)" in note
    assert not [line for line in out.splitlines() if line.lstrip().startswith("2 ")]
    assert tracker.tags["eval.other_protocol_budgets"] == "2"

    # The first protocol again: reused from the record, and shown with its protocol again.
    _, again, out = evaluate(data, record, 64, (1, 2), capsys)
    assert "evaluating nothing more" in out and "NOT IN THIS TABLE" not in out
    assert tracker.tags["eval.other_protocol_budgets"] == "none"
    assert tracker.tags["protocol_key/steps_1"] == at64.reuse_key()
    assert (
        tracker.metrics["energy/steps_1"]
        == results64[1]["energy/steps_1"]
        == again[1]["energy/steps_1"]
    )
    assert RunRecord(tmp_path).state["latest"] == {"1": at64.reuse_key(), "2": at64.reuse_key()}


def test_the_bootstrap_setting_is_part_of_the_protocol_and_checked(compose):
    from bench.build import make_evaluator
    from bench.data import digits16
    from bench.errors import UserError

    data = digits16()

    def evaluator(*overrides):
        cfg = compose("eval.features=pixel_pca", "eval.num_samples=64", *overrides)
        return make_evaluator(cfg, data, torch.device("cpu"), False)

    base, fewer = evaluator(), evaluator("eval.bootstrap=50")
    assert "200 resamples" in base.protocol()["eval.bootstrap"]
    assert base.reuse_key() != fewer.reuse_key()
    assert evaluator("eval.bootstrap=0").protocol()["eval.bootstrap"] == "none"
    with pytest.raises(UserError, match=r"eval.bootstrap=-1 is not allowed"):
        evaluator("eval.bootstrap=-1")
