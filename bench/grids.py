"""Pictures and files of samples: a grid per budget, the samples as ``.npz``, interpolations.

``save_grid`` tiles the first 64 images of a budget (or scatters 2-D points); latents are not
drawn (decode them first). ``save_samples`` keeps every evaluated sample (float16) with its label
for outside evaluation. ``interpolation_grid`` is the shortcut paper's latent interpolation:
spherical interpolation (slerp, Shoemake 1985) between two noises, decoded at 1 and 128 steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from bench.data import Dataset


def save_grid(
    samples: Tensor, path: Path, kind: str, nrow: int = 8, limit: int | None = 64
) -> Path | None:
    """A grid of the first ``limit`` images (``nrow`` per row), or a scatter plot of 2-D points."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "points":
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(*samples[:, :2].T.numpy(), s=1, alpha=0.5)
        ax.set(xlim=(-3, 3), ylim=(-3, 3), aspect="equal")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return path
    if samples.shape[1] not in (1, 3):
        return None  # latents: decode before looking at them
    from torchvision.utils import save_image

    save_image(samples[:limit].clamp(-1, 1) * 0.5 + 0.5, path, nrow=nrow, padding=1)
    return path


def save_samples(samples: Tensor, labels: Tensor | None, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"samples": samples.numpy().astype(np.float16)}
    if labels is not None:
        arrays["labels"] = labels.numpy()
    np.savez_compressed(path, **arrays)
    return path


def slerp(z0: Tensor, z1: Tensor, a: Tensor) -> Tensor:
    """Spherical interpolation between noises (keeps the Gaussian norm; Shoemake 1985)."""
    cos = (z0 * z1).flatten(1).sum(1) / (z0.flatten(1).norm(dim=1) * z1.flatten(1).norm(dim=1))
    theta = torch.arccos(cos.clamp(-1 + 1e-7, 1 - 1e-7)).view(-1, *[1] * (z0.dim() - 1))
    a = a.view(-1, *[1] * (z0.dim() - 1))
    return (torch.sin((1 - a) * theta) * z0 + torch.sin(a * theta) * z1) / torch.sin(theta)


@torch.no_grad()
def interpolation_grid(
    method,
    net: nn.Module,
    data: Dataset,
    path: Path,
    steps=(1, 128),
    pairs: int = 4,
    points: int = 8,
    seed: int = 0,
    device="cpu",
) -> Path | None:
    """The shortcut paper's latent interpolation: slerp between two noises, decoded at each budget
    in ``steps``. One row per (budget, pair); columns run from the first noise to the second.
    Class-conditional models are sampled with the null label (unguided)."""
    if data.kind != "image":
        return None
    g = torch.Generator().manual_seed(seed)
    z0, z1 = torch.randn((2, pairs, *data.shape), generator=g)
    a = torch.linspace(0, 1, points)
    z = torch.cat(
        [
            slerp(z0[i].expand(points, *data.shape), z1[i].expand(points, *data.shape), a)
            for i in range(pairs)
        ]
    )
    rows = [method.sample(net, z.to(device), s).float().cpu() for s in steps]
    return save_grid(torch.cat(rows), path, data.kind, nrow=points, limit=None)
