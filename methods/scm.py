"""Continuous-time consistency models: sCT, and sCD with a teacher (Lu & Song, "Simplifying,
Stabilizing and Scaling Continuous-Time Consistency Models", ICLR 2025, arXiv 2410.11081).
Reference code: NVIDIA FastGen's sCM (``NVlabs/FastGen`` at 34f30e8, the paper's authors' group;
OpenAI released none), ``fastgen/methods/consistency_model/sCM.py`` (below: ``sCM.py``) and
``fastgen/configs/methods/config_scm.py`` (``config_scm.py``).

**TrigFlow, the paper's parameterisation.** Data ``x1`` with scale ``sigma_d``, noise
``z = sigma_d eps``, angle ``tau`` in ``[0, pi/2]`` (``tau = 0`` data, ``pi/2`` noise):

    x^_tau = cos(tau) x1 + sin(tau) z,      dx^/dtau = cos(tau) z - sin(tau) x1,
    f(x^, tau) = cos(tau) x^ - sin(tau) sigma_d F(x^ / sigma_d, tau)     (the consistency map).

**Mapped onto the project's path and network call.** The linear path ``x_s = (1 - s) eps + s x1``
(``s = 0`` noise) has the same signal-to-noise ratio as ``x^_tau`` at
``s = cos(tau) / (cos(tau) + sigma_d sin(tau))``, and there ``x_s = k x^_tau`` with
``k = 1 / (cos(tau) + sigma_d sin(tau))`` (``s = k cos(tau)``, ``1 - s = k sigma_d sin(tau)``) --
the same matching as FastGen's ``TrigFlowPrecond`` (sCM.py:36-57). The network is called once,
as ``u = net(x_s, s, 1 - s, y)``: the average velocity over the rest of the path (MeanFlow's
``u(x_s, s, 1)``, ``d = 1 - s`` embedded linearly). Its data and noise estimates
``x1^ = x_s + (1 - s) u`` and ``eps^ = x_s - s u`` give TrigFlow's output as the flow at ``tau``
(FastGen's ``x0_to_flow``):

    sigma_d F = cos(tau) sigma_d eps^ - sin(tau) x1^,     and then  f(x^, tau) = x1^ = x_s + (1 - s) u

exactly, so the consistency map is "one jump to the end", as in ``methods/consistency.py``.
**Time conditioning**: ``s`` and ``d = 1 - s`` enter the network's sinusoid unscaled
(``t_scale = 1``, as MeanFlow here): the JVP differentiates through them, and the paper's
"stable time-conditioning" (Sec. 4.1) is a low-frequency embedding of the time (``c_noise(t) = t``
instead of ``1000 t``). ``ds/dtau = -sigma_d k^2`` is bounded on ``[0, pi/2]``.

**The objective** (paper eq. 8-10, Alg. 1; sCM.py:196-285). With ``theta-`` the same weights
without gradient, ``dx^/dtau`` the conditional velocity above (sCT) or the teacher's probability-flow
velocity mapped the same way (sCD), ``r = min(1, step / warm-up)`` the tangent warm-up and
``cs = cos(tau) sin(tau)``:

    g    = -cos^2(tau) (sigma_d F- - dx^/dtau) - r (cs x^ + sigma_d cs dF-/dtau)   (= cos(tau) df-/dtau at r = 1)
    g   <- g / (||g|| + c)                                                           (tangent normalisation)
    loss = E[ w(tau) / exp(logvar(tau)) * mean_D (F - F- - g)^2 + logvar(tau) ]       (adaptive weighting)

``cs dF-/dtau`` is one JVP of ``(x^, tau) -> F`` with tangents ``(cs dx^/dtau, cs)``
(sCM.py:176-179) through the mapping and the network, via the shared helper ``methods/jvp.py``
(fp32, math attention). Its primal output is ``F`` itself, with its graph (its detached value is
``F-``), so one forward serves both, as MeanFlow here (FastGen runs a second forward). The prior
weight is ``w = 1 / (sigma_d tan(tau))`` (``1/sigma`` of an EDM network, sCM.py:278); ``logvar``
is a small network of the method's own (random Fourier features of ``tau``, then a linear layer,
zero-initialised), trained with the network (``trainable_parameters``). ``tau`` is drawn as
``arctan(exp(P_mean + P_std n) / sigma_d)``, ``n ~ N(0, 1)`` (config_scm.py:34-36).

**Sampling** (paper Alg. 1; FastGen ``_student_sample_loop``, ``model.py:331-388``): ``N`` steps
at angles ``pi/2 = tau_0 > tau_1 > ... > tau_{N-1}``: jump to ``x1^ = f(x, tau_i)``, re-noise to
``tau_{i+1}`` with fresh noise, ``x <- (1 - s_{i+1}) z + s_{i+1} x1^`` (the linear-path form of
``cos x1^ + sin sigma_d z``). One step is ``x1 = x0 + net(x0, 0, 1)``; two steps re-noise at the
paper's ``tau_1 = mid_time = 1.1``; ``N > 2`` spaces ``tau_i`` evenly from ``mid_time`` down,
``tau_i = mid_time (N - i) / (N - 1)`` (our choice: the paper gives only 1 and 2 steps). ``N``
evaluations, CFG doubles them. The re-noise comes from a generator seeded by ``seed`` and ``x0``
(as ``methods/consistency.py``).

=====================  ============================  =============================================
option                 default (source)              official (FastGen sCM)
=====================  ============================  =============================================
sigma_d                0.5 (paper, pixels in [-1,1]) 0.5 (config_scm.py:39)
p_mean, p_std          -1.0, 1.4 (paper, CIFAR-10)   -1.0, 1.4 (config_scm.py:35-36)
tangent_warmup         0.1 of the run (here: short   10,000 iterations (config_scm.py:51), a
                       runs must reach r = 1)        fixed count
tangent_norm           rms: ``||g|| / sqrt(D)``       rms (``g_norm_spatial_invariance``,
                       (official)                    config_scm.py:57, sCM.py:272-274); the paper
                                                     writes ``||g||`` (``l2``)
tangent_c              0.1 (paper, official)         0.1 (config_scm.py:53)
prior_weighting        true: 1 / (sigma_d tan tau)   true (config_scm.py:55, sCM.py:278)
adaptive_weighting     true (paper)                  true (logvar head of the network)
divide_by_dim          false: mean over D once       true: the mean is divided by D again
                       (paper's ``1/D ||.||^2``)     (config_scm.py:59, sCM.py:279); only shifts
                                                     the optimum of logvar by log D
mid_time               1.1 (paper, 2-step sampling)  a t_list given per config
t_scale                1 (paper Sec. 4.1)            network-specific (``c_noise(t) = t``)
label_dropout          0.1 (every method here)       dataset-specific
teacher                null: sCT; a flow-matching    ``use_cd`` (config_scm.py:49), teacher CFG
                       run: sCD (unguided teacher)   ``guidance_scale`` (sCM.py:212-217): not here
=====================  ============================  =============================================
"""

