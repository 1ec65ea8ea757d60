"""Classifier-free guidance as a wrapper around the network (Ho & Salimans 2022).

``v = v(x, t, d, null) + w (v(x, t, d, y) - v(x, t, d, null))``, evaluated as one doubled batch.
A guided call costs two network evaluations per sample; ``guided_nfe`` counts them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def guided_velocity(
    net: nn.Module, x: Tensor, t: Tensor, d: Tensor, y: Tensor, scale: float
) -> Tensor:
    """Guided velocity at scale ``w``; ``w = 1`` is the plain conditional model (one evaluation)."""
    if scale == 1.0:
        return net(x, t, d, y)
    n = x.shape[0]
    null = torch.full_like(y, net.num_classes)
    both = net(
        torch.cat([x, x]),
        torch.cat([t.expand(n), t.expand(n)]),
        torch.cat([d.expand(n), d.expand(n)]),
        torch.cat([y, null]),
    )
    cond, uncond = both.chunk(2)
    return uncond + scale * (cond - uncond)


def drop_labels(y: Tensor | None, p: float, num_classes: int) -> Tensor | None:
    """Replace each label by the null label with probability ``p`` (CFG training)."""
    if y is None or p <= 0:
        return y
    drop = torch.rand(y.shape, device=y.device) < p
    return torch.where(drop, torch.full_like(y, num_classes), y)
