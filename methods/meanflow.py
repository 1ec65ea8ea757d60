"""MeanFlow (Geng, Deng, Bai, Kolter, He; "Mean Flows for One-step Generative Modeling",
arXiv 2505.13447).

The network learns the *average* velocity of a step. In the project's time (``t = 0`` noise,
``t = 1`` data, ``x_t = (1 - t) x0 + t x1``, ``v = x1 - x0``), for a step from ``t`` to
``s = t + d`` (``d >= 0``) along the probability-flow trajectory ``z``:

    (s - t) u(z_t, t, s) = int_t^s v(z_tau, tau) dtau,     so one step is exact: z_s = z_t + d u.

Differentiate in the start time ``t`` with ``s`` fixed, ``z_t`` moving along the trajectory
(``dz_t/dt = v``): ``-u + (s - t) du/dt = -v``, i.e. the MeanFlow identity

    u = v + (s - t) du/dt,     du/dt = (d_z u) v + d_t u     (total derivative, s fixed).

The network is ``net(z, t, d)`` with ``d = s - t``: moving ``t`` with ``s`` fixed moves ``d`` by
``-1``, so ``du/dt = (d_z net) v + d_t net - d_d net`` is one JVP with tangents **(v, 1, -1) on
(z, t, d)**. Loss: ``|| net(z_t, t, d) - sg(v + d du/dt) ||^2``; the JVP's primal output is the
prediction (gradients flow through it, the tangent is detached), as in the official code.

The paper's time is reversed (``t' = 1 - t``, noise at 1, ``v' = -v``, ``u' = -u``, its step runs
from ``t'`` down to ``r' = 1 - s``); it writes ``u' = v' - (t' - r') du'/dt'`` (eq. 6) with tangents
``(v', 0, 1)`` on ``(z, r', t')``. Those are ``(v, 0, 1)`` on ``(z, s, t)`` here, end time first --
the issue's "(v, 0, 1)" -- and both give the same number: ``du'/dt' = (d_z u)(-v)(-1) + d_t u (-1)
(-1) = du/dt``, the target ``v' - d du'/dt' = -(v + d du/dt)``. Our ``(v, 1, -1)`` on ``(z, t, d)``
is that tangent in the network's own arguments (the official net takes ``(t', h = t' - r')`` with
tangents ``(v', 1, 1)``). Conversion happens only here: times are drawn in the paper's time and
mapped by ``t = 1 - t'``, ``d = t' - r'``.

The JVP differentiates through the embeddings of ``t`` and ``d``, so both are chosen for it:

* ``d`` is embedded linearly, like ``t`` (``d_embedding = "linear"``; the paper's best
  conditioning is ``(t, t - r)``, both with the same positional embedding). The shortcut
  embedding ``log2(1/d)`` does not fit: its JVP term ``d d_d u = -(d u / d level) / ln 2`` stays
  O(1) as ``d -> 0`` instead of vanishing, and is exactly 0 under the ``2^-16`` clamp, so short
  steps get spurious targets that jump at the clamp. ``d = 0`` (``r = t`` rows) embeds as 0.
* ``t`` and ``d`` enter the sinusoid unscaled (``t_scale = 1``), as in both official codes, not
  at the DiT/ADM scale 1000: the tangent of a frequency-``w`` feature is ``w`` times its value,
  so at 1000 the target ``v + d du/dt`` is dominated by the network's own high-frequency time
  derivative. Measured with the recipe of tests/test_meanflow.py (Gaussian data, 2-D MLP, 800
  steps, two seeds): one step misses the exact map by RMS 0.90 / 0.97 at scale 1000 against
  0.34 / 0.23 unscaled (flow matching's collapse to the mean costs 1.12); without an EMA the
  per-element error on ``r != t`` rows stayed above 100 at 1000, near 2 unscaled.

Guidance is folded into training (the paper's CFG section, official ``guidance_fn``): on rows
with a real label and ``t`` in ``guidance_interval``, ``v`` is replaced everywhere (target and JVP
tangent) by
``v~ = omega v + kappa u(z_t, t, 0 | y) + (1 - omega - kappa) u(z_t, t, 0 | null)``, from the
online network without gradient. Sampling is then unguided: ``N`` in {1, 2, ..., 128} Euler steps
``z <- z + (1/N) u(z, i/N, 1/N)``, ``N`` evaluations, no CFG doubling.

Defaults and where they come from (ImageNet settings; the official PyTorch CIFAR-10 code differs):

The official JAX code is Gsunshine/meanflow (commit d70cb55): ``meanflow.py`` (``MF``),
``configs/default.py`` (``CFG``), ``train.py``; in brackets the PyTorch CIFAR-10 code
(Gsunshine/py-meanflow) where it differs. Every difference is an option or a ``train`` key
(``recipe=official`` selects the JAX values):

===================  ==============================  ========================================
option               default (source)                official JAX code (PyTorch CIFAR-10)
===================  ==============================  ========================================
ratio (r != t rows)  0.25 (paper Table 1)            0.25: ``data_proportion`` 0.75 are r = t
                                                     (``MF:72``, ``MF:152-155``); (0.75)
time_sampler         logit_normal(-0.4, 1.0) in the  logit_normal(-0.4, 1.0), t = max and
                     paper's time (paper Table 1)    r = min of two draws (``MF:67-69``,
                                                     ``MF:147-150``); (logit-normal(-2, 2), or
                                                     separate t and r laws)
p                    1.0 (paper Table 1)             1.0 (``MF:83``); (0.75)
c                    1e-3 (paper)                    0.01 (``MF:84``, ``MF:242``); (1e-3)
omega, kappa         1.0, 0.0 (guidance off)         1.0, 0.5 (``MF:75-76``, ``CFG:62-63``;
                                                     effective scale 2 on B/4)
guidance_interval    [0, 1] (everywhere)             [0, 1] in the paper's time (``MF:79-80``)
label_dropout        0.1 (both)                      0.1 (``MF:77``, ``CFG:58``)
label_dropout_rows   ``any``: Bernoulli per row      ``r_eq_t``: a Binomial(B, 0.1) count of
                                                     rows dropped from the first row on, i.e.
                                                     among the r = t rows (``MF:191-200``)
t_scale              1 (official code)               1: t and t - r enter the sinusoid as is
r != t rows          the first floor(ratio B) rows   a fixed count, the last rows (``MF:152-155``);
                                                     (Bernoulli per row)
train.betas          recipe's (shared: 0.9, 0.999)   0.9, 0.95 (``train.py:72-75``,
                                                     ``CFG:44``)
train.weight_decay   recipe's (shared: 0.1)          0 (``train.py:74``)
train.ema_rate       recipe's (shared: 0.999)        0.9999, constant (``CFG:45``,
                                                     ``utils/ema_util.py:17``)
eval weights         EMA (``eval.weights``)          EMA (``train.py:156``, ``train.py:185``)
===================  ==============================  ========================================
``p`` and ``c`` weight each row by ``sg(1 / (||D||^2 + c)^p)``, ``||D||^2`` summed over the sample
(p = 0: plain squared L2, p = 0.5: pseudo-Huber). The JVP covers every row as in the official code
(on ``r = t`` rows its tangent is multiplied by ``d = 0``).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from torch import Tensor

from bench.budget import Cost
from bench.data import Batch
from bench.guidance import drop_labels
from bench.options import Positive, Probability, Range, Rule
from methods.base import Method, Nets
from methods.common import bcast, interpolate, leading_rows, noise
from methods.jvp import jvp

#: [lo, hi] inside [0, 1]
Interval = Annotated[tuple[Probability, Probability], Rule(lambda v: v[0] <= v[1], "with lo <= hi")]


class MeanFlow(Method):
    # The JVP goes through torch.func, which bypasses a DDP wrapper's hooks: under DDP the trainer
    # hands us the unwrapped network and all-reduces the gradients itself.
    explicit_grad_sync = True
    d_embedding, t_scale = "linear", 1.0  # bench.run.build builds the network with these

    def __init__(
        self,
        ratio: Probability = 0.25,
        time_sampler: Literal["logit_normal", "uniform"] = "logit_normal",
        time_mu: float = -0.4,
        time_sigma: Positive = 1.0,
        p: Annotated[float, Range(0)] = 1.0,  # 0: plain squared L2
        c: Positive = 1e-3,
        omega: float = 1.0,
        kappa: float = 0.0,
        guidance_interval: Interval = (0.0, 1.0),
        label_dropout: Probability = 0.1,
        label_dropout_rows: Literal["any", "r_eq_t"] = "any",
        t_scale: Positive = 1.0,
    ):
        super().__init__()
        self.set_options(locals())

    # -- training ------------------------------------------------------------------------------
    def split(self, batch_size: int) -> int:
        """Number of rows with ``r != t`` (the first ones; the rest are flow-matching rows)."""
        return leading_rows(self.ratio, batch_size)

    def sample_times(self, n: int, device) -> tuple[Tensor, Tensor]:
        """``(t, d)`` in the project's time. Drawn as the official code does, in the paper's time:
        two draws, ``t' = max``, ``r' = min``, then ``r' = t'`` on the flow-matching rows."""

        def draw():
            if self.time_sampler == "uniform":
                return torch.rand(n, device=device)
            return torch.sigmoid(self.time_mu + self.time_sigma * torch.randn(n, device=device))

        a, b = draw(), draw()
        t_p, r_p = torch.maximum(a, b), torch.minimum(a, b)
        m = self.split(n)
        r_p = torch.cat([r_p[:m], t_p[m:]])
        return 1 - t_p, t_p - r_p  # t = 1 - t', d = s - t = t' - r' (exactly 0 on r = t rows)

    def drop_labels(self, y: Tensor | None, num_classes: int) -> Tensor | None:
        """Labels for CFG training. ``any``: each row's label is dropped with probability
        ``label_dropout``. ``r_eq_t`` (official ``cond_drop``): a Binomial(B, p) count of rows is
        dropped, taken in the official row order -- its ``r = t`` rows first (ours are rows
        ``m..B-1``), then its ``r != t`` rows (ours ``0..m-1``) if the count is larger."""
        if self.label_dropout_rows == "any":
            return drop_labels(y, self.label_dropout, num_classes)
        if y is None or self.label_dropout <= 0:
            return y
        n, m = y.shape[0], self.split(y.shape[0])
        count = (torch.rand(y.shape, device=y.device) < self.label_dropout).sum()
        order = torch.cat([torch.arange(m, n), torch.arange(m)]).to(y.device)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(n, device=y.device)  # position of each row in that order
        return torch.where(rank < count, torch.full_like(y, num_classes), y)

    @property
    def guidance(self) -> bool:
        return self.omega != 1.0 or self.kappa != 0.0

    @torch.no_grad()
    def guided_velocity(self, net, xt: Tensor, t: Tensor, v: Tensor, y: Tensor | None) -> Tensor:
        """``v~ = omega v + kappa u(z_t, t, 0 | y) + (1 - omega - kappa) u(z_t, t, 0 | null)`` on
        rows with a real label and ``t`` in the interval; ``v`` elsewhere (dropped labels too)."""
        if y is None or not self.guidance:
            return v
        null, zero = torch.full_like(y, net.num_classes), torch.zeros_like(t)
        if self.kappa != 0.0:  # conditional and unconditional as one doubled batch
            u_y, u_null = net(
                torch.cat([xt, xt]),
                torch.cat([t, t]),
                torch.cat([zero, zero]),
                torch.cat([y, null]),
            ).chunk(2)
        else:
            u_y, u_null = 0.0, net(xt, t, zero, null)
        lo, hi = self.guidance_interval
        on = (y != net.num_classes) & (t >= lo) & (t <= hi)
        guided = self.omega * v + self.kappa * u_y + (1 - self.omega - self.kappa) * u_null
        return torch.where(bcast(on, v), guided, v)

    def prediction_and_target(
        self, net, xt: Tensor, t: Tensor, d: Tensor, y: Tensor | None, v: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``u = net(z_t, t, d)`` (with its graph) and the target ``sg(v + d du/dt)``, both from one
        JVP with tangents ``(v, 1, -1)`` on ``(z, t, d)``."""
        # fp32 and math attention inside (methods/jvp.py); the primal output keeps its graph.
        u, dudt = jvp(
            net,
            "MeanFlow",
            lambda z, tt, dd: net(z, tt, dd, y),
            (xt, t, d),
            (v, torch.ones_like(t), -torch.ones_like(d)),
        )
        return u, (v + bcast(d, v) * dudt).detach()

    def loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        net, x1, x0 = nets.online, batch.x1, noise(batch)
        t, d = self.sample_times(x1.shape[0], x1.device)
        xt = interpolate(x0, x1, t)
        y = self.drop_labels(batch.y, net.num_classes)
        v = self.guided_velocity(net, xt, t, x1 - x0, y)
        u, target = self.prediction_and_target(net, xt, t, d, y, v)
        sq = (u - target).square().flatten(1).sum(1)  # ||D||^2 per row, summed over the sample
        loss = (sq / (sq.detach() + self.c) ** self.p).mean()  # adaptive weight, stop-gradient
        # Unweighted per-element MSE per part (the weighted loss sits near 1 when p = 1).
        mse = sq.detach() / x1[0].numel()
        m = self.split(x1.shape[0])
        logs = {"loss/flow": mse[m:].mean()} if m < len(mse) else {}
        if m:
            logs["loss/average"] = mse[:m].mean()
        return loss, logs

    # -- sampling ------------------------------------------------------------------------------
    def step_size(self, steps: int) -> float:
        return 1.0 / steps

    def guided(self, steps: int) -> bool:
        return False  # guidance is in the trained field: sampling never doubles an evaluation

    def cost(self) -> Cost:
        # Per row: the forward that keeps its graph (1) and its backward (2), as every method
        # counts them, plus the JVP's tangent pass (1): forward-mode AD runs one extra product per
        # matmul, W dx beside W x (two in attention's QK^T and AV, a few per cent of a DiT's
        # FLOPs), so a JVP is about 2 forwards -- bench/budget.py counts it as 1 more per row.
        # Folded guidance adds no-grad forwards at d = 0 on every row (class-conditional data
        # only, as Shortcut counts its baked guidance): the unconditional one, and the
        # conditional one when kappa != 0. Wall time is another matter: the math attention
        # kernel the JVP needs is slower than flash attention on a GPU.
        guidance = (1.0 + (self.kappa != 0.0)) if self.guidance else 0.0
        return Cost(per_sample=4.0 + guidance)
