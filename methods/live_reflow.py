"""Live reflow: the single-stage reflow baseline of the shortcut paper (Frans, Hafner, Levine,
Abbeel, ICLR 2025, arXiv 2410.12557), after reflow (Liu, Gong, Liu, arXiv 2209.03003).

Instead of a second stage on stored pairs, every batch makes its own: a fraction ``reflow_ratio``
of the rows pairs fresh noise ``z`` with the current model's 8-step Euler sample of it (no gradient,
EMA weights by default, every step at the flow-matching level ``d = 1/128``, ``t_j = j / 8``):

    x1_hat = Euler_8(z);   x_t = (1 - t) z + t x1_hat,  t ~ U[0, 1);   s(x_t, t, 1) -> x1_hat - z

i.e. the straight line from the noise to its own sample, taught at ``d = 1``. The other rows are
flow matching at ``d = 1/128``: ``s(x_t, t, 1/128) -> x1 - x0``. Loss: plain MSE over all rows.

Sampling is Euler with ``N`` steps (``N`` evaluations). The network knows two tokens only: ``d = 1``
(the straightened flow of the live pairs) and ``d = 1/128`` (the curved marginal flow). A budget
below ``flow_level_from`` (default 128, as the official evaluation) queries ``d = 1`` at every
step -- the reflowed field is nearly straight, so few Euler steps suffice, and a 1-step sample is
``z + s(z, 0, 1)``, exactly what the reflow rows train; budgets from ``flow_level_from`` up query
the flow-matching level. CFG applies only at the flow-matching level (the reflow rows never see the
null label), doubling those evaluations.

The official code is kvfrans/shortcut-models (commit 6010043), ``baselines/targets_livereflow.py``
(``TL``), ``train.py``, ``helper_eval.py``; every difference is an option:

=================  ===========================  ==========================================
option             default (source)             official code
=================  ===========================  ==========================================
reflow_ratio       0.25 (the shortcut k_ratio)  0.125: ``batch_size // bootstrap_every``,
                                                ``bootstrap_every = 8`` (``TL:26``, ``train.py:63``)
gen_weights        ``ema``                      ``online``: ``train_state.call_model``, the live
                                                parameters (``TL:33``, ``TL:39``)
gen_steps          8 (paper)                    8, each at the flow-matching level (``TL:31``)
gen_cfg_scale      1.0 (off)                    the training ``cfg_scale`` flag baked into the
                                                pairs when class-conditional (``TL:32-42``)
fm_time            ``uniform`` (U[0, 1))        ``grid128`` for both kinds of row (``TL:13-14``,
                                                ``TL:48-49``)
flow_level_from    128 (official)               d = 1 below 128 steps, level 7 at 128
                                                (``helper_eval.py:197-198``)
label_dropout      0.1 on flow rows (both)      0.1 on flow rows; reflow rows: real labels
                                                (``TL:10-11``, ``TL:57``)
embedding          ``dit``: 1000 t              ``raw`` (``model.py:82-88``, ``model.py:262``)
distinct rows      yes                          reflow rows reuse the first flow rows' noise
                                                and times and drop the last data rows
                                                (``TL:27``, ``TL:48``, ``TL:53-57``)
sigma_min          0 (no option)                1e-5 (``TL:20-21``, ``TL:51``); the golden
                                                tests map it out
=================  ===========================  ==========================================
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from torch import Tensor, nn

from bench.budget import Cost
from bench.data import Batch
from bench.dit import FLOW_MATCHING_LEVEL
from bench.guidance import drop_labels
from bench.options import Probability, Range
from methods.base import MAX_STEPS, Budget, Embedding, Method, Nets
from methods.common import Regression, euler, interpolate, leading_rows, noise, regression_loss
from methods.flow_matching import TimeSampler, sample_time


class LiveReflow(Method):
    def __init__(
        self,
        reflow_ratio: Annotated[float, Range(0, 1, hi_open=True)] = 0.25,
        gen_weights: Literal["ema", "online"] = "ema",
        gen_steps: Budget = 8,
        gen_cfg_scale: float = 1.0,
        fm_time: TimeSampler = "uniform",
        flow_level_from: Budget = MAX_STEPS,
        label_dropout: Probability = 0.1,
        cfg_scale: float = 1.0,
        embedding: Embedding = "dit",
    ):
        super().__init__()
        self.set_options(locals())

    # -- training ------------------------------------------------------------------------------
    def split(self, batch_size: int) -> int:
        """Number of reflow rows (the first ones); floor keeps at least one flow-matching row."""
        return leading_rows(self.reflow_ratio, batch_size)

    def generate(self, net: nn.Module, z: Tensor, y: Tensor | None) -> Tensor:
        """``gen_steps`` Euler steps from ``z`` at the flow-matching level (guided if asked)."""
        return euler(net, z, self.gen_steps, FLOW_MATCHING_LEVEL, y, self.gen_cfg_scale)

    def targets(self, nets: Nets, batch: Batch) -> Regression:
        """Inputs and regression targets for every row; reflow rows come first."""
        x1, y, n = batch.x1, batch.y, len(batch)
        x0, m = noise(batch), self.split(n)

        # Reflow rows [0, m): their own noise, the model's sample of it, the straight line between.
        z, y_r = x0[:m], None if y is None else y[:m]  # real labels, as the pairs were made
        gen_net = nets.ema if self.gen_weights == "ema" else nets.online
        x1_hat = self.generate(gen_net, z, y_r) if m else z
        t_r = sample_time(m, self.fm_time, x1.device)
        xt_r = interpolate(z, x1_hat, t_r)

        # Flow-matching rows [m, n): the level-7 token, target x1 - x0, label dropout for CFG.
        t_f = sample_time(n - m, self.fm_time, x1.device)
        xt_f = interpolate(x0[m:], x1[m:], t_f)
        y_f = drop_labels(None if y is None else y[m:], self.label_dropout, nets.online.num_classes)
        return Regression(
            xt=torch.cat([xt_r, xt_f]),
            t=torch.cat([t_r, t_f]),
            d=torch.cat([torch.ones_like(t_r), torch.full_like(t_f, FLOW_MATCHING_LEVEL)]),
            y=None if y is None else torch.cat([y_r, y_f]),
            target=torch.cat([x1_hat - z, x1[m:] - x0[m:]]),
            num_consistency=m,
        )

    def loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        return regression_loss(nets.online, self.targets(nets, batch), "reflow")

    # -- sampling ------------------------------------------------------------------------------
    def step_size(self, steps: int) -> float:
        return FLOW_MATCHING_LEVEL if steps >= self.flow_level_from else 1.0

    def guided(self, steps: int) -> bool:
        return self.cfg_scale != 1.0 and self.step_size(steps) == FLOW_MATCHING_LEVEL

    def cost(self) -> Cost:
        # One fwd+bwd on every row plus gen_steps no-grad forwards on the reflow rows; baked
        # guidance (class-conditional data only) doubles those forwards.
        gen = self.gen_steps * self.reflow_ratio * (2.0 if self.gen_cfg_scale != 1.0 else 1.0)
        return Cost(per_sample=3.0 + gen)
