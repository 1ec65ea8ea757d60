"""Frechet distance between Gaussians fitted to features (Heusel et al. 2017, the "F" in FID).

``FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``.
``tr((S1 S2)^(1/2))`` is the sum of square roots of the eigenvalues of ``S1 S2`` (real and
non-negative for PSD S1, S2, up to round-off): in float64 it matches ``scipy.linalg.sqrtm`` to 6
decimals and is ~30x faster (docs/evaluation.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Stats:
    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @classmethod
    def of(cls, features) -> Stats:
        f = np.asarray(features, dtype=np.float64)
        assert f.ndim == 2 and len(f) > 1, f"need (N > 1, D) features, got {f.shape}"
        return cls(f.mean(0), np.cov(f, rowvar=False), len(f))


def frechet_distance(a: Stats, b: Stats) -> float:
    diff = a.mu - b.mu
    eig = np.linalg.eigvals(a.sigma @ b.sigma)
    covmean_trace = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * covmean_trace)
