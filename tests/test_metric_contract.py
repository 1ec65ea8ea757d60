"""The metric walkthrough in CONTRIBUTING.md, run: a suite that returns one more metric gets it
logged, stored, floored and reused by the evaluator with no evaluator edit, and a bumped metrics
version is a new evaluation key (stored numbers are measured again, never shown beside new ones)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from bench import evaluate
from bench.data import toy2d
from bench.evaluate import Evaluator
from bench.metrics.suites import PointSuite


class WithSpread(PointSuite):
    """A throwaway metric: the mean distance of the samples from the origin."""

    def metrics(self, x, key):
        return {**super().metrics(x, key), f"spread/{key}": float(x.norm(dim=1).mean())}


class Identity:
    """A sampler that returns its noise scaled by 1/steps (so budgets differ)."""

    def sample(self, net, x0, steps, y):
        return x0 / steps

    def nfe(self, steps, conditional):
        return steps


class Nets:
    ema = online = torch.nn.Identity()


class Record:
    """What the evaluator asks of a run record, in memory."""

    def __init__(self, root: Path):
        self.dir, self.logged, self.stored = root, {}, {}

    def tags(self, tags):
        pass

    def metrics(self, m, step=0):
        self.logged.update(m)

    def artifact(self, path, where=None):
        pass

    def evaluated(self, key):
        return dict(self.stored.get(key, {}))

    def store_evaluation(self, key, settings, steps, metrics):
        self.stored.setdefault(key, {})[str(steps)] = metrics

    def evaluating(self):
        return contextlib.nullcontext()


def evaluator(data, budgets=(1, 2)):
    suite = WithSpread(data, 64, seed=0)
    return Evaluator(suite, data, 64, 0, 32, torch.device("cpu"), False, budgets, grids=False)


def test_a_new_suite_metric_is_logged_floored_and_stored_without_an_evaluator_edit(tmp_path):
    data = toy2d(n_train=256, n_test=128)
    ev, record = evaluator(data), Record(tmp_path)
    results = ev.run(Identity(), Nets(), record)
    assert {"spread/floor", "spread/steps_1", "spread/steps_2"} <= set(record.logged)
    # The sampler halves the noise at two steps: the metric sees the samples the budget made.
    assert results[2]["spread/steps_2"] < 0.6 * results[1]["spread/steps_1"]
    assert record.stored[ev.reuse_key()]["2"]["spread/steps_2"] == results[2]["spread/steps_2"]


def test_stored_metrics_are_reused_and_a_bumped_version_measures_again(tmp_path, monkeypatch):
    data = toy2d(n_train=256, n_test=128)
    ev, record = evaluator(data), Record(tmp_path)
    ev.run(Identity(), Nets(), record)
    key = ev.reuse_key()
    record.stored[key]["1"]["spread/steps_1"] = -1.0  # marks a reused number
    assert ev.run(Identity(), Nets(), record)[1]["spread/steps_1"] == -1.0
    monkeypatch.setattr(evaluate, "METRICS_VERSION", evaluate.METRICS_VERSION + 1)
    assert ev.reuse_key() != key
    assert ev.run(Identity(), Nets(), record)[1]["spread/steps_1"] > 0
