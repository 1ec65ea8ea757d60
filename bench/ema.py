"""Exponential moving average of the network weights.

``theta_ema <- r theta_ema + (1 - r) theta``. With ``warmup`` the rate is
``r_s = min(r, (1 + s) / (10 + s))`` at step ``s``: docs/methods.md records a short CPU run where
the paper's constant 0.999 left the EMA near the zero-initialised output after 1,100 steps, so the
shortcut bootstrap targets were near zero (FD 838 at one step against 59 with the warm-up).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    def __init__(self, net: nn.Module, rate: float = 0.999, warmup: bool = False):
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"EMA rate {rate} must lie in [0, 1)")
        self.rate, self.warmup = rate, warmup
        self.net = copy.deepcopy(net).eval().requires_grad_(False)

    def rate_at(self, step: int) -> float:
        return min(self.rate, (1 + step) / (10 + step)) if self.warmup else self.rate

    @torch.no_grad()
    def update(self, net: nn.Module, step: int) -> None:
        ema = [p for p in self.net.parameters()]
        online = [p.detach() for p in net.parameters()]
        torch._foreach_lerp_(ema, online, 1.0 - self.rate_at(step))  # one fused op per dtype
        for b_ema, b in zip(self.net.buffers(), net.buffers(), strict=True):
            b_ema.copy_(b)
