"""What several methods share: the path between noise and data, the noise itself, the Euler
sampler, the split of a batch into kinds of row, two-step targets and the regression loss.

Time convention for the whole project (docs/methods.md): ``t = 0`` is noise ``x0 ~ N(0, I)``, ``t = 1`` is data
``x1``, ``x_t = (1 - t) x0 + t x1``, velocity ``v = x1 - x0``. The network is
``net(x, t, d, y)``: ``d`` is the step size it is asked about (``1/128`` is the flow-matching
level), ``y`` a label or the null label ``num_classes``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bench.data import Batch
from bench.guidance import guided_velocity


def bcast(s: Tensor, x: Tensor) -> Tensor:
    """Per-row scalars ``s`` (N,) shaped to broadcast against ``x`` (N, ...)."""
    return s.view(-1, *([1] * (x.dim() - 1)))


def interpolate(x0: Tensor, x1: Tensor, t: Tensor, sigma_min: float = 0.0) -> Tensor:
    """``x_t = (1 - t) x0 + t x1`` with ``t`` of shape (N,) broadcast over the sample dims; with
    ``sigma_min > 0`` the path ``(1 - (1 - sigma_min) t) x0 + t x1`` (Lipman et al. 2022; the
    official shortcut code's 1e-5), which ends at ``x1 + sigma_min x0`` instead of ``x1``."""
    t = bcast(t, x0)
    if sigma_min == 0.0:
        return (1 - t) * x0 + t * x1
    return (1 - (1 - sigma_min) * t) * x0 + t * x1


def noise(batch: Batch) -> Tensor:
    """The batch's noise ``x0``: the one it carries (tests, fixed pairs) or fresh Gaussian noise
    from the global RNG, which the trainer seeds per step."""
    return batch.x0 if batch.x0 is not None else torch.randn_like(batch.x1)


def leading_rows(ratio: float, batch_size: int) -> int:
    """How many leading rows of a batch get the method's special targets (bootstrap, live
    reflow, ``r != t``): ``floor(ratio * B)``, so any ratio < 1 leaves at least one plain
    flow-matching row."""
    return int(math.floor(ratio * batch_size))


def frozen_copy(net: nn.Module) -> nn.Module:
    """A teacher as a method keeps it: an eval-mode copy without gradients."""
    return copy.deepcopy(net).eval().requires_grad_(False)


@torch.no_grad()
def euler(
    net: nn.Module,
    x0: Tensor,
    steps: int,
    d: float,
    y: Tensor | None = None,
    scale: float = 1.0,
) -> Tensor:
    """``steps`` Euler steps from noise: ``t_i = i / N``, ``x <- x + (1/N) v(x, t_i, d, y)`` for
    ``i = 0..N-1``, every call at step size ``d``. With labels the velocity is classifier-free
    guided at ``scale`` (1: the plain conditional model, one evaluation per step)."""
    n, dt = x0.shape[0], 1.0 / steps
    dd = torch.full((n,), d, device=x0.device)
    x = x0
    for i in range(steps):
        t = torch.full((n,), i * dt, device=x0.device)
        v = guided_velocity(net, x, t, dd, y, scale) if y is not None else net(x, t, dd)
        x = x + dt * v
    return x


def two_step_average(
    velocity,
    xt: Tensor,
    t: Tensor,
    d: Tensor,
    clip: float | None = None,
    clip_target: bool = True,
) -> Tensor:
    """The velocity of one step of size ``2d`` built from two of size ``d`` (shortcut bootstrap,
    progressive-distillation target): ``(v(x_t, t) + v(x_t + d v(x_t, t), t + d)) / 2``, with the
    midpoint clipped to ``[-clip, clip]`` when ``clip`` is set, and the result too unless
    ``clip_target=False`` (the official progressive-distillation target clips only the midpoint)."""
    dd = bcast(d, xt)
    v1 = velocity(xt, t)
    x_mid = xt + dd * v1
    if clip is not None:
        x_mid = x_mid.clamp(-clip, clip)
    target = (v1 + velocity(x_mid, t + d)) / 2
    return target.clamp(-clip, clip) if clip is not None and clip_target else target


@dataclass
class Regression:
    """A batch of regression problems ``net(xt, t, d, y) -> target`` (what most losses are)."""

    xt: Tensor
    t: Tensor
    d: Tensor
    y: Tensor | None
    target: Tensor
    num_consistency: int = 0  # leading rows with bootstrap targets (shortcut models)


def regression_loss(net: nn.Module, r: Regression, lead: str) -> tuple[Tensor, dict[str, Tensor]]:
    """Plain MSE of ``net(xt, t, d, y)`` against ``r.target`` over all rows, logged per part: the
    leading ``r.num_consistency`` rows as ``loss/<lead>``, the rest as ``loss/flow``."""
    v = net(r.xt, r.t, r.d, r.y)
    err = (v - r.target).square().flatten(1).mean(1)  # per row
    m = r.num_consistency
    logs = {"loss/flow": err[m:].mean().detach()}
    if m:
        logs[f"loss/{lead}"] = err[:m].mean().detach()
    return err.mean(), logs
