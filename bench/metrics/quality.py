"""Sample-quality metrics beyond FD, all on feature vectors (rows are samples).

* KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic kernel ``(x.y / D + 1)^3`` on
  features z-scored by the reference statistics (raw features give noise, docs/evaluation.md);
  mean and spread over random subsets.
* Precision / recall (Kynkaanniemi et al. 2019, k = 3; the larger set is subsampled to the
  smaller one's size): a sample is "on the real manifold" when it
  lies in a ball around some real feature whose radius is that feature's distance to its k-th
  nearest real neighbour; recall swaps the roles.
* Density / coverage (Naeem et al. 2020, k = 3): density counts how many real balls contain each
  sample (/k); coverage is the fraction of real balls that contain at least one sample.
* Class-histogram KL: ``KL(p_ref || p_gen)`` between label histograms (generated labels from the
  feature net's classifier head), with add-one smoothing so a dropped class costs a finite amount.
* Copy rate (memorisation): the fraction of samples whose nearest training image (pixels, L2) is
  closer than ``1/3`` of the median nearest-neighbour distance among training images.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

K = 3  # neighbours of the k-NN metrics, as both papers use


def _t(x) -> Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def kid(gen, ref, subsets: int = 20, subset_size: int = 500, seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the unbiased cubic-kernel MMD^2 over random subsets, z-scored by ``ref``."""
    g, r = _t(gen), _t(ref)
    # Feature dimensions that are constant on the reference (dead ReLUs) carry no information and
    # would blow up under z-scoring (a sample's tiny activation / ~0 std, then cubed): drop them.
    keep = r.std(0) > 1e-6
    g, r = g[:, keep], r[:, keep]
    mu, sd = r.mean(0), r.std(0)
    g, r = (g - mu) / sd, (r - mu) / sd
    # At most half of either set per subset, so both sides vary and the spread is honest.
    m = min(subset_size, len(g) // 2, len(r) // 2)
    rng = np.random.default_rng(seed)
    k = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3  # noqa: E731
    values = []
    for _ in range(subsets):
        a = g[rng.choice(len(g), m, replace=False)]
        b = r[rng.choice(len(r), m, replace=False)]
        kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
        off = lambda K: (K.sum() - K.diagonal().sum()) / (m * (m - 1))  # noqa: E731
        values.append(float(off(kaa) + off(kbb) - 2 * kab.mean()))
    return float(np.mean(values)), float(np.std(values))


def _kth_radius(x: Tensor, k: int) -> Tensor:
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # +1: the zero distance to itself


def _matched(gen, ref, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Both sets at the same size: the k-NN radii depend on the sample count, so the larger side
    is subsampled (fixed seed) as Kynkaanniemi et al. and Naeem et al. compare equal counts."""
    g, r = _t(gen), _t(ref)
    rng = np.random.default_rng(seed)
    if len(r) > len(g):
        r = r[np.sort(rng.choice(len(r), len(g), replace=False))]
    elif len(g) > len(r):
        g = g[np.sort(rng.choice(len(g), len(r), replace=False))]
    return g, r


def precision_recall(gen, ref, k: int = K) -> tuple[float, float]:
    g, r = _matched(gen, ref)
    r_radius, g_radius = _kth_radius(r, k), _kth_radius(g, k)
    d = torch.cdist(g, r)  # (gen, ref)
    precision = (d <= r_radius[None]).any(1).double().mean()
    recall = (d.T <= g_radius[None]).any(1).double().mean()
    return float(precision), float(recall)


def density_coverage(gen, ref, k: int = K) -> tuple[float, float]:
    g, r = _matched(gen, ref)
    radius = _kth_radius(r, k)
    inside = torch.cdist(g, r) <= radius[None]  # (gen, ref)
    density = inside.sum() / (k * len(g))
    coverage = inside.any(0).double().mean()
    return float(density), float(coverage)


def class_kl(gen_labels, ref_labels, num_classes: int) -> float:
    p_gen = np.bincount(np.asarray(gen_labels), minlength=num_classes) + 1.0
    p_ref = np.bincount(np.asarray(ref_labels), minlength=num_classes) + 1.0
    p_gen, p_ref = p_gen / p_gen.sum(), p_ref / p_ref.sum()
    return float((p_ref * np.log(p_ref / p_gen)).sum())


class CopyDetector:
    """Nearest-training-image distances in pixel space, against a threshold set by the data."""

    def __init__(self, train_x: Tensor, fraction: float = 1 / 3, chunk: int = 1024):
        self.train = train_x.flatten(1).double()
        self.chunk = chunk
        nn = self.nearest(self.train, exclude_self=True)
        self.threshold = fraction * float(nn.median())

    def nearest(self, x: Tensor, exclude_self: bool = False) -> Tensor:
        out = []
        for i in range(0, len(x), self.chunk):
            d = torch.cdist(x[i : i + self.chunk].flatten(1).double(), self.train)
            if exclude_self:
                d[torch.arange(d.shape[0]), torch.arange(i, i + d.shape[0])] = float("inf")
            out.append(d.min(1).values)
        return torch.cat(out)

    def rate(self, samples: Tensor) -> float:
        return float((self.nearest(samples) < self.threshold).double().mean())
