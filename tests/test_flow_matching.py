"""Flow matching: the loss target, and the shared Euler sampler on fields with exact answers."""

import torch
from conftest import Analytic, bcast

from bench.data import Batch
from bench.dit import FLOW_MATCHING_LEVEL
from methods.base import Nets
from methods.flow_matching import FlowMatching


def test_loss_regresses_x1_minus_x0_at_the_interpolant():
    net = Analytic(lambda x, t, d, y: torch.zeros_like(x))
    x1, x0 = torch.randn(8, 2), torch.randn(8, 2)
    loss, _ = FlowMatching().loss(Nets(net, net), Batch(x1, None, x0), step=0)
    torch.testing.assert_close(loss, (x1 - x0).square().mean())
    xt, t, d, _ = net.calls[0]
    torch.testing.assert_close(xt, (1 - bcast(t, x0)) * x0 + bcast(t, x1) * x1)
    assert torch.all(d == FLOW_MATCHING_LEVEL)


def test_euler_is_exact_for_a_constant_field_and_a_left_riemann_sum_in_t():
    fm = FlowMatching()
    x0 = torch.randn(5, 3)
    const = Analytic(lambda x, t, d, y: torch.full_like(x, 0.7))
    for n in (1, 4, 128):
        torch.testing.assert_close(fm.sample(const, x0, n), x0 + 0.7)
    # v = 2t: Euler with t_i = i/N sums 2 i / N^2 = (N - 1) / N (the exact flow gives 1).
    ramp = Analytic(lambda x, t, d, y: 2 * bcast(t, x).expand_as(x))
    for n in (1, 2, 8):
        torch.testing.assert_close(fm.sample(ramp, x0, n), x0 + (n - 1) / n)


def test_cfg_doubles_every_evaluation():
    fm = FlowMatching(cfg_scale=2.0)
    # guided = uncond + 2 (cond - uncond) with cond = 1, uncond = 0 -> velocity 2
    net = Analytic(lambda x, t, d, y: (y != 3).float().view(-1, 1).expand_as(x), num_classes=3)
    out = fm.sample(net, torch.zeros(4, 2), 4, y=torch.tensor([0, 1, 2, 0]))
    torch.testing.assert_close(out, torch.full((4, 2), 2.0))
    assert (
        net.rows == 4 * 2 * 4
        and fm.nfe(4, conditional=True) == 8
        and fm.nfe(4, conditional=False) == 4
    )
