"""Inductive Moment Matching (Zhou, Ermon, Song, "Inductive Moment Matching", ICML 2025, arXiv
2503.07565). Official code: ``lumalabs/imm`` at c9473e9 (below: ``preconds.py`` =
``training/preconds.py``, ``generate_images.py``, ``im256.yaml`` / ``cifar10.yaml`` =
``configs/im256_generate_images.yaml`` / ``configs/cifar10_generate_images.yaml``). **The release
has no training code** (its README's checklist leaves "Add training scripts" unticked): the network
wrapper, the interpolants and the samplers are official; the objective, the time pairs, the
kernel and the weighting below follow the paper.

**The paper's model.** Time ``tau`` runs from data (0) to noise (1); the flow-matching interpolant is
``x_tau = (1 - tau) x + tau z``, ``z ~ N(0, sigma_d^2 I)`` (``preconds.py:103-120``), with
``eta(tau) = tau / (1 - tau)`` the noise-to-signal ratio and ``lambda(tau) = -2 log eta(tau)`` the
log-SNR (``preconds.py:86-101``, ``151-171``). One network ``G`` maps a point at ``tau = t`` to a
point at any earlier ``tau = s <= t``, in the Euler-FM form (``preconds.py:145-149``, ``im256.yaml:30``)

    f_{s,t}(x_t) = x_t - (t - s) sigma_d G(c_in x_t, 1000 t, 1000 (t - s)),   c_in = 1 / (sigma_d sqrt((1-t)^2 + t^2))

(``temb_type: stride``, ``time_scale: 1000``, ``preconds.py:191-211``, ``im256.yaml:31-32``).

**The objective** (paper Alg. 1 and its empirical loss). A batch of ``B`` rows is cut into ``B / M``
groups of ``M`` consecutive rows; each group shares one time triple ``s <= r < t``. With one noise
``z`` per row, ``x_t`` and ``x_r = DDIM(x_t, x, r, t) = (1 - r) x + r z`` lie on the same line
(``preconds.py:122-131``), ``y_t^i = f^theta_{s,t}(x_t^i)`` carries the gradient and
``y_r^i = f^{theta-}_{s,r}(x_r^i)`` is a stop-gradient target. The loss is a kernel MMD between the
two groups of particles (V-statistic, every pair ``i, j`` including ``i = j``):

    L = E_groups [ w(s, t) / M^2 sum_{i,j} ( k(y_t^i, y_t^j) + k(y_r^i, y_r^j) - 2 k(y_t^i, y_r^j) ) ]
    k(y, y') = exp( -max(||y - y'||, 1e-4) / (|c_out(s, t)| D) ),        D = elements per sample
    w(s, t)  = 1/2 sigmoid(b - lambda(t)) (-d lambda/dt) (1 - t)^a / ((1 - t)^2 + t^2)
             = t (1 - t)^(a-1) / ((t^2 + e^-b (1 - t)^2) ((1 - t)^2 + t^2))           (the same, at t = 0 too)

with the Laplace kernel's bandwidth ``|c_out| = (t - s) sigma_d``, the coefficient of ``G`` in ``f``
(one bandwidth for all three kernel matrices of a group). ``M = 1`` is a consistency model: the
loss is ``2 k(y, y) - 2 k(y_t, y_r)``, a kernel distance between one particle and its target. **Time pairs**: ``t ~ U(eps, T)``, ``s ~ U(eps, t)`` and ``r`` from
the mapping function, a constant decrement of ``eta``:

    r(s, t) = max(s, eta^-1(eta(t) - (eta_max - eta_min) / 2^k))        (eta^-1(e) = e / (1 + e); e < 0: r = s)

so ``r -> t`` as ``k`` grows, and ``r = s`` (then ``y_r = x_s``, the boundary ``f_{s,s} = id``) where
the decrement reaches below ``s``. **Target network**: ``theta-`` is the online weights without
gradient (``target_weights=online``) or the trainer's EMA.

**Mapped onto the project's path and network call.** The harness's path is
``x_u = (1 - u) eps + u x1`` with ``eps ~ N(0, I)`` (``u = 0`` noise). Put the paper's noise at
``z = sigma_d eps`` and its data at ``sigma_d x1``: then ``x_tau = sigma_d x_{u = 1 - tau}`` exactly,
every point of the paper's space is ``sigma_d`` times a point of ours, and the network call is

    u_net = net(x_{1-t}, 1 - t, t - s, y) = -G,        f_{s,t} = x_{1-t} + (t - s) u_net   (a point at 1 - s)

i.e. the paper's ``(x_t, s, t)`` is our ``(x, t_ours = 1 - t, d = t - s)`` and ``f`` is MeanFlow's
jump ``x + d u`` with ``u`` the average velocity (``methods/meanflow.py``). ``sigma_d`` cancels
everywhere: ``c_in`` is the network's own input scale (not applied: the harness's networks take
``x`` as is, like every other method here), and the kernel distance ``||.|| / ((t - s) sigma_d)``
in the paper's space is ``||.|| / (t - s)`` in ours. So this is the paper's IMM for any
``sigma_d`` on data scaled as the harness scales it (images in [-1, 1] against unit noise, where the
paper has [-1, 1] against noise of scale 0.5). **Time conditioning**: ``t_ours`` and ``d`` are
embedded linearly at ``t_scale = 1000`` each (the official ``stride`` embedding of ``1000 t`` and
``1000 (t - s)``; ``1000 (1 - t)`` is a fixed linear mix of the same sinusoid features).

**Sampling** (``generate_images.py``). Pushforward (``35-66``): ``N`` jumps down the grid
``T = tau_0 > tau_1 > ... > tau_N = eps``, uniform in ``tau`` (``37-38``, ``im256.yaml:43-66``) or
EDM's ``rho = 7`` spacing in ``eta`` (``39-45``); the noise ``x0`` is taken as the point at ``T``:

    x <- x + (tau_i - tau_{i+1}) net(x, 1 - tau_i, tau_i - tau_{i+1}, y)

Restart (``68-100``): jump from ``tau_i`` to ``eps``, re-noise with fresh noise to ``tau_{i+1}``
(``x <- tau_{i+1} z + (1 - tau_{i+1}) x1^``), the noise from a generator seeded by ``seed`` and
``x0``. Either way ``N`` evaluations, doubled by CFG (on the network output, as
``preconds.py:294-298``). **Cost**: per row one forward with gradient at ``x_t`` (3) and one
without at ``x_r`` (1): 4 forward-equivalents, whatever ``M``; the ``M x M`` kernels are not network
calls.

Values marked *paper* are training settings the release does not contain (the paper's ImageNet-256
column of its hyperparameter table); no released code can confirm them.

=====================  ==============================  ============================================
option                 default (source)                official code
=====================  ==============================  ============================================
group_size (M)         4 (paper)                       not released; must divide the batch
                                                       (refused otherwise, before training)
T, eps                 0.994, 0 (``im256.yaml:36-37``) CIFAR-10: 0.994, 0.006 (``cifar10.yaml:31-32``);
                                                       here also the range of ``t ~ U(eps, T)``
k                      12 (paper)                      not released (CIFAR-10: 15, paper)
eta_max, eta_min       160, 0 (paper)                  the wrapper keeps ``eta(T) = 165.7`` and
                                                       ``eta(eps)`` as ``nt_high`` / ``nt_low``
                                                       (``preconds.py:64-65``), unused in the release
a                      2 (``README.md:45``: the        the ``s``-embedding checkpoint: a = 1
                       ``t - s`` checkpoint)           (``README.md:46``)
b                      4 (paper)                       not released (CIFAR-10: 5, paper)
target_weights         online (paper: stop-gradient    not released; ``ema``: the trainer's EMA
                       of the online weights)
label_dropout          0.1 (paper)                     not released; here the same (possibly null)
                                                       label goes to both calls
sampler                pushforward (``im256.yaml:43``) ``pushforward_generator_fn``
                                                       (``generate_images.py:35-66``); ``restart``:
                                                       ``restart_generator_fn`` (``68-100``)
discretization         uniform (``im256.yaml:45``)     uniform | edm (``generate_images.py:37-45``);
                                                       CIFAR-10's hand-set grid ``mid_nt = [1.4]``
                                                       (``cifar10.yaml:40-42``) is not an option
cfg_scale              1 (off)                         1.5 at every step (``im256.yaml:47``)
t_scale                1000 (``im256.yaml:32``)        ``time_scale`` 1000 on ``t`` and ``t - s``
                                                       (``stride``, ``preconds.py:199-202``)
parameterisation       Euler-FM ``f``, ``stride``      ImageNet's (``im256.yaml:30-31``); CIFAR-10's
(fixed)                embedding                       Simple-EDM ``f`` and ``identity`` embedding
                                                       of ``s`` (``cifar10.yaml:26-27``) do not fit
                                                       a net called as ``(x, t, d)``: not built
c_in (fixed)           not applied: the harness's      ``c_in x_t`` into the network,
                       networks take ``x`` as is       ``sigma_d = 0.5`` (``preconds.py:193``,
                                                       ``im256.yaml:34``)
=====================  ==============================  ============================================
"""

