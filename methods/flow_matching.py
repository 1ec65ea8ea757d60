"""Flow matching / rectified flow (Lipman et al. 2022, arXiv 2210.02747; Liu et al. 2022,
arXiv 2209.03003).

Loss:  ``E_{t, x0, x1} || v_theta(x_t, t) - (x1 - x0) ||^2`` with ``x_t = (1 - t) x0 + t x1``.

The network is conditioned on the flow-matching level ``d = 1/128`` (it ignores step size).
Sampling is Euler with ``N`` steps; with ``N = 1`` the sample is ``x0 + v(x0, 0) = E[x1]`` for the
optimal model -- every sample collapses to the data mean, the few-step failure shortcut models fix.
A step budget is ``N`` network evaluations (doubled when CFG is on).

The official code is the shortcut repository's ``train_type=naive`` (kvfrans/shortcut-models,
commit 6010043, ``baselines/targets_naive.py``, ``TN``; its evaluation ``helper_eval.py``); every
difference is an option:

==============  ===========================  ==============================================
option          default (source)             official code
==============  ===========================  ==============================================
time_sampler    ``uniform`` (Lipman et al.)  ``grid128``: ``randint(0, 128) / 128`` (``TN:14-15``)
sigma_min       0 (Liu et al.)               1e-5: ``x_t = (1 - (1 - 1e-5) t) x0 + t x1``,
                                             target ``x1 - (1 - 1e-5) x0`` (``TN:29-30``)
label_dropout   0.1                          0.1 (``TN:9-10``, ``class_dropout_prob``)
cfg_scale       1.0 (off)                    the ``cfg_scale`` flag at every step
                                             (``helper_eval.py:204-207``)
d token         1/128                        the integer level 7 (``TN:32-33``), i.e. 1/128
embedding       ``dit``: 1000 t              ``raw``: t and the level unscaled
                                             (``model.py:82-88``, ``model.py:262``)
==============  ===========================  ==============================================
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

import torch
from torch import Tensor

from bench.budget import Cost
from bench.data import Batch
from bench.dit import FLOW_MATCHING_LEVEL
from bench.errors import UserError
from bench.guidance import drop_labels
from bench.options import Probability, Range
from methods.base import Embedding, Method, Nets
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
        sigma_min: Annotated[float, Range(0, 1, hi_open=True)] = 0.0,
        embedding: Embedding = "dit",
    ):
        super().__init__()
        self.set_options(locals())

    def loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        x1, x0 = batch.x1, noise(batch)
        t = sample_time(x1.shape[0], self.time_sampler, x1.device)
        d = torch.full_like(t, FLOW_MATCHING_LEVEL)
        y = drop_labels(batch.y, self.label_dropout, nets.online.num_classes)
        v = nets.online(interpolate(x0, x1, t, self.sigma_min), t, d, y)
        loss = (v - (x1 - (1 - self.sigma_min) * x0)).square().mean()
        return loss, {"loss/flow": loss.detach()}

    def cost(self) -> Cost:
        return Cost(per_sample=3.0)  # one forward and its backward per row
