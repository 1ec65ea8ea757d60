"""Each method's stated training cost equals what it really calls (CountingNet)."""

import pytest
import torch

from bench.budget import CountingNet, training_budget
from bench.data import Batch
from bench.mlp import VelocityMLP
from methods.base import Nets
from methods.flow_matching import FlowMatching
from methods.reflow import Reflow
from methods.shortcut import Shortcut


def measured(method, batch_size=700, y=None):
    torch.manual_seed(0)
    online, ema = (
        CountingNet(VelocityMLP((2,), 16, 2, num_classes=5)),
        CountingNet(VelocityMLP((2,), 16, 2, num_classes=5)),
    )
    batch = Batch(torch.randn(batch_size, 2), y)
    method.loss(Nets(online, ema), batch, 0)
    return (online.forward_equivalents() + ema.forward_equivalents()) / batch_size


@pytest.mark.parametrize(
    "method",
    [
        FlowMatching(),
        Shortcut(k_ratio=0.25),
        Shortcut(k_ratio=0.5, target_weights="online"),
        Shortcut(k_ratio=0.0),
        Reflow(),
    ],
)
def test_stated_cost_equals_counted_calls(method):
    assert measured(method) == pytest.approx(method.cost()["forward_equivalents_per_sample"])


def test_baked_cfg_cost_matches_in_expectation():
    y = torch.randint(5, (7000,))
    sc = Shortcut(k_ratio=0.25, bake_cfg_scale=1.5)
    assert measured(sc, 7000, y) == pytest.approx(
        sc.cost()["forward_equivalents_per_sample"], rel=0.01
    )


def test_training_budget_figures():
    b = training_budget(Shortcut(k_ratio=0.25), steps=1000, batch_size=128)
    assert b == {"budget/train_samples": 128000, "budget/forward_equivalents": 128000 * 3.5}