from __future__ import annotations

import hashlib
import math
from typing import Annotated, Literal

import torch
from torch import Tensor, nn

from bench.budget import Cost
from bench.data import Batch
from bench.errors import UserError
from bench.guidance import drop_labels, guided_velocity
from bench.options import Positive, PositiveInt, Probability, Range
from methods.base import Method, Nets
from methods.common import bcast, noise

#: the Laplace kernel's floor on the distance, ``max(||y - y'||, 1e-4)``: keeps the square root's
#: gradient finite on the ``i = j`` pairs, whose distance is exactly 0
MIN_DISTANCE = 1e-4
RHO = 7.0  # EDM's spacing exponent for ``discretization=edm`` (generate_images.py:42)


def eta(tau: Tensor) -> Tensor:
    """The noise-to-signal ratio ``tau / (1 - tau)`` of the paper's time (``preconds.py:98-101``)."""
    return tau / (1 - tau)


def eta_inverse(e: Tensor) -> Tensor:
    """``eta^-1(e) = e / (1 + e)`` (``preconds.py:157-158``)."""
    return e / (1 + e)


def weight(t: Tensor, a: float, b: float) -> Tensor:
    """``w(s, t) = 1/2 sigmoid(b - lambda_t) (-d lambda/dt) (1 - t)^a / ((1 - t)^2 + t^2)`` with
    ``lambda_t = 2 log((1 - t) / t)``, written without the log-SNR so that ``t = 0`` gives 0:
    ``sigmoid(b - lambda) = t^2 / (t^2 + e^-b (1 - t)^2)`` and ``-d lambda/dt = 2 / (t (1 - t))``."""
    al = 1 - t
    return t * al ** (a - 1) / ((t * t + math.exp(-b) * al * al) * (al * al + t * t))


