"""alpha-Flow (Zhang, Siarohin, Menapace, Vasilkovsky, Tulyakov, Qu, Skorokhodov; "AlphaFlow:
Understanding and Improving MeanFlow Models", arXiv 2510.20771). Official code:
``snap-research/alphaflow`` at b0fef77 (below: ``loss.py`` = ``src/training/loss.py``,
``experiments.yaml`` = ``infra/experiments/experiments-alphaflow.yaml``).

The network is MeanFlow's: ``u(z_t, t, d)``, the average velocity of the step from ``t`` to
``s = t + d`` (project time, ``t = 0`` noise; ``methods/meanflow.py`` for the conversion from the
paper's reversed time). alpha-Flow replaces MeanFlow's derivative by a finite step of a share
``alpha`` of the interval: with ``v = x1 - x0`` and ``z_m = z_t + alpha d v`` at ``m = t + alpha d``,

    u_tgt = alpha v + (1 - alpha) u_theta-(z_m, m, (1 - alpha) d)           (0 < alpha <= 1)
    loss  = w * || u_theta(z_t, t, d) - sg(u_tgt) ||^2,   w = sg(1 / (||.||^2 + c)^p) (x alpha on d > 0 rows)

``alpha = 1`` is trajectory flow matching (the target is ``v`` on every row: flow matching asked
for the average velocity); ``alpha -> 0`` is MeanFlow: ``u_tgt -> v + d du/dt`` (a first-order
expansion of ``u_theta-`` at ``z_t``), and at ``alpha = 0`` the MeanFlow JVP target is used
(loss.py:378-401). Rows with ``d = 0`` (a share ``1 - ratio``) are plain flow-matching rows at
every ``alpha``. **The curriculum** moves ``alpha`` from 1 to 0 over the run (loss.py:307-335):
``alpha = a0 + (a1 - a0) sigmoid(gamma (step - mid) / (stop - start))``, snapped to 0 below
``alpha_clamp`` (and to 1 above ``1 - alpha_clamp``), so the run ends as MeanFlow.

Sampling is MeanFlow's: ``N`` Euler steps ``z <- z + (1/N) u(z, i/N, 1/N)``, ``N`` evaluations.
Cost: 4 forward-equivalents per row in every phase -- the forward with gradient (3) plus either the
no-grad forward at ``z_m`` (``alpha > 0``) or the JVP's tangent pass (``alpha = 0``), plus what
folded guidance adds (MeanFlow's). The official code skips the ``u_theta-`` call when ``alpha = 1``
(its coefficient is 0, loss.py:407-410); here it is made and multiplied by 0, so every step costs
what ``cost()`` states.

=================  ===============================  ===========================================
option             default (source)                 official code
=================  ===============================  ===========================================
alpha schedule     sigmoid 1 -> 0 over the whole    sigmoid, initial 1, end 0, gamma 25, clamp
                   run, gamma 25, clamp 0.005       0.005, steps 0 -> max_steps (experiments.yaml
                   (official B-2)                   ``alphaflow-sigmoid-latentspace-B-2``)
ratio (d > 0 rows) 0.5 (official B-2)               ``ratio_fm`` 0.5 (0.25 with CFG training)
alpha_weight       alpha (official)                 ``weight_d = alpha`` on d > 0 rows before the
                                                    adaptive weight (loss.py:446-449)
p, c               1, 1e-3 (MeanFlow's here)        1, ``adaptive_loss_weight_eps``, on the
                                                    per-element mean (MeanFlow's here: the sum)
time_sampler       MeanFlow's (logit-normal -0.4,   logit-normal per config, (t, r) by minmax
                   1, t = max, r = min)
clamp_utgt         none                             ``clamp_utgt`` clips ``u_tgt`` (loss.py:413);
                                                    4.0 in the CFG-training MeanFlow configs
guidance           MeanFlow's omega / kappa (off)   omega 1, kappa 0 (B-2)
=================  ===============================  ===========================================
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from torch import Tensor

from bench.data import Batch
from bench.options import Positive, PositiveInt, Probability, Range
from methods.base import Nets
from methods.common import bcast, interpolate, noise
from methods.meanflow import Interval, MeanFlow


class AlphaFlow(MeanFlow):
    def __init__(
        self,
        total_steps: PositiveInt,  # the run's training steps (${train.steps}): the curriculum spans them
        alpha_schedule: Literal["sigmoid", "linear", "constant"] = "sigmoid",
        alpha_start: Probability = 1.0,
        alpha_end: Probability = 0.0,
        alpha_from: Probability = 0.0,  # share of the run where the change starts
        alpha_to: Probability = 1.0,  # ... and ends
        gamma: Positive = 25.0,
        alpha_clamp: Annotated[float, Range(0, 0.5)] = 0.005,
        alpha_weight: Literal["alpha", "one"] = "alpha",
        ratio: Probability = 0.5,
        time_sampler: Literal["logit_normal", "uniform"] = "logit_normal",
        time_mu: float = -0.4,
        time_sigma: Positive = 1.0,
        p: Annotated[float, Range(0)] = 1.0,
        c: Positive = 1e-3,
        omega: float = 1.0,
        kappa: float = 0.0,
        guidance_interval: Interval = (0.0, 1.0),
        label_dropout: Probability = 0.1,
        t_scale: Positive = 1.0,
    ):
        # MeanFlow's own options go through its constructor (so any it adds keep their defaults);
        # then every option here is checked and kept.
        super().__init__(
            ratio=ratio,
            time_sampler=time_sampler,
            time_mu=time_mu,
            time_sigma=time_sigma,
            p=p,
            c=c,
            omega=omega,
            kappa=kappa,
            guidance_interval=guidance_interval,
            label_dropout=label_dropout,
            t_scale=t_scale,
        )
        self.set_options(locals())

    # -- the curriculum --------------------------------------------------------------------------
    def alpha(self, step: int) -> float:
        """``alpha`` at ``step`` (loss.py ``get_ratio``): constant, linear or sigmoid between
        ``alpha_from`` and ``alpha_to`` (shares of ``total_steps``), snapped to 0 / 1 within
        ``alpha_clamp`` of them."""
        a0, a1 = self.alpha_start, self.alpha_end
        start, stop = self.alpha_from * self.total_steps, self.alpha_to * self.total_steps
        if self.alpha_schedule == "constant":
            a = a0
        elif step < start:
            a = a0
        elif step > stop or stop <= start:
            a = a1
        elif self.alpha_schedule == "linear":
            a = a0 + (a1 - a0) * (step - start) / (stop - start)
        else:
            progress = (step - (start + stop) / 2) / (stop - start)
            a = a0 + (a1 - a0) / (1 + math.exp(-self.gamma * progress))
        if a < self.alpha_clamp:
            return 0.0
        if a > 1 - self.alpha_clamp:
            return 1.0
        return a

    # -- training --------------------------------------------------------------------------------
    def prediction_and_target_alpha(
        self, net, xt: Tensor, t: Tensor, d: Tensor, y: Tensor | None, v: Tensor, alpha: float
    ) -> tuple[Tensor, Tensor]:
        """``u = net(z_t, t, d)`` (with its graph) and ``sg(u_tgt)``: ``alpha v + (1 - alpha)
        u(z_t + alpha d v, t + alpha d, (1 - alpha) d)`` on ``d > 0`` rows, ``v`` on ``d = 0`` rows."""
        u = net(xt, t, d, y)
        with torch.no_grad():
            step = alpha * d
            u_next = net(xt + bcast(step, v) * v, t + step, d - step, y)
            target = alpha * v + (1 - alpha) * u_next
            target = torch.where(bcast(d > 0, v), target, v)
        return u, target

    def loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        alpha = self.alpha(step)
        net, x1, x0 = nets.online, batch.x1, noise(batch)
        t, d = self.sample_times(x1.shape[0], x1.device)
        xt = interpolate(x0, x1, t)
        y = self.drop_labels(batch.y, net.num_classes)  # MeanFlow's (each row, label_dropout)
        v = self.guided_velocity(net, xt, t, x1 - x0, y)
        if alpha == 0.0:  # the MeanFlow limit: its JVP target
            u, target = self.prediction_and_target(net, xt, t, d, y, v)
        else:
            u, target = self.prediction_and_target_alpha(net, xt, t, d, y, v, alpha)
        sq = (u - target).square().flatten(1).sum(1)  # ||D||^2 per row
        weighted = sq / (sq.detach() + self.c) ** self.p  # adaptive weight (as MeanFlow's)
        if self.alpha_weight == "alpha" and alpha > 0.0:  # official: finite-step rows weigh alpha
            weighted = torch.where(d > 0, alpha * weighted, weighted)
        loss = weighted.mean()
        mse = sq.detach() / x1[0].numel()
        m = self.split(x1.shape[0])
        logs = {"loss/flow": mse[m:].mean()} if m < len(mse) else {}
        if m:
            logs["loss/average"] = mse[:m].mean()
        logs["alpha_flow/alpha"] = torch.full((), alpha, device=x1.device)
        return loss, logs