from __future__ import annotations

import hashlib
import math
from typing import Annotated, Literal

import torch
from torch import Tensor, nn

from bench.budget import Cost
from bench.data import Batch
from bench.dit import FLOW_MATCHING_LEVEL
from bench.guidance import drop_labels, guided_velocity
from bench.options import Positive, PositiveInt, Probability, Range
from methods.base import Method, Nets
from methods.common import bcast, noise
from methods.jvp import jvp

FOURIER_CHANNELS = 128  # the logvar head's features (EDM2's logvar_channels, FastGen's networks)


def linear_time(tau: Tensor, sigma_d: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(k, s, 1 - s)`` for TrigFlow angles ``tau``: ``x_s = k x^_tau`` on the linear path at the
    same signal-to-noise ratio, ``s = k cos(tau)``, ``1 - s = k sigma_d sin(tau)`` (computed as
    such, so ``1 - s`` keeps its digits near the data end)."""
    c, sn = torch.cos(tau), torch.sin(tau)
    k = 1 / (c + sigma_d * sn)
    return k, k * c, k * sigma_d * sn


def trig_time(s: Tensor, sigma_d: float) -> Tensor:
    """The inverse of ``linear_time``: ``tau = atan2(1 - s, sigma_d s)`` (sCM.py:203's form)."""
    return torch.atan2(1 - s, sigma_d * s)


class AdaptiveWeight(nn.Module):
    """``logvar(tau)``: fixed random Fourier features of ``tau`` (EDM2's ``MPFourier``: frequencies
    ``2 pi N(0, 1)``, phases ``2 pi U(0, 1)``, drawn from a fixed seed, so construction leaves the
    global RNG alone), then a linear layer, zero-initialised so training starts at ``logvar = 0``."""

    def __init__(self, channels: int = FOURIER_CHANNELS):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels, generator=gen))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels, generator=gen))
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, tau: Tensor) -> Tensor:
        feats = torch.cos(tau.float()[:, None] * self.freqs + self.phases) * math.sqrt(2)
        return self.linear(feats).squeeze(-1).to(tau.dtype)


