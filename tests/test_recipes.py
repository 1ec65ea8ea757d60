"""Recipes: the options that reproduce the official codes, and ``recipe=shared|official``.

The official values themselves are checked against the official code by tests/test_golden.py;
here: each option does what its table row says, ``recipe=official`` gives every method its own
official settings (also inside a multirun over methods), and ``recipe=shared`` leaves the run
identity of every existing configuration unchanged.
"""

from __future__ import annotations

import torch
from conftest import Analytic, bcast
from torch import nn

from bench.data import Batch
from bench.distributed import SINGLE
from bench.dit import FLOW_MATCHING_LEVEL
from methods.base import Nets, StageContext
from methods.progressive_distillation import ProgressiveDistillation


# -- progressive distillation's official options -------------------------------------------------
class Affine(nn.Module):
    """``v = a x`` with a learnable ``a`` (so online, EMA and teacher weights can differ)."""

    num_classes = 0

    def __init__(self, a: float):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))

    def forward(self, x, t, d, y=None):
        return self.a * x


def context(tmp_path, reset=lambda: None) -> StageContext:
    return StageContext(tmp_path, None, torch.device("cpu"), False, 0, reset, SINGLE)


def test_pd_clip_is_on_the_midpoint_only():
    """Official targets_progressive.py:34 clips x' to [-4, 4]; the target (l. 36) is not clipped."""
    fast = Analytic(lambda x, t, d, y: 40 * torch.ones_like(x))
    pd = ProgressiveDistillation(clip=4.0)
    pd.round, pd.round_teacher = 0, fast
    student = Analytic(lambda x, t, d, y: torch.zeros_like(x))
    x1 = x0 = torch.full((4, 3), 5.0)  # x_t = 5 at every t; x' = 5 + 40 / 128 before the clip
    loss, _ = pd.loss(Nets(student, student), Batch(x1, None, x0), 0)
    second = fast.calls[1][0]  # the midpoint the teacher's second call sees
    assert torch.equal(second, torch.full_like(second, 4.0))
    torch.testing.assert_close(loss, torch.tensor(40.0**2))  # target 40, above the clip


def test_pd_round0_guidance_only():
    """bake_cfg_scale guides round 0's teacher (its d is the flow-matching level) and no other."""
    f = lambda x, t, d, y: bcast((y == 3).float(), x) * torch.ones_like(x)  # noqa: E731
    for round_, want in ((0, 1.5), (1, 1.0)):
        teacher = Analytic(f, num_classes=4)
        pd = ProgressiveDistillation(bake_cfg_scale=1.5)
        pd.round, pd.round_teacher = round_, teacher
        student = Analytic(lambda x, t, d, y: torch.zeros_like(x), num_classes=4)
        y = torch.full((4,), 3)
        loss, _ = pd.loss(Nets(student, student), Batch(torch.zeros(4, 2), y, torch.zeros(4, 2)), 0)
        torch.testing.assert_close(loss, torch.tensor(want**2))


def test_pd_constant_d_token_in_training_and_sampling():
    pd = ProgressiveDistillation(d_conditioning="constant")
    for r in (0, 3, 6):
        teacher = Analytic(lambda x, t, d, y: x)
        pd.round, pd.round_teacher = r, teacher
        student = Analytic(lambda x, t, d, y: x)
        pd.loss(Nets(student, student), Batch(torch.randn(4, 2), None, torch.randn(4, 2)), 0)
        tokens = torch.cat([c[2] for c in teacher.calls + student.calls])
        assert torch.all(tokens == FLOW_MATCHING_LEVEL)
    assert {pd.step_size(n) for n in (1, 8, 64)} == {FLOW_MATCHING_LEVEL}
    assert ProgressiveDistillation().step_size(8) == 1 / 8


def test_pd_official_round_start(tmp_path):
    """teacher_weights=ema, ema_rate=None, reset_optimizer=false, lr_schedule=constant: the EMA
    teaches and keeps running, the optimizer state survives, the learning rate is constant."""
    resets = []
    pd = ProgressiveDistillation(
        teacher_weights="ema", ema_rate=None, reset_optimizer=False, lr_schedule="constant"
    )
    ctx = context(tmp_path, lambda: resets.append(1))
    pd.bind(ctx)
    pd.attach_teacher(Affine(1.0))
    nets = Nets(online=Affine(2.0), ema=Affine(3.0))
    pd.begin_stage(2, nets, ctx, fresh=True)
    assert pd.round_teacher.a.item() == 3.0 and nets.ema.a.item() == 3.0 and not resets
    assert pd.lr_factor(15, 70) == 1.0 and pd.ema_rate is None
    pd.begin_stage(0, nets, ctx, fresh=True)  # round 0: everything starts as the teacher
    assert pd.round_teacher.a.item() == nets.online.a.item() == nets.ema.a.item() == 1.0

    default = ProgressiveDistillation()
    default.bind(ctx)
    default.attach_teacher(Affine(1.0))
    nets = Nets(online=Affine(2.0), ema=Affine(3.0))
    default.begin_stage(2, nets, ctx, fresh=True)
    assert default.round_teacher.a.item() == 2.0 and nets.ema.a.item() == 2.0 and resets == [1]
    assert default.ema_rate == 0.0 and default.lr_factor(15, 70) == 0.5