def laplace_kernel(p: Tensor, q: Tensor, bandwidth: Tensor) -> Tensor:
    """``k(p_i, q_j) = exp(-max(||p_i - q_j||, 1e-4) / (bandwidth D))`` for groups ``p``, ``q`` of
    shape ``(G, M, D)`` and ``bandwidth`` ``(G,)``: the ``(G, M, M)`` kernel matrices."""
    sq = (p[:, :, None] - q[:, None, :]).square().sum(-1)
    dist = sq.clamp_min(MIN_DISTANCE**2).sqrt()
    return torch.exp(-dist / (bcast(bandwidth, dist) * p.shape[-1]))


def mmd(y_t: Tensor, y_r: Tensor, bandwidth: Tensor) -> Tensor:
    """The groups' squared MMD, V-statistic: ``mean_ij k(y_t, y_t) + k(y_r, y_r) - 2 k(y_t, y_r)``
    for ``y_t``, ``y_r`` of shape ``(G, M, D)``; shape ``(G,)``."""
    inner_t = laplace_kernel(y_t, y_t, bandwidth).mean((1, 2))
    inner_r = laplace_kernel(y_r, y_r, bandwidth).mean((1, 2))
    cross = laplace_kernel(y_t, y_r, bandwidth).mean((1, 2))
    return inner_t + inner_r - 2 * cross