class SCM(Method):
    # The JVP goes through torch.func (methods/jvp.py): under DDP the trainer hands us the
    # unwrapped network and all-reduces the gradients itself.
    explicit_grad_sync = True
    d_embedding, t_scale = "linear", 1.0  # bench.build builds the network with these
    needs_teacher = "optional"  # sCT without one, sCD with one (method.teacher in the config)

    def __init__(
        self,
        total_steps: PositiveInt,  # the run's training steps (${train.steps}): the warm-up spans a share
        sigma_d: Positive = 0.5,
        p_mean: float = -1.0,
        p_std: Positive = 1.4,
        tangent_warmup: Probability = 0.1,
        tangent_norm: Literal["rms", "l2", "none"] = "rms",
        tangent_c: Positive = 0.1,
        prior_weighting: bool = True,
        adaptive_weighting: bool = True,
        divide_by_dim: bool = False,
        mid_time: Annotated[float, Range(0, math.pi / 2, lo_open=True, hi_open=True)] = 1.1,
        label_dropout: Probability = 0.1,
        cfg_scale: float = 1.0,
        t_scale: Positive = 1.0,
        seed: int = 0,
    ):
        super().__init__()
        self.set_options(locals())
        self.logvar = AdaptiveWeight()
        self.teacher: nn.Module | None = None  # sCD when set (a sub-module: checkpoints carry it)

    def train(self, mode: bool = True) -> SCM:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen, whatever mode the method is put in
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.logvar.parameters()) if self.adaptive_weighting else []

    # -- the TrigFlow view of the network ------------------------------------------------------
    def trig_output(self, net: nn.Module, xh: Tensor, tau: Tensor, y: Tensor | None) -> Tensor:
        """``F(x^ / sigma_d, tau)`` from one call ``u = net(k x^, s, 1 - s, y)``:
        ``sigma_d F = cos(tau) sigma_d eps^ - sin(tau) x1^`` with ``x1^ = x_s + (1 - s) u``,
        ``eps^ = x_s - s u``."""
        k, s, d = linear_time(tau, self.sigma_d)
        x = bcast(k, xh) * xh
        u = net(x, s, d, y)
        x1_hat = x + bcast(d, x) * u
        eps_hat = x - bcast(s, x) * u
        c, sn = bcast(torch.cos(tau), x), bcast(torch.sin(tau), x)
        return (c * self.sigma_d * eps_hat - sn * x1_hat) / self.sigma_d

    def consistency_map(self, F: Tensor, xh: Tensor, tau: Tensor) -> Tensor:
        """``f(x^, tau) = cos(tau) x^ - sin(tau) sigma_d F`` (the data estimate ``x1^``)."""
        return bcast(torch.cos(tau), xh) * xh - bcast(torch.sin(tau), xh) * self.sigma_d * F

    def teacher_velocity(self, xh: Tensor, tau: Tensor, y: Tensor | None) -> Tensor:
        """sCD's ``dx^/dtau``: the teacher's velocity ``v`` at ``(x_s, s)`` (flow-matching level),
        mapped as the student's output is: ``cos(tau) sigma_d (x_s - s v) - sin(tau) (x_s + (1-s) v)``
        (its expectation of ``cos(tau) z - sin(tau) x1`` given ``x^``)."""
        k, s, d = linear_time(tau, self.sigma_d)
        x = bcast(k, xh) * xh
        v = self.teacher(x, s, torch.full_like(s, FLOW_MATCHING_LEVEL), y)
        c, sn = bcast(torch.cos(tau), x), bcast(torch.sin(tau), x)
        return c * self.sigma_d * (x - bcast(s, x) * v) - sn * (x + bcast(d, x) * v)

    # -- training ------------------------------------------------------------------------------
    def sample_tau(self, n: int, device) -> Tensor:
        """``tau = arctan(exp(P_mean + P_std n) / sigma_d)``: EDM's log-normal ``sigma`` as an angle."""
        sigma = torch.exp(self.p_mean + self.p_std * torch.randn(n, device=device))
        return torch.atan(sigma / self.sigma_d)

    def warmup(self, step: int) -> float:
        """``r = min(1, step / (tangent_warmup total_steps))``; no warm-up: 1."""
        span = self.tangent_warmup * self.total_steps
        return 1.0 if span <= 0 else min(1.0, max(step, 0) / span)

    def tangent(
        self, F: Tensor, dF: Tensor, xh: Tensor, dxdt: Tensor, tau: Tensor, r: float
    ) -> Tensor:
        """The normalised tangent ``g`` (sCM.py:259-275); ``dF`` is ``cos sin dF-/dtau``."""
        c, cs = bcast(torch.cos(tau), xh), bcast(torch.cos(tau) * torch.sin(tau), xh)
        g = -c * c * (self.sigma_d * F - dxdt) - r * (cs * xh + self.sigma_d * dF)
        if self.tangent_norm != "none":
            norm = g.flatten(1).norm(dim=1)
            if self.tangent_norm == "rms":
                norm = norm / math.sqrt(g[0].numel())
            g = g / (bcast(norm, g) + self.tangent_c)
        return g

    def output_and_tangent(
        self, net: nn.Module, xh: Tensor, tau: Tensor, dxdt: Tensor, y: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """``F`` (with its graph) and ``cos sin dF/dtau`` (detached) from one JVP with tangents
        ``(cos sin dx^/dtau, cos sin)`` on ``(x^, tau)`` (sCM.py:176-179)."""
        cs = torch.cos(tau) * torch.sin(tau)
        F, dF = jvp(
            net,
            "sCM",
            lambda x, tt: self.trig_output(net, x, tt, y),
            (xh, tau),
            (bcast(cs, xh) * dxdt, cs),
        )
        return F, dF.detach()

    def loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        net, x1, eps = nets.online, batch.x1, noise(batch)
        tau = self.sample_tau(x1.shape[0], x1.device)
        y = drop_labels(batch.y, self.label_dropout, net.num_classes)
        c, sn = bcast(torch.cos(tau), x1), bcast(torch.sin(tau), x1)
        z = self.sigma_d * eps
        xh = c * x1 + sn * z
        if self.teacher is None:
            dxdt = c * z - sn * x1  # sCT: the conditional velocity
        else:
            with torch.no_grad():
                dxdt = self.teacher_velocity(xh, tau, y)  # sCD
        F, dF = self.output_and_tangent(net, xh, tau, dxdt, y)
        r = self.warmup(step)
        g = self.tangent(F.detach(), dF, xh, dxdt, tau, r)
        mse = (F - F.detach() - g).square().flatten(1).mean(1)  # per row, mean over D
        weight = (
            1 / (self.sigma_d * torch.tan(tau)) if self.prior_weighting else torch.ones_like(tau)
        )
        if self.divide_by_dim:
            weight = weight / x1[0].numel()
        if self.adaptive_weighting:
            logvar = self.logvar(tau)
            loss = (weight / torch.exp(logvar) * mse + logvar).mean()
        else:
            logvar = torch.zeros_like(tau)
            loss = (weight * mse).mean()
        # What the value means: the squared distance of the consistency map from its target
        # (``||g||^2`` before the step) is the mean of ``mse`` at this theta.
        return loss, {
            "loss/consistency": mse.detach().mean(),
            "loss/logvar": logvar.detach().mean(),
            "scm/warmup": torch.full((), r, device=x1.device),
        }

    def cost(self) -> Cost:
        # Per row: the JVP's primal forward, which keeps its graph (1), and its backward (2), plus
        # the tangent pass (1): 4, as MeanFlow. sCD adds one no-grad teacher forward.
        return Cost(per_sample=4.0 + (self.teacher is not None))

    # -- sampling ------------------------------------------------------------------------------
    def times(self, steps: int) -> list[float]:
        """Linear-path times ``s_i`` of the ``N`` jumps: ``s_0 = 0`` (pure noise), then
        ``tau_i = mid_time (N - i) / (N - 1)`` mapped by ``linear_time``."""
        taus = [self.mid_time * (steps - i) / (steps - 1) for i in range(1, steps)]
        s = linear_time(torch.tensor(taus, dtype=torch.float64), self.sigma_d)[1]
        return [0.0, *s.tolist()]

    def renoise_generator(self, x0: Tensor) -> torch.Generator:
        """A generator on ``x0``'s device seeded by ``seed`` and the first 64 values of ``x0``."""
        head = x0.detach().flatten()[:64].float().cpu().numpy().tobytes()
        digest = hashlib.sha256(str(self.seed).encode() + head).digest()
        return torch.Generator(device=x0.device).manual_seed(
            int.from_bytes(digest[:8], "little") >> 1
        )

    @torch.no_grad()
    def sample(self, net: nn.Module, x0: Tensor, steps: int, y: Tensor | None = None) -> Tensor:
        steps = self.check_budget(steps)
        n = x0.shape[0]
        scale = self.cfg_scale if y is not None and self.guided(steps) else 1.0
        times = self.times(steps)
        gen = self.renoise_generator(x0) if steps > 1 else None
        x = x0
        for i, s in enumerate(times):
            ss = torch.full((n,), s, device=x0.device)
            dd = 1 - ss
            u = guided_velocity(net, x, ss, dd, y, scale) if y is not None else net(x, ss, dd)
            x1_hat = x + (1 - s) * u
            if i + 1 < steps:
                s_next = times[i + 1]
                z = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
                x = (1 - s_next) * z + s_next * x1_hat
        return x1_hat
