"""Every method's loss is finite and falls on a toy set through the same contract."""

import pytest
import torch

from bench.data import Batch, toy_points
from bench.ema import EMA
from bench.mlp import VelocityMLP
from methods.base import Nets
from methods.consistency import Consistency
from methods.flow_matching import FlowMatching
from methods.live_reflow import LiveReflow
from methods.progressive_distillation import ProgressiveDistillation
from methods.reflow import Reflow
from methods.shortcut import Shortcut

STEPS = 200


def pd_with_teacher():
    pd = ProgressiveDistillation()
    torch.manual_seed(1)
    teacher = VelocityMLP((2,), 64, 3)
    torch.nn.init.normal_(teacher.out.weight, std=0.1)  # a non-trivial fixed teacher field
    pd.attach_teacher(teacher)
    pd.round = 3  # 8-step students
    return pd


@pytest.mark.parametrize(
    "make",
    [
        FlowMatching,
        Shortcut,
        lambda: Consistency(total_steps=STEPS),
        LiveReflow,
        Reflow,
        pd_with_teacher,
    ],
    ids=[
        "flow_matching",
        "shortcut",
        "consistency",
        "live_reflow",
        "reflow_stage1",
        "progressive_distillation",
    ],
)
def test_loss_is_finite_and_falls(make):
    torch.manual_seed(0)
    method = make()
    net = VelocityMLP((2,), 64, 3)
    ema = EMA(net, 0.99, warmup=True)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for step in range(STEPS):
        x1 = toy_points("8gaussians", 128, step)
        loss, _ = method.loss(Nets(net, ema.net), Batch(x1), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(net, step)
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:40]) / 40, sum(losses[-40:]) / 40
    assert last < first, f"loss did not fall: {first:.4f} -> {last:.4f}"
