"""Shortcut models (Frans, Hafner, Levine, Abbeel; "One Step Diffusion via Shortcut Models",
ICLR 2025, arXiv 2410.12557).

The network ``s(x_t, t, d)`` predicts the normalised jump for a step of size ``d``. Levels are
``d = 2^-k``, ``k = 0..7``; ``k = 7`` (``d = 1/128``) is the flow-matching level (the paper's
``d = 0``). Each batch is split into distinct rows:

* flow-matching rows (``1 - k_ratio``):  ``s(x_t, t, 1/128) -> x1 - x0``   (paper eq. 4)
* self-consistency rows (``k_ratio``), full step ``2d = 2^-k`` with ``k ~ U{0..6}`` and ``t`` a
  multiple of ``2d``; with the EMA weights and no gradient (paper eq. 5, with ``t + d`` -- the
  paper's ``t`` in the second term is a typo, official repo issue #5):

      v1 = s(x_t, t, d);   x' = x_t + d v1;   v2 = s(x', t + d, d);   s(x_t, t, 2d) -> (v1 + v2) / 2

Loss: plain MSE over all rows. Sampling: Euler with ``N`` in {1, 2, ..., 128} steps at ``d = 1/N``.
A step budget ``N`` is ``N`` evaluations; CFG is applied only at the flow-matching level (``N = 128``),
doubling those evaluations.

Defaults and where they come from. The official code is kvfrans/shortcut-models (commit
6010043): ``targets_shortcut.py`` (``TS``), ``train.py``, ``model.py``, ``helper_eval.py``; every
difference from it is an option (``recipe=official`` selects the official values):

=================  ===========================  ==============================================
option             default (source)             official code
=================  ===========================  ==============================================
k_ratio            0.25 (paper text)            0.125: ``bootstrap_every = 8`` (``train.py:63``;
                                                ``TS:10``)
level_sampling     ``uniform`` (this project)   ``even``: ``B/8 // 7`` rows per level, finest
                                                first, leftovers at ``d = 1`` (``TS:12-14``)
fm_time            ``uniform`` (paper: best)    ``grid128``: ``randint(0, 128) / 128`` (``TS:85-86``)
target_weights     ``ema`` (official)           ``ema``: ``bootstrap_ema = 1`` (``train.py:64``,
                                                ``TS:40``)
clip               4.0 (official)               4.0 on ``x'`` (``TS:45``, ``TS:61``) and on the
                                                target (``TS:71``)
bake_cfg_scale     None (paper: CFG at d = 0)   ``cfg_scale`` on the finest bootstrap level when
                                                ``bootstrap_cfg = 1`` (``TS:48-68``; default 0,
                                                ``train.py:62``; 1 with 1.5 in the ImageNet command)
label_dropout      0.1 (both)                   0.1 on flow rows (``train.py:52``, ``TS:80-81``)
cfg_scale          1.0 (off)                    the ``cfg_scale`` flag at 128 steps only
                                                (``helper_eval.py:223-229``)
sigma_min          0 (paper: exact path)        1e-5: ``x_t = (1 - (1 - 1e-5) t) x0 + t x1``,
                                                target ``x1 - (1 - 1e-5) x0`` (``TS:38``, ``TS:94-95``)
embedding          ``dit``: 1000 t, 1000/7 k    ``raw``: t in [0, 1] and the integer level k as
                                                they are (``model.py:82-88``, ``model.py:262``)
distinct rows      yes (paper)                  flow rows reuse the first rows of the batch
                                                (``TS:102-106``, official repo issue #10)
eval weights       EMA (``eval.weights=ema``)   online: ``use_ema = 0`` (``train.py:57``,
                                                ``helper_eval.py:52-56``): ``eval.weights=online``
=================  ===========================  ==============================================

Not options (the backbone, ``bench/dit.py``): the official attention scales the queries by
``1/head_dim`` (``model.py:181``) where SDPA uses ``1/sqrt(head_dim)``, and its per-block adaLN
layer starts from Xavier weights (``model.py:168``) where ours start at zero (adaLN-Zero).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from torch import Tensor

from bench.budget import Cost
from bench.data import Batch
from bench.dit import FLOW_MATCHING_LEVEL
from bench.guidance import drop_labels
from bench.options import Positive, Probability, Range
from methods.base import MAX_STEPS, Embedding, Method, Nets
from methods.common import (
    Regression,
    interpolate,
    leading_rows,
    noise,
    regression_loss,
    two_step_average,
)
from methods.flow_matching import TimeSampler, sample_time

NUM_LEVELS = 7  # bootstrap full steps 2d = 2^-k, k = 0..6; level 7 is flow matching


class Shortcut(Method):
    def __init__(
        self,
        k_ratio: Annotated[float, Range(0, 1, hi_open=True)] = 0.25,
        level_sampling: Literal["uniform", "even"] = "uniform",
        fm_time: TimeSampler = "uniform",
        target_weights: Literal["ema", "online"] = "ema",
        clip: Positive | None = 4.0,
        bake_cfg_scale: float | None = None,
        label_dropout: Probability = 0.1,
        cfg_scale: float = 1.0,
        sigma_min: Annotated[float, Range(0, 1, hi_open=True)] = 0.0,
        embedding: Embedding = "dit",
    ):
        super().__init__()
        self.set_options(locals())

    # -- training ------------------------------------------------------------------------------
    def split(self, batch_size: int) -> int:
        """Number of self-consistency rows in a batch (the first ones; the rest are flow rows).
        Floor, so any k_ratio < 1 leaves at least one flow-matching row to anchor level 7."""
        return leading_rows(self.k_ratio, batch_size)

    def levels(self, n: int, device) -> Tensor:
        """Full-step exponents ``k`` (full step ``2^-k``) for ``n`` self-consistency rows."""
        if self.level_sampling == "uniform":
            return torch.randint(NUM_LEVELS, (n,), device=device)
        # Official allocation: n // 7 rows per level from finest to coarsest, leftovers at k = 0.
        per = n // NUM_LEVELS
        k = torch.arange(NUM_LEVELS - 1, -1, -1, device=device).repeat_interleave(per)
        return torch.cat([k, torch.zeros(n - k.numel(), dtype=torch.long, device=device)])

    @torch.no_grad()
    def bootstrap_target(self, net, xt: Tensor, t: Tensor, d: Tensor, y: Tensor | None) -> Tensor:
        """Average of two half-steps of size ``d``: ``(s(x_t, t, d) + s(x_t + d s, t + d, d)) / 2``,
        with ``x'`` and the target clipped to ``[-clip, clip]`` when ``clip`` is set (official code)."""
        # Official-code option: guided velocity on rows whose half step is the flow-matching
        # level. The conditional forward is already done; only the unconditional one is added.
        fine = (
            (d == FLOW_MATCHING_LEVEL)
            if self.bake_cfg_scale is not None and y is not None
            else None
        )

        def velocity(x, tt):
            v = net(x, tt, d, y)
            if fine is not None and bool(fine.any()):
                null = torch.full_like(y[fine], net.num_classes)
                vu = net(x[fine], tt[fine], d[fine], null)
                v = v.clone()  # the network may return an expanded view
                v[fine] = vu + self.bake_cfg_scale * (v[fine] - vu)
            return v

        return two_step_average(velocity, xt, t, d, self.clip)

    def targets(self, nets: Nets, batch: Batch) -> Regression:
        """Inputs and regression targets for every row; self-consistency rows come first."""
        x1, y, n = batch.x1, batch.y, len(batch)
        x0, m = noise(batch), self.split(n)

        # Self-consistency rows [0, m): t on multiples of the full step 2d = 2^-k.
        k = self.levels(m, x1.device)
        full = 2.0 ** (-k.float())
        t_sc = torch.floor(torch.rand(m, device=x1.device) * 2.0**k) * full
        xt_sc = interpolate(x0[:m], x1[:m], t_sc, self.sigma_min)
        target_net = nets.ema if self.target_weights == "ema" else nets.online
        y_sc = None if y is None else y[:m]  # bootstrap rows always see the real label
        target_sc = (
            self.bootstrap_target(target_net, xt_sc, t_sc, full / 2, y_sc) if m else xt_sc.clone()
        )  # k_ratio = 0: no bootstrap rows, no target forwards

        # Flow-matching rows [m, n): the level-7 token, target x1 - x0, label dropout for CFG.
        t_fm = sample_time(n - m, self.fm_time, x1.device)
        xt_fm = interpolate(x0[m:], x1[m:], t_fm, self.sigma_min)
        y_fm = drop_labels(
            None if y is None else y[m:], self.label_dropout, nets.online.num_classes
        )
        return Regression(
            xt=torch.cat([xt_sc, xt_fm]),
            t=torch.cat([t_sc, t_fm]),
            d=torch.cat([full, torch.full_like(t_fm, FLOW_MATCHING_LEVEL)]),
            y=None if y is None else torch.cat([y_sc, y_fm]),
            target=torch.cat([target_sc, x1[m:] - (1 - self.sigma_min) * x0[m:]]),
            num_consistency=m,
        )

    def loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        return regression_loss(nets.online, self.targets(nets, batch), "consistency")

    # -- sampling ------------------------------------------------------------------------------
    def step_size(self, steps: int) -> float:
        return 1.0 / steps

    def guided(self, steps: int) -> bool:
        # CFG only at the flow-matching level (the paper); coarser levels take the raw velocity.
        return self.cfg_scale != 1.0 and steps == MAX_STEPS

    def cost(self) -> Cost:
        # One fwd+bwd on every row, plus two no-grad forwards on the k_ratio rows; baked guidance
        # (class-conditional data only) adds an unconditional forward on the rows at the smallest
        # level: 1/7 of them with uniform levels, floor(m/7)/m with the even allocation.
        baked = self.bake_cfg_scale is not None
        extra = 2.0 * self.k_ratio * (1 + (1 / NUM_LEVELS if baked else 0.0))
        return Cost(per_sample=3.0 + extra)
