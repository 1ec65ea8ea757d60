"""Flow matching / rectified flow (Lipman et al. 2022, arXiv 2210.02747; Liu et al. 2022,
arXiv 2209.03003).

Loss:  ``E_{t, x0, x1} || v_theta(x_t, t) - (x1 - x0) ||^2`` with ``x_t = (1 - t) x0 + t x1``.

The network is conditioned on the flow-matching level ``d = 1/128`` (it ignores step size).
Sampling is Euler with ``N`` steps; with ``N = 1`` the sample is ``x0 + v(x0, 0) = E[x1]`` for the
optimal model -- every sample collapses to the data mean, the few-step failure shortcut models fix.
A step budget is ``N`` network evaluations (doubled when CFG is on).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from bench.budget import Cost
from bench.data import Batch
from bench.dit import FLOW_MATCHING_LEVEL
from bench.errors import UserError
from bench.guidance import drop_labels
from bench.options import Probability
from methods.base import Method, Nets
from methods.common import interpolate, noise

TimeSampler = Literal["uniform", "grid128", "logit_normal"]
TIME_SAMPLERS = get_args(TimeSampler)


def sample_time(n: int, how: str, device) -> Tensor:
    """``t`` for flow-matching rows: ``U[0, 1)``, the official shortcut code's 128-grid
    ``{0, 1/128, ..., 127/128}``, or logit-normal(0, 1) (SD3)."""
    if how == "uniform":
        return torch.rand(n, device=device)
    if how == "grid128":
        return torch.randint(128, (n,), device=device).float() / 128
    if how == "logit_normal":
        return torch.sigmoid(torch.randn(n, device=device))
    raise UserError(f"unknown time sampler {how!r}; choose one of {', '.join(TIME_SAMPLERS)}")


class FlowMatching(Method):
    def __init__(
        self,
        time_sampler: TimeSampler = "uniform",
        label_dropout: Probability = 0.1,
        cfg_scale: float = 1.0,
    ):
        super().__init__()
        self.set_options(locals())

    def loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        x1, x0 = batch.x1, noise(batch)
        t = sample_time(x1.shape[0], self.time_sampler, x1.device)
        d = torch.full_like(t, FLOW_MATCHING_LEVEL)
        y = drop_labels(batch.y, self.label_dropout, nets.online.num_classes)
        v = nets.online(interpolate(x0, x1, t), t, d, y)
        loss = (v - (x1 - x0)).square().mean()
        return loss, {"loss/flow": loss.detach()}

    def cost(self) -> Cost:
        return Cost(per_sample=3.0)  # one forward and its backward per row
