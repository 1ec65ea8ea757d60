"""Consistency training and distillation in the DiT-velocity form the shortcut paper used for its
baselines (Song, Dhariwal, Chen, Sutskever, "Consistency Models", ICML 2023, arXiv 2303.01469;
iCT: Song & Dhariwal 2023, arXiv 2310.14189; run as baselines by Frans et al., ICLR 2025).

The network ``s(x_t, t, 1)`` is a one-step map written as a velocity: it jumps from ``x_t`` straight
to ``x1_hat = x_t + (1 - t) s(x_t, t, 1)``. A consistency model has no other step size, so it is
always conditioned on ``d = 1`` (the shortcut level 0), in training and at every sampling budget.

Consistency training (CT). A step ``d = 2^-k`` follows the curriculum
``k = min(6, floor(7 step / total_steps))``; ``t`` is a multiple of ``d`` in ``[0, 1 - d]``; one
noise ``x0`` puts both points on the same path, and the target network (no gradient) finishes the
jump from the later one:

    x_t = (1 - t) x0 + t x1,   x_{t+d} = (1 - t - d) x0 + (t + d) x1
    x1_hat = x_{t+d} + (1 - t - d) s_target(x_{t+d}, t + d, 1)
    s(x_t, t, 1) -> (x1_hat - x_t) / (1 - t)

At ``k = 0`` (``t = 0``, ``x_{t+d} = x1``) the target is ``x1 - x0``; the curriculum then shortens
``d`` so the targets bootstrap from ever closer points.

Consistency distillation (CD), when a frozen flow-matching teacher is attached (``attach_teacher``):
the same target, but ``x_{t+d} = x_t + d v_teacher(x_t, t, 1/128)`` is one teacher Euler step with
``d = 1/128`` fixed (no curriculum; ``t`` on the 128-grid), and ``x1_hat`` comes from the student's
target network.

Sampling with ``N`` steps costs ``N`` evaluations (CFG doubles them). ``renoise`` (Song et al. 2023,
Alg. 1): from ``t_i = i / N`` jump to ``x1_hat``, then re-noise to ``t_{i+1}`` with fresh noise,
``x <- (1 - t_{i+1}) z + t_{i+1} x1_hat``; ``N = 1`` is ``x1 = x0 + s(x0, 0, 1)``. The fresh noise
comes from a ``torch.Generator`` on ``x0``'s device seeded by ``seed`` and the first values of
``x0``: the same noise gives the same sample, evaluation batches get different re-noise, and the
global RNG is untouched.

The official code is kvfrans/shortcut-models (commit 6010043): ``baselines/
targets_consistency_training.py`` (``CT``), ``baselines/targets_consistency_distillation.py``
(``CD``), ``train.py``, ``model.py``, ``helper_inference.py``; every difference is an option:

=================  ===========================  ==========================================
option             default (source)             official code
=================  ===========================  ==========================================
curriculum         k = min(6, floor(7 s / S))   the same: ``floor(step / (max_steps / 7))``
                                                (``CT:10-11``)
conditioning d     1, training and sampling     none: ``ignore_dt=True`` for every baseline
                   (a one-step map)             but shortcut and live reflow (``train.py:140``)
                                                zeroes the level (``model.py:249-250``), so the
                                                network sees one constant token, as here
target             ``ema`` (official, Song      EMA (``CT:29``, ``CD:27``); ``online`` under
                   et al. 2023)                 no_grad: iCT
loss               ``mse`` (official)           MSE (``train.py:238-239``; ``pseudo_huber``:
                                                iCT, ``c = 0.00054 sqrt(dim)``, here on the
                                                velocity residual)
sampler            ``renoise`` (Song et al.)    ``renoise`` in the FID script: ``x1_hat``, then
                                                fresh noise to ``t + 1/N``
                                                (``helper_inference.py:120-123``); the
                                                in-training evaluation is Euler
                                                (``helper_eval.py:193-208``): ``euler``
clip               None (see below)             4.0 on the CD teacher step ``x_{t+d}`` (``CD:26``)
label_dropout      0.1 (every method here)      0: real labels in every forward (``CT:29``,
                                                ``CD:23``, ``CD:27``)
embedding          ``dit``: 1000 t              ``raw``: t unscaled (``model.py:82-88``)
sigma_min          0 (no option)                1e-5 (``CT:26-27``, ``CD:21``); the golden
                                                tests map it out
=================  ===========================  ==========================================

Why no clip by default: the official code clips ``x_{t+d}`` to ``[-4, 4]`` but not ``x_t``, so a
data value beyond 4 (latents, 2-D toys; never images in ``[-1, 1]``) becomes a target error
amplified by ``1 / (1 - t)``, up to 128x. On a 2-D Gaussian with values past -4 the clipped CD loss
rose over 300 steps in one seed of four; unclipped it fell 40-80x in all six tried.
"""

from __future__ import annotations

import hashlib
import math
from typing import Literal

import torch
from torch import Tensor, nn

from bench.budget import Cost
from bench.data import Batch
from bench.dit import FLOW_MATCHING_LEVEL
from bench.guidance import drop_labels, guided_velocity
from bench.options import Positive, PositiveInt, Probability
from methods.base import Embedding, Method, Nets
from methods.common import Regression, bcast, interpolate, noise

