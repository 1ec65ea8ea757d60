"""Sample distances for low-dimensional data, where a Frechet distance would be blind: a Gaussian
with the data's mean and covariance scores as perfect under FD (docs/evaluation.md).

* energy distance (Szekely & Rizzo 2004): ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` (V-statistic),
* RBF-MMD^2, unbiased (Gretton et al. 2012), bandwidth = median pairwise distance of the reference,
* sliced W2: mean over random directions of the 1-D Wasserstein-2 between sorted projections,
* exact W2 on up to 1,000 points per side (optimal assignment).
"""

from __future__ import annotations

import torch
from torch import Tensor


def energy_distance(x: Tensor, y: Tensor) -> float:
    x, y = x.double().flatten(1), y.double().flatten(1)
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def rbf_mmd2(x: Tensor, y: Tensor, bandwidth: float | None = None) -> float:
    x, y = x.double().flatten(1), y.double().flatten(1)
    dyy = torch.cdist(y, y)
    h = float(dyy[dyy > 0].median()) if bandwidth is None else bandwidth
    k = lambda d: torch.exp(-d.square() / (2 * h * h))  # noqa: E731
    m, n = len(x), len(y)
    kxx = (k(torch.cdist(x, x)).sum() - m) / (m * (m - 1))
    kyy = (k(dyy).sum() - n) / (n * (n - 1))
    return float(kxx + kyy - 2 * k(torch.cdist(x, y)).mean())


def sliced_w2(x: Tensor, y: Tensor, directions: int = 256, seed: int = 0) -> float:
    x, y = x.double().flatten(1), y.double().flatten(1)
    n = min(len(x), len(y))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(x.shape[1], directions, generator=g, dtype=torch.float64)
    w = w / w.norm(dim=0, keepdim=True)
    px, py = (x[:n] @ w).sort(0).values, (y[:n] @ w).sort(0).values
    return float((px - py).square().mean().sqrt())


def exact_w2(x: Tensor, y: Tensor, max_points: int = 1000) -> float:
    """Exact Wasserstein-2 between equal-size empirical samples (the first ``max_points`` of each):
    the optimal assignment under squared distances (Hungarian algorithm, O(n^3))."""
    from scipy.optimize import linear_sum_assignment

    n = min(len(x), len(y), max_points)
    cost = torch.cdist(x[:n].double().flatten(1), y[:n].double().flatten(1)).square().numpy()
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean() ** 0.5)