class IMM(Method):
    d_embedding = "linear"  # d = t - s, continuous, scaled like t (the official stride embedding)

    def __init__(
        self,
        batch_size: PositiveInt,  # ${train.batch_size}: the groups must cut it evenly
        group_size: PositiveInt = 4,
        T: Annotated[float, Range(0, 1, lo_open=True, hi_open=True)] = 0.994,
        eps: Annotated[float, Range(0, 1, hi_open=True)] = 0.0,
        k: Annotated[int, Range(0, 40)] = 12,
        eta_max: Positive = 160.0,
        eta_min: Annotated[float, Range(0)] = 0.0,
        a: Annotated[float, Range(0)] = 2.0,
        b: float = 4.0,
        target_weights: Literal["online", "ema"] = "online",
        sampler: Literal["pushforward", "restart"] = "pushforward",
        discretization: Literal["uniform", "edm"] = "uniform",
        label_dropout: Probability = 0.1,
        cfg_scale: float = 1.0,
        t_scale: Positive = 1000.0,
        seed: int = 0,
    ):
        super().__init__()
        self.set_options(locals())
        if batch_size % group_size:
            raise UserError(
                f"method.group_size={group_size} does not divide train.batch_size={batch_size}: "
                f"IMM cuts each batch into groups of {group_size} rows that share their times; "
                f"choose a group size that divides {batch_size} or another batch size"
            )
        if eps >= T:
            raise UserError(f"method.eps={eps!r} is not allowed: it must be below method.T={T!r}")
        if eta_min >= eta_max:
            raise UserError(
                f"method.eta_min={eta_min!r} is not allowed: it must be below method.eta_max={eta_max!r}"
            )

    # -- the flow map on our path -----------------------------------------------------------------
    def flow_map(
        self,
        net: nn.Module,
        x: Tensor,
        t: Tensor,
        s: Tensor,
        y: Tensor | None,
        cfg_scale: float = 1.0,
    ) -> Tensor:
        """``f_{s,t}(x) = x + (t - s) net(x, 1 - t, t - s, y)`` for ``x`` at the paper's time ``t``
        (our ``1 - t``): a point at the paper's ``s``. ``t``, ``s`` per row, in the paper's time;
        with labels, the network output is guided at ``cfg_scale`` (1: one plain call)."""
        d = (t - s).to(x.dtype)
        tt = (1 - t).to(x.dtype)
        u = guided_velocity(net, x, tt, d, y, cfg_scale) if y is not None else net(x, tt, d)
        return x + bcast(d, x) * u

    @staticmethod
    def point(x0: Tensor, x1: Tensor, tau: Tensor) -> Tensor:
        """The path at the paper's time ``tau`` (our ``1 - tau``): ``tau x0 + (1 - tau) x1``."""
        tau = tau.to(x1.dtype)
        return bcast(tau, x1) * x0 + bcast(1 - tau, x1) * x1

    # -- training ---------------------------------------------------------------------------------
    def mapping(self, s: Tensor, t: Tensor) -> Tensor:
        """``r(s, t) = max(s, eta^-1(eta(t) - (eta_max - eta_min) / 2^k))`` (a decrement below
        ``eta = 0`` gives ``r = s``)."""
        step = (self.eta_max - self.eta_min) / 2**self.k
        return torch.maximum(s, eta_inverse((eta(t) - step).clamp_min(0.0)))

    def sample_times(self, groups: int, device) -> tuple[Tensor, Tensor, Tensor]:
        """``(t, r, s)`` per group, in the paper's time and float64: ``t ~ U(eps, T)``,
        ``s ~ U(eps, t)``, ``r = r(s, t)``."""
        u = torch.rand(2, groups, device=device, dtype=torch.float64)
        t = self.eps + (self.T - self.eps) * u[0]
        s = self.eps + (t - self.eps) * u[1]
        return t, self.mapping(s, t), s

    def loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        net, x1, x0 = nets.online, batch.x1, noise(batch)
        n, m = x1.shape[0], self.group_size
        if n % m:
            raise UserError(
                f"IMM's groups of method.group_size={m} rows do not cut a micro-batch of {n} rows "
                f"(train.batch_size={self.batch_size} over processes x train.grad_accum); "
                "choose sizes whose micro-batch is a multiple of the group size"
            )
        groups = n // m
        t, r, s = self.sample_times(groups, x1.device)
        t_row, r_row, s_row = (v.repeat_interleave(m) for v in (t, r, s))
        y = drop_labels(batch.y, self.label_dropout, net.num_classes)
        y_t = self.flow_map(net, self.point(x0, x1, t_row), t_row, s_row, y)
        target = nets.online if self.target_weights == "online" else nets.ema
        with torch.no_grad():
            y_r = self.flow_map(target, self.point(x0, x1, r_row), r_row, s_row, y)
        # |c_out| = t - s in our coordinates (the paper's (t - s) sigma_d over its sigma_d scale)
        bandwidth = (t - s).to(x1.dtype)
        per_group = mmd(y_t.reshape(groups, m, -1), y_r.reshape(groups, m, -1), bandwidth)
        w = weight(t, self.a, self.b).to(x1.dtype)
        loss = (w * per_group).mean()
        return loss, {
            "loss/mmd": per_group.detach().mean(),
            "imm/gap": (t - r).mean().to(x1.dtype),
        }

    def cost(self) -> Cost:
        # Per row: the forward at x_t with its graph (1) and its backward (2), and the no-grad
        # forward at x_r (1). The group's kernel matrices are not network calls.
        return Cost(per_sample=4.0)

    # -- sampling ---------------------------------------------------------------------------------
    def grid(self, steps: int) -> list[float]:
        """The paper's times ``T = tau_0 > ... > tau_N = eps`` of an ``N``-step sampler: uniform
        in ``tau`` or EDM's ``rho = 7`` spacing in ``eta`` (``generate_images.py:37-45``)."""
        i = torch.arange(steps + 1, dtype=torch.float64)
        if self.discretization == "uniform":
            tau = self.T + i / steps * (self.eps - self.T)
        else:
            lo, hi = (
                eta(torch.tensor(v, dtype=torch.float64)) ** (1 / RHO) for v in (self.eps, self.T)
            )
            tau = eta_inverse((hi + i / steps * (lo - hi)) ** RHO)
        return tau.tolist()

    def renoise_generator(self, x0: Tensor) -> torch.Generator:
        """Restart's fresh noise: a generator on ``x0``'s device keyed by ``seed`` and ``x0``'s first
        64 values, so the same noise gives the same sample and the global RNG is left alone."""
        head = x0.detach().flatten()[:64].float().cpu().numpy().tobytes()
        key = hashlib.sha256(f"imm-restart-{self.seed}".encode() + head).digest()
        return torch.Generator(device=x0.device).manual_seed(int.from_bytes(key[:8], "little") >> 1)

    @torch.no_grad()
    def sample(self, net: nn.Module, x0: Tensor, steps: int, y: Tensor | None = None) -> Tensor:
        steps = self.check_budget(steps)
        n = x0.shape[0]
        scale = self.cfg_scale if y is not None and self.guided(steps) else 1.0

        def jump(x: Tensor, t: float, s: float) -> Tensor:
            full = torch.full((n,), t, device=x.device, dtype=torch.float64)
            return self.flow_map(net, x, full, torch.full_like(full, s), y, scale)

        tau = self.grid(steps)
        x = x0
        if self.sampler == "pushforward":
            for t, s in zip(tau[:-1], tau[1:], strict=True):
                x = jump(x, t, s)
            return x
        gen = self.renoise_generator(x0) if steps > 1 else None
        for i, t in enumerate(tau[:-1]):
            x1_hat = jump(x, t, self.eps)
            if i + 1 < steps:
                z = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
                x = tau[i + 1] * z + (1 - tau[i + 1]) * x1_hat
        return x1_hat
