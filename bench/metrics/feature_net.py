"""The offline feature space: a small CNN classifier trained on a benchmark's own training split.

Inception FID on 16x16 images is meaningless (docs/evaluation.md); like "MNIST FID with a LeNet",
the offline FD is the Frechet distance in the penultimate (64-d) features of a classifier trained
on the dataset itself. The weights for ``digits16`` and ``shapes16`` ship with the package
(``weights/*.pt``), so every machine measures in the same frozen feature space; each result records
``weights_hash`` (sha256 of the parameters). ``python -m bench.metrics.feature_net digits16``
retrains them deterministically. Datasets without shipped weights get a randomly initialised
network of the same shape (seed 0) whose features are z-scored by their mean and spread on the
training split (``Standardised``; raw, they give FDs around 1e-6 on a user's folder), named
``random-cnn`` in every result, or -- with ``eval.features=pixel_pca`` -- the top 64 principal
components of the training pixels. docs/evaluation.md has the checks behind this choice.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.errors import UserError

WEIGHTS = Path(__file__).parent / "weights"
FEATURE_DIM = 64


class FeatureNet(nn.Module):
    """conv32-conv32-pool-conv64-conv64-global-pool -> 64-d features -> class logits."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        conv = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.ReLU())  # noqa: E731
        self.body = nn.Sequential(
            conv(channels, 32),
            conv(32, 32),
            nn.MaxPool2d(2),
            conv(32, 64),
            conv(64, 64),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, FEATURE_DIM),
            nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, max(num_classes, 1))
        self.channels, self.num_classes = channels, num_classes

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def weights_hash(net: nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def train_feature_net(
    x: Tensor, y: Tensor, num_classes: int, epochs: int = 40, seed: int = 0
) -> FeatureNet:
    """Deterministic Adam training on CPU (fixed seed, fixed shuffles, light shift augmentation)."""
    torch.manual_seed(seed)
    net = FeatureNet(x.shape[1], num_classes)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * (len(x) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - 63, 64):
            idx = perm[i : i + 64]
            xb = x[idx]
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()  # +-1 px jitter
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


@torch.no_grad()
def accuracy(net: FeatureNet, x: Tensor, y: Tensor) -> float:
    return float((net(x).argmax(1) == y).float().mean())


class PixelPCA(nn.Module):
    """Features = the top principal components of the training pixels (sklearn PCA, fixed seed):
    a learned-nothing feature space for unlabeled folders, next to ``random-cnn``."""

    def __init__(self, mean: Tensor, components: Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("components", components)  # (k, D)

    @classmethod
    def fit(cls, train_x: Tensor, k: int = FEATURE_DIM) -> PixelPCA:
        from sklearn.decomposition import PCA

        flat = train_x.flatten(1).double().numpy()
        pca = PCA(n_components=min(k, *flat.shape), svd_solver="full", random_state=0).fit(flat)
        return cls(torch.from_numpy(pca.mean_).float(), torch.from_numpy(pca.components_).float())

    def features(self, x: Tensor) -> Tensor:
        return (x.flatten(1) - self.mean) @ self.components.T


class Standardised(nn.Module):
    """``net``'s features z-scored by their per-dimension mean and standard deviation on the
    training split; dimensions constant there (dead ReLUs) are dropped.

    A randomly initialised network's features are tiny and unevenly scaled (FDs around 1e-6 on a
    user's folder, dominated by a few dimensions); z-scored, every kept dimension counts in units
    of its spread on real data, as KID's features always were. Fitted on the reference itself,
    so the training split scores 0 mean and unit variance by construction."""

    def __init__(self, net: nn.Module, train_x: Tensor):
        super().__init__()
        self.net = net
        raw = torch.as_tensor(extract(net, train_x), dtype=torch.float64)
        sd = raw.std(0)
        keep = sd > 1e-6 * float(sd.max().clamp_min(1e-30))
        self.register_buffer("keep", keep)
        self.register_buffer("mean", raw.mean(0)[keep].float())
        self.register_buffer("std", sd[keep].float())

    @property
    def kept(self) -> int:
        return int(self.keep.sum())

    def features(self, x: Tensor) -> Tensor:
        return (self.net.features(x)[:, self.keep] - self.mean) / self.std


FEATURES = ("auto", "classifier", "random_cnn", "pixel_pca")


def load_feature_net(
    dataset: str, channels: int, kind: str = "auto", train_x: Tensor | None = None
):
    """The frozen extractor and its name. ``auto``: ``classifier-<dataset>`` when weights ship,
    else ``random-cnn``, z-scored by its features on ``train_x`` (``Standardised``);
    ``pixel_pca`` fits PCA on ``train_x``."""
    if kind not in FEATURES:
        raise UserError(
            f"eval.features={kind!r} is not allowed; choose one of {', '.join(FEATURES)}"
        )
    path = WEIGHTS / f"{dataset}.pt"
    if kind == "classifier" and not path.exists():
        shipped = ", ".join(sorted(p.stem for p in WEIGHTS.glob("*.pt")))
        raise UserError(
            f"no classifier weights ship for {dataset!r} (only {shipped}); use eval.features=random_cnn or pixel_pca"
        )
    if kind in ("auto", "classifier") and path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        net = FeatureNet(channels, state["head.weight"].shape[0])
        net.load_state_dict(state)
        return net.eval().requires_grad_(False), f"classifier-{dataset}"
    if kind == "pixel_pca":
        return PixelPCA.fit(train_x).eval(), "pixel-pca"
    with torch.random.fork_rng():  # a fixed random network without touching the global RNG
        torch.manual_seed(0)
        net = FeatureNet(channels, 0).eval().requires_grad_(False)
    if train_x is None:
        raise ValueError("random-cnn features are z-scored on the training split: pass train_x")
    return Standardised(net, train_x).eval(), "random-cnn"


@torch.no_grad()
def extract(net: FeatureNet, x: Tensor, batch: int = 1000) -> np.ndarray:
    return torch.cat(
        [net.features(x[i : i + batch].float()) for i in range(0, len(x), batch)]
    ).numpy()


def main(names: list[str]) -> None:
    from bench import data as datasets

    WEIGHTS.mkdir(exist_ok=True)
    for name in names:
        ds = getattr(datasets, name)()
        # ~850 optimizer steps whatever the dataset size (40 epochs of digits16's 1347 images).
        epochs = max(1, round(40 * 1347 / len(ds.train_x)))
        net = train_feature_net(ds.train_x, ds.train_y, ds.num_classes, epochs=epochs)
        acc = accuracy(net, ds.test_x, ds.test_y)
        torch.save(net.state_dict(), WEIGHTS / f"{name}.pt")
        print(f"{name}: test accuracy {acc:.3f}, weights_hash {weights_hash(net)}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main(sys.argv[1:] or ["digits16", "shapes16"])