CURRICULUM_LEVELS = 7  # CT steps d = 2^-k, k = 0..6
DISTILL_LEVEL = 7  # CD: d = 1/128, the teacher's flow-matching level
HUBER_C = 0.00054  # iCT: c = 0.00054 sqrt(dim)


class Consistency(Method):
    needs_teacher = "optional"  # CT without one, CD with one (method.teacher in the config)

    def __init__(
        self,
        total_steps: PositiveInt,  # the training steps the curriculum spans (${train.steps})
        target: Literal["ema", "online"] = "ema",
        loss: Literal["mse", "pseudo_huber"] = "mse",
        sampler: Literal["renoise", "euler"] = "renoise",
        clip: Positive | None = None,
        label_dropout: Probability = 0.1,
        cfg_scale: float = 1.0,
        seed: int = 0,
        embedding: Embedding = "dit",
    ):
        super().__init__()
        self.set_options(locals(), rename={"loss": "loss_type"})  # loss() is the contract's
        self.teacher: nn.Module | None = None  # CD when set (a sub-module, so checkpoints carry it)

    def train(self, mode: bool = True) -> Consistency:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen, whatever mode the method is put in
        return self

    # -- training ------------------------------------------------------------------------------
    def level(self, step: int) -> int:
        """``k`` of the step ``d = 2^-k`` at optimizer step ``step`` (CD: always 7)."""
        if self.teacher is not None:
            return DISTILL_LEVEL
        return min(CURRICULUM_LEVELS - 1, CURRICULUM_LEVELS * max(step, 0) // self.total_steps)

    def targets(self, nets: Nets, batch: Batch, step: int) -> Regression:
        x1, n, x0 = batch.x1, len(batch), noise(batch)
        k = self.level(step)
        d = 2.0**-k
        t = torch.randint(2**k, (n,), device=x1.device).float() * d  # multiples of d in [0, 1-d]
        one = torch.ones_like(t)
        # One label per row for the online, target and teacher forwards (null when dropped).
        y = drop_labels(batch.y, self.label_dropout, nets.online.num_classes)
        xt = interpolate(x0, x1, t)
        target_net = nets.ema if self.target == "ema" else nets.online
        with torch.no_grad():
            if self.teacher is None:
                x_next = interpolate(x0, x1, t + d)  # the same noise: the same path
            else:
                v = self.teacher(xt, t, torch.full_like(t, FLOW_MATCHING_LEVEL), y)
                x_next = xt + d * v
                if self.clip is not None:
                    x_next = x_next.clamp(-self.clip, self.clip)
            x1_hat = x_next + bcast(1 - (t + d), xt) * target_net(x_next, t + d, one, y)
            target = (x1_hat - xt) / bcast(1 - t, xt)
        return Regression(xt=xt, t=t, d=one, y=y, target=target, num_consistency=n)

    def loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        r = self.targets(nets, batch, step)
        diff = (nets.online(r.xt, r.t, r.d, r.y) - r.target).flatten(1)
        if self.loss_type == "mse":
            per_row = diff.square().mean(1)
        else:  # iCT's pseudo-Huber on the whole row: sqrt(|a - b|^2 + c^2) - c
            c = HUBER_C * math.sqrt(diff.shape[1])
            per_row = (diff.square().sum(1) + c * c).sqrt() - c
        loss = per_row.mean()
        # torch.full fills on the device; torch.tensor(..., device=cuda) would copy and sync
        k = torch.full((), float(self.level(step)), device=loss.device)
        return loss, {"loss/consistency": loss.detach(), "consistency/k": k}

    # -- sampling ------------------------------------------------------------------------------
    def step_size(self, steps: int) -> float:
        return 1.0  # a consistency model is a one-step map at every budget

    def renoise_generator(self, x0: Tensor) -> torch.Generator:
        """A generator on ``x0``'s device seeded by ``seed`` and the first 64 values of ``x0``."""
        head = x0.detach().flatten()[:64].float().cpu().numpy().tobytes()
        digest = hashlib.sha256(str(self.seed).encode() + head).digest()
        return torch.Generator(device=x0.device).manual_seed(
            int.from_bytes(digest[:8], "little") >> 1
        )

    @torch.no_grad()
    def sample(self, net: nn.Module, x0: Tensor, steps: int, y: Tensor | None = None) -> Tensor:
        if self.sampler == "euler":  # the official shortcut code's evaluation of every method
            return super().sample(net, x0, steps, y)  # Euler, every step at d = step_size = 1
        steps = self.check_budget(steps)
        n = x0.shape[0]
        one = x0.new_ones(n)
        scale = self.cfg_scale if y is not None and self.guided(steps) else 1.0

        def jump(x: Tensor, t: float) -> Tensor:
            tt = torch.full((n,), t, device=x0.device)
            return guided_velocity(net, x, tt, one, y, scale) if y is not None else net(x, tt, one)

        gen = self.renoise_generator(x0) if steps > 1 else None
        x = x0
        for i in range(steps):
            t = i / steps
            x1_hat = x + (1 - t) * jump(x, t)
            if i + 1 < steps:
                t_next = (i + 1) / steps
                z = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
                x = (1 - t_next) * z + t_next * x1_hat
        return x1_hat

    def cost(self) -> Cost:
        # One fwd+bwd on every row, one no-grad target forward, and one teacher forward for CD.
        return Cost(per_sample=4.0 + (self.teacher is not None))
