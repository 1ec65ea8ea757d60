"""Evaluation at step budgets: fixed noise, one protocol, every number with its protocol.

For each budget ``N`` the method samples ``num_samples`` images from the same fixed noise (seed
``eval.seed``; balanced labels when class-conditional), and the evaluator reports

* images: the offline Frechet distance in a frozen feature space (``bench.metrics.feature_net``)
  and, in the same features, KID, precision/recall, density/coverage, class-histogram KL and the
  copy rate (``bench.metrics.quality``); with ``fid`` also clean-fid Inception FID (``fid/steps_N``);
  against the training split (``fd/train/steps_N``, the paper convention) and the held-out split
  (``fd/test/steps_N``), plus the real-vs-real floor (``fd/train/floor``: held-out images against
  the training statistics, ``num_samples`` of them or the whole held-out split when it is smaller
  -- 450 for digits16, which overstates the floor at 1,000 since FD's bias falls like 1/N);
* points (2-D toys): energy distance and unbiased RBF-MMD^2 against the held-out draw, and the
  same for real training points (``.../floor``); never FD there;
* ``nfe/steps_N`` (CFG doubling included) and ``sample/img_per_s_steps_N``.

``protocol()`` is attached to every run as tags: sample count, references, extractor and its hash.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from bench.data import Dataset
from bench.errors import UserError
from bench.metrics import points, quality
from bench.metrics.feature_net import extract, load_feature_net, weights_hash
from bench.metrics.frechet import Stats, frechet_distance

#: Bumped whenever a metric's definition changes: stored results of another version are
#: recomputed on the next run instead of being reported beside new ones.
METRICS_VERSION = 2


@dataclass
class BudgetResult:
    steps: int
    metrics: dict[str, float]
    samples: Tensor = field(repr=False)


def fixed_noise(
    data: Dataset, n: int, seed: int, conditional: bool
) -> tuple[Tensor, Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn((n, *data.shape), generator=g)
    y = torch.arange(n) % data.num_classes if conditional and data.num_classes else None
    return x0, y


class Evaluator:
    """Fixed noise, fixed references, one protocol for every budget of a run.

    ``fid`` adds clean-fid Inception FID (``fid/steps_N``) against cached training statistics;
    ``fid_extractor`` replaces Inception by any network taking [0, 255] images (tests)."""

    def __init__(
        self,
        data: Dataset,
        num_samples: int,
        seed: int,
        batch_size: int,
        device: torch.device,
        conditional: bool,
        fid: bool = False,
        inception_dir: str | None = None,
        cache_dir: str | None = None,
        fid_extractor=None,
        features: str = "auto",
        decoder=None,
    ):
        self.data, self.n, self.seed, self.batch_size = data, num_samples, seed, batch_size
        self.device, self.conditional = device, conditional
        self.x0, self.y = fixed_noise(data, num_samples, seed, conditional)
        self.fid, self.decoder = None, decoder
        if data.kind == "points":
            self.reference = data.test_x
            # Floor: real training points (a different draw from the reference) at the same count.
            g = torch.Generator().manual_seed(seed + 1)
            real = data.train_x[torch.randperm(len(data.train_x), generator=g)[:num_samples]]
            self.floor = self._point_metrics(real, "floor")
            return
        self.extractor, self.extractor_name = load_feature_net(
            data.name, data.shape[0], features, data.train_x
        )
        self.extractor_hash = weights_hash(self.extractor)
        self.train_feats = extract(self.extractor, data.train_x)
        self.train_stats = Stats.of(self.train_feats)
        self.test_stats = Stats.of(extract(self.extractor, data.test_x))
        labelled = self.extractor_name.startswith("classifier") and data.train_y is not None
        self.train_labels = data.train_y.numpy() if labelled else None
        self.copies = quality.CopyDetector(data.train_x) if data.kind == "image" else None
        # The floor: real held-out images against the training references, at the sample count
        # when the held-out split is large enough, else at the split's size (stated in the tags).
        self.floor_count = min(num_samples, len(data.test_x))
        self.floor = {
            k.replace("steps_floor", "floor"): v
            for k, v in self._image_metrics(data.test_x[: self.floor_count], "steps_floor").items()
        }
        del self.floor["fd/test/floor"]  # held-out images against themselves: 0 by construction
        if fid:
            self._setup_fid(inception_dir, cache_dir, fid_extractor)

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        """Latents -> images in [-1, 1] with ``eval.decoder`` (pixels pass through)."""
        if self.decoder is None:
            return x
        return self.decoder(x.to(self.device)).float().cpu().clamp(-1, 1)

    def _setup_fid(self, inception_dir, cache_dir, extractor) -> None:
        from bench.metrics import clean_fid

        if self.data.kind == "points":
            raise UserError(f"eval.fid=true needs images, but {self.data.name} holds 2-D points")
        if self.data.kind == "latent" and self.decoder is None and self.data.latent is not None:
            # Latents from bench.encode name their VAE and scale: decode with exactly those.
            from bench.vae import VAEDecoder

            info = self.data.latent
            self.decoder = VAEDecoder(info.vae, info.scaling_factor).to(self.device).eval()
        if self.data.kind == "latent" and self.decoder is None:
            raise UserError(
                "eval.fid=true on latents needs eval.decoder (a _target_ that maps latents to "
                "images in [-1, 1], e.g. bench.vae.VAEDecoder) or latents written by "
                "python -m bench.encode, whose latents.json names the VAE"
            )
        name = "custom" if extractor is not None else "inception-v3-clean"
        if extractor is None:
            extractor = clean_fid.inception(inception_dir, self.device)
        image = self.decode(self.data.train_x[:1]).shape[1:]
        res = f"{image[1]}x{image[2]}"
        key = {
            "dataset": self.data.name,
            "split": "train",
            "resolution": res,
            "extractor": name,
            "n": str(len(self.data.train_x)),
            "decoded": str(self.decoder is not None),
        }
        if self.decoder is not None:  # other decoder (or VAE weights), other reference images
            key["decoder"] = str(getattr(self.decoder, "name", type(self.decoder).__name__))
            if self.data.latent is not None and self.data.latent.vae_sha256:
                key["vae_sha256"] = str(self.data.latent.vae_sha256)
        stats, path = clean_fid.reference_stats(
            self.data.train_x,
            key,
            Path(cache_dir or "~/.cache/fewstep-bench"),
            extractor,
            self.device,
            transform=self.decode if self.decoder is not None else None,
        )
        self.fid = (clean_fid, extractor, stats, name, path)

    def protocol(self) -> dict[str, str]:
        p = {"eval.num_samples": str(self.n), "eval.noise_seed": str(self.seed)}
        if self.data.kind == "points":
            p.update(
                {
                    "eval.metric": "energy distance, RBF-MMD^2 (unbiased)",
                    "eval.reference": f"{self.data.name} held-out draw ({len(self.reference)} points)",
                }
            )
        else:
            p.update(
                {
                    "eval.metric": "offline FD (Frechet distance in extractor features)",
                    "eval.reference": f"{self.data.name} train ({len(self.data.train_x)}) and "
                    f"test ({len(self.data.test_x)}) splits",
                    "eval.extractor": self.extractor_name,
                    "eval.extractor_hash": self.extractor_hash,
                    "eval.floor_count": str(self.floor_count),
                    "eval.other_metrics": "KID (cubic kernel, z-scored features, 20 subsets), "
                    "precision/recall and density/coverage (k=3), class-histogram KL, "
                    "copy rate (pixel L2 < 1/3 median train NN distance); all vs the train split",
                }
            )
        if self.fid is not None:
            _, _, stats, name, path = self.fid
            p.update(
                {
                    "eval.fid_extractor": name,
                    "eval.fid_mode": "clean-fid clean resize to 299",
                    "eval.fid_reference": f"{self.data.name} train ({stats.n} images), {path}",
                }
            )
            if self.decoder is not None:  # latents: which decoder made the images FID saw
                p["eval.fid_decoder"] = getattr(self.decoder, "name", type(self.decoder).__name__)
        return p

    @torch.no_grad()
    def _image_metrics(self, samples: Tensor, key: str) -> dict[str, float]:
        """Every feature-space metric of ``samples`` against the training references."""
        # Pixels are clamped to the data range before the extractor; latents are not bounded.
        x = samples.clamp(-1, 1) if self.data.kind == "image" else samples
        feats = extract(self.extractor, x)
        stats = Stats.of(feats)
        kid_mean, kid_std = quality.kid(feats, self.train_feats)
        precision, recall = quality.precision_recall(feats, self.train_feats)
        density, coverage = quality.density_coverage(feats, self.train_feats)
        m = {
            f"fd/train/{key}": frechet_distance(stats, self.train_stats),
            f"fd/test/{key}": frechet_distance(stats, self.test_stats),
            f"kid/{key}": kid_mean,
            f"kid_std/{key}": kid_std,
            f"precision/{key}": precision,
            f"recall/{key}": recall,
            f"density/{key}": density,
            f"coverage/{key}": coverage,
        }
        if self.train_labels is not None:
            labels = self.extractor.head(torch.as_tensor(feats)).argmax(1).numpy()
            m[f"class_kl/{key}"] = quality.class_kl(
                labels, self.train_labels, self.data.num_classes
            )
        if self.copies is not None:
            m[f"copy_rate/{key}"] = self.copies.rate(x)
        return m

    def _point_metrics(self, x: Tensor, suffix: str) -> dict[str, float]:
        return {
            f"energy/{suffix}": points.energy_distance(x, self.reference),
            f"mmd/{suffix}": points.rbf_mmd2(x, self.reference),
            f"sw2/{suffix}": points.sliced_w2(x, self.reference),
            f"w2/{suffix}": points.exact_w2(x, self.reference),
        }

    @torch.no_grad()
    def sample(self, method, net: nn.Module, steps: int) -> tuple[Tensor, float]:
        """All ``num_samples`` samples at ``steps`` and the wall time spent sampling."""
        out, elapsed = [], 0.0
        for i in range(0, self.n, self.batch_size):
            x0 = self.x0[i : i + self.batch_size].to(self.device)
            y = None if self.y is None else self.y[i : i + self.batch_size].to(self.device)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            tick = time.perf_counter()
            x = method.sample(net, x0, steps, y)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed += time.perf_counter() - tick
            out.append(x.float().cpu())
        return torch.cat(out), elapsed

    def evaluate(self, method, net: nn.Module, steps: int) -> BudgetResult:
        net.eval()
        samples, elapsed = self.sample(method, net, steps)
        key = f"steps_{steps}"
        m = {
            f"nfe/{key}": float(method.nfe(steps, self.y is not None)),
            f"sample/img_per_s_{key}": self.n / max(elapsed, 1e-9),
        }
        if not torch.isfinite(samples).all():
            m["nonfinite_fraction/" + key] = float((~torch.isfinite(samples)).float().mean())
            samples = torch.nan_to_num(samples, nan=0.0, posinf=1e3, neginf=-1e3)
        if self.data.kind == "points":
            m.update(self._point_metrics(samples, key))
        else:
            m.update(self._image_metrics(samples, key))
        if self.fid is not None:
            clean_fid, extractor, stats, _, _ = self.fid
            transform = self.decode if self.decoder is not None else None
            m[f"fid/{key}"] = clean_fid.fid(
                samples, stats, extractor, self.device, transform=transform
            )
        return BudgetResult(steps, m, samples)


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
