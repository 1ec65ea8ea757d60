"""Metric suites: what one data kind is measured with, chosen in one place (``suite_for``).

A suite turns a set of samples into named metrics (``metrics(samples, key)``: ``<name>/<key>``),
states its protocol (``protocol()``: references, extractor and its weights hash, ...), and holds
the real-data floor (``floor``: the same metrics for real data, the best a sampler can score).

* ``ImageSuite`` (pixels and latents): the offline Frechet distance in a frozen feature space
  (``bench.metrics.feature_net``) against the training split (the paper convention) and the
  held-out split, and in the same features KID, precision/recall, density/coverage, the
  class-histogram KL and the copy rate (``bench.metrics.quality``); with ``fid`` also clean-fid
  Inception FID against cached training statistics (``bench.metrics.clean_fid``). The floor is
  held-out images against the training references, ``num_samples`` of them or the whole held-out
  split when it is smaller (450 for digits16, which overstates the floor at 1,000: FD's bias
  falls like 1/N).
* ``PointSuite`` (2-D toys): energy distance and unbiased RBF-MMD^2 against the held-out draw,
  sliced and exact W2 beside them, never FD; the floor is real training points.

The evaluator (``bench.evaluate``) never asks which suite it holds; a new data kind is a new suite
here and one line in ``suite_for``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bench.data import Dataset
from bench.errors import UserError
from bench.metrics import bootstrap, points, quality
from bench.metrics.feature_net import Standardised, extract, load_feature_net, weights_hash
from bench.metrics.frechet import Stats, frechet_distance


def sig(value: float) -> str:
    """A number at a precision that shows it: two decimals from 1 up (FD's usual range), three
    significant digits below (a KID of 4e-4 or an FD of 1e-6 never prints as 0.00)."""
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:#.3g}"


@dataclass
class FID:
    """clean-fid's Inception FID, set up: the extractor and the training statistics it compares
    to (cached at ``path``)."""

    extractor: object
    stats: Stats
    name: str
    path: Path


@torch.no_grad()
def decode(decoder, x: Tensor, device: torch.device) -> Tensor:
    """Latents -> images in [-1, 1] with ``decoder`` (pixels pass through when it is None)."""
    if decoder is None:
        return x
    return decoder(x.to(device)).float().cpu().clamp(-1, 1)


def fid_decoder(data: Dataset, decoder, device: torch.device):
    """The decoder FID sees a data set's samples through: ``decoder`` (``eval.decoder``), else
    for latents written by bench.encode the VAE and scale their latents.json names, else none
    (pixels); latents without either are refused in one sentence."""
    if data.kind == "latent" and decoder is None and data.latent is not None:
        from bench.vae import VAEDecoder

        info = data.latent
        decoder = VAEDecoder(info.vae, info.scaling_factor).to(device).eval()
    if data.kind == "latent" and decoder is None:
        raise UserError(
            "eval.fid=true on latents needs eval.decoder (a _target_ that maps latents to "
            "images in [-1, 1], e.g. bench.vae.VAEDecoder) or latents written by "
            "python -m bench.encode, whose latents.json names the VAE"
        )
    return decoder


@dataclass
class SampleFeatures:
    """clean-fid features of generated samples: the extractor and the decoder a latent run's
    samples go through first. Every process of a sharded evaluation holds one and featurizes
    its own share (bench.evaluate); only rank 0 holds the reference statistics."""

    extractor: object
    device: torch.device
    decoder: object | None = None

    def __call__(self, samples: Tensor) -> np.ndarray:
        from bench.metrics import clean_fid

        transform = None
        if self.decoder is not None:
            transform = functools.partial(decode, self.decoder, device=self.device)
        return clean_fid.sample_features(samples, self.extractor, self.device, transform=transform)

    @classmethod
    def load(cls, data: Dataset, device: torch.device, inception_dir, decoder) -> SampleFeatures:
        """A process other than rank 0: clean-fid's Inception and the run's decoder only."""
        from bench.metrics import clean_fid

        decoder = fid_decoder(data, decoder, device)
        return cls(clean_fid.inception(inception_dir, device), device, decoder)


class ImageSuite:
    """Feature-space metrics of images (or latents) against the training split.

    ``features``: ``auto`` | ``classifier`` | ``random_cnn`` | ``pixel_pca``. ``fid`` adds clean-fid
    Inception FID (``fid/<key>``); ``fid_extractor`` replaces Inception by any network taking
    [0, 255] images (tests). ``decoder`` maps latents to [-1, 1] images before FID.
    ``resamples``: bootstrap resamples for the intervals of FD and FID (0: no intervals)."""

    floor_label = "held-out images vs train statistics"

    def __init__(
        self,
        data: Dataset,
        num_samples: int,
        device: torch.device,
        features: str = "auto",
        fid: bool = False,
        inception_dir: str | None = None,
        cache_dir: str | None = None,
        fid_extractor=None,
        decoder=None,
        resamples: int = bootstrap.RESAMPLES,
    ):
        self.data, self.device, self.decoder = data, device, decoder
        if (
            isinstance(resamples, bool)
            or not isinstance(resamples, int)
            or 0 < resamples < 20
            or resamples < 0
        ):
            raise UserError(
                f"eval.bootstrap={resamples!r} is not allowed; give the number of bootstrap "
                "resamples, 0 (no intervals) or a whole number of at least 20 (default 200)"
            )
        self.resamples = resamples  # bootstrap resamples per interval (0: none)
        check_sizes(data, num_samples)
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
        self.floor = self.feature_metrics(data.test_x[: self.floor_count], "floor")
        # Held-out images against themselves: 0 by construction, and so is their interval.
        self.floor = {k: v for k, v in self.floor.items() if not k.startswith("fd/test/")}
        self.fid = self._setup_fid(inception_dir, cache_dir, fid_extractor) if fid else None

    def decode(self, x: Tensor) -> Tensor:
        """Latents -> images in [-1, 1] with the decoder (pixels pass through)."""
        return decode(self.decoder, x, self.device)

    def _setup_fid(self, inception_dir, cache_dir, extractor) -> FID:
        from bench.metrics import clean_fid

        data = self.data
        self.decoder = fid_decoder(data, self.decoder, self.device)
        name = "custom" if extractor is not None else "inception-v3-clean"
        if extractor is None:
            extractor = clean_fid.inception(inception_dir, self.device)
        image = self.decode(data.train_x[:1]).shape[1:]
        key = {
            "dataset": data.name,
            "split": "train",
            "resolution": f"{image[1]}x{image[2]}",
            "extractor": name,
            "n": str(len(data.train_x)),
            "decoded": str(self.decoder is not None),
        }
        if getattr(data, "fingerprint", ""):  # other files, other statistics (bench.identity)
            key["content"] = data.fingerprint
        if self.decoder is not None:  # other decoder (or VAE weights), other reference images
            key["decoder"] = str(getattr(self.decoder, "name", type(self.decoder).__name__))
            if data.latent is not None and data.latent.vae_sha256:
                key["vae_sha256"] = str(data.latent.vae_sha256)
        stats, path = clean_fid.reference_stats(
            data.train_x,
            key,
            Path(cache_dir or "~/.cache/fewstep-bench"),
            extractor,
            self.device,
            transform=self.decode if self.decoder is not None else None,
        )
        return FID(extractor, stats, name, path)

    @property
    def fid_features(self) -> SampleFeatures | None:
        """What each process computes from its own samples for FID (None without FID)."""
        if self.fid is None:
            return None
        return SampleFeatures(self.fid.extractor, self.device, self.decoder)

    def protocol(self) -> dict[str, str]:
        p = {
            "eval.metric": "offline FD (Frechet distance in extractor features)",
            "eval.reference": f"{self.data.name} train ({len(self.data.train_x)}) and "
            f"test ({len(self.data.test_x)}) splits",
            "eval.extractor": self.extractor_name,
            "eval.extractor_hash": self.extractor_hash,
            "eval.feature_scaling": (
                f"z-scored by the train split ({self.extractor.kept} dimensions not constant there)"
                if isinstance(self.extractor, Standardised)
                else "none"
            ),
            "eval.floor_count": str(self.floor_count),
            "eval.other_metrics": "KID (cubic kernel, z-scored features, 20 subsets), "
            "precision/recall and density/coverage (k=3), class-histogram KL, "
            "copy rate (pixel L2 < 1/3 median train NN distance); all vs the train split",
            "eval.bootstrap": bootstrap.describe(self.resamples),
        }
        if self.fid is not None:
            p.update(
                {
                    "eval.fid_extractor": self.fid.name,
                    "eval.fid_mode": "clean-fid clean resize to 299",
                    "eval.fid_reference": f"{self.data.name} train ({self.fid.stats.n} images), "
                    f"{self.fid.path}",
                }
            )
            if self.decoder is not None:  # latents: which decoder made the images FID saw
                p["eval.fid_decoder"] = getattr(self.decoder, "name", type(self.decoder).__name__)
        return p

    @torch.no_grad()
    def feature_metrics(self, samples: Tensor, key: str) -> dict[str, float]:
        """Every feature-space metric of ``samples`` against the training references."""
        # Pixels are clamped to the data range before the extractor; latents are not bounded.
        x = samples.clamp(-1, 1) if self.data.kind == "image" else samples
        feats = extract(self.extractor, x)
        stats = Stats.of(feats)
        kid_mean, kid_std = quality.kid(feats, self.train_feats)
        precision, recall = quality.precision_recall(feats, self.train_feats)
        density, coverage = quality.density_coverage(feats, self.train_feats)
        m = {
            **self.frechet(feats, stats, self.train_stats, "fd/train", key),
            **self.frechet(feats, stats, self.test_stats, "fd/test", key),
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

    def frechet(self, feats, stats: Stats, reference: Stats, base: str, key: str):
        """``<base>/<key>`` and, with resamples, its bootstrap interval
        ``<base>/ci95_low/<key>``, ``<base>/ci95_high/<key>`` (bench.metrics.bootstrap)."""
        value = frechet_distance(stats, reference)
        m = {f"{base}/{key}": value}
        if self.resamples > 0:
            # float64 resampling on the GPU when there is one (2048-d Inception features)
            device = self.device if self.device.type == "cuda" else "cpu"
            ci = bootstrap.frechet_interval(value, feats, reference, self.resamples, device=device)
            m[f"{base}/ci95_low/{key}"], m[f"{base}/ci95_high/{key}"] = ci.low, ci.high
        return m

    def metrics(
        self, samples: Tensor, key: str, fid_features: np.ndarray | None = None
    ) -> dict[str, float]:
        """The feature-space metrics, and FID (with its interval) when it is set up, from
        ``fid_features`` when the processes that drew the samples computed them (bench.evaluate)."""
        m = self.feature_metrics(samples, key)
        if self.fid is not None:
            feats = fid_features if fid_features is not None else self.fid_features(samples)
            m.update(self.frechet(feats, Stats.of(feats), self.fid.stats, "fid", key))
        return m

    #: The printed results table: its head, and how a budget's metrics fill a row.
    @property
    def table_head(self) -> str:
        fid = "       FID" if self.fid is not None else ""
        return f"FD(train)  FD(test){fid}     KID  prec  recall"

    def table_row(self, m: dict[str, float], key: str) -> str:
        fid = f" {sig(m[f'fid/{key}']):>9}" if f"fid/{key}" in m else ""
        return (
            f"{sig(m[f'fd/train/{key}']):>9} {sig(m[f'fd/test/{key}']):>9}{fid}"
            f" {sig(m[f'kid/{key}']):>7} {m[f'precision/{key}']:5.2f} {m[f'recall/{key}']:7.2f}"
        )

    def interval_row(self, m: dict[str, float], key: str) -> str | None:
        """The bootstrap intervals of a budget's Frechet distances, under its row."""
        parts = [
            f"{name} [{sig(m[f'{base}/ci95_low/{key}'])}, {sig(m[f'{base}/ci95_high/{key}'])}]"
            for base, name in (("fd/train", "train"), ("fd/test", "test"), ("fid", "FID"))
            if f"{base}/ci95_low/{key}" in m
        ]
        return "95% CI: " + "  ".join(parts) if parts else None

    def interval_note(self) -> str | None:
        if self.resamples <= 0:
            return None
        return (
            f"95% CI: bootstrap over the samples ({self.resamples} resamples, references fixed), "
            "for the FD infinitely many samples would give (bias-corrected: it can sit below "
            "the value)"
        )


class PointSuite:
    """Distances between point clouds (2-D toys) and the held-out draw; never FD."""

    table_head = "energy    mmd^2"
    floor_label = "real training points vs the reference"

    def __init__(self, data: Dataset, num_samples: int, seed: int):
        self.data, self.reference = data, data.test_x
        # Floor: real training points (a different draw from the reference) at the same count.
        g = torch.Generator().manual_seed(seed + 1)
        real = data.train_x[torch.randperm(len(data.train_x), generator=g)[:num_samples]]
        self.floor = self.metrics(real, "floor")

    def protocol(self) -> dict[str, str]:
        return {
            "eval.metric": "energy distance, RBF-MMD^2 (unbiased)",
            "eval.reference": f"{self.data.name} held-out draw ({len(self.reference)} points)",
        }

    def metrics(self, x: Tensor, key: str) -> dict[str, float]:
        return {
            f"energy/{key}": points.energy_distance(x, self.reference),
            f"mmd/{key}": points.rbf_mmd2(x, self.reference),
            f"sw2/{key}": points.sliced_w2(x, self.reference),
            f"w2/{key}": points.exact_w2(x, self.reference),
        }

    def table_row(self, m: dict[str, float], key: str) -> str:
        return f"{sig(m[f'energy/{key}']):>8} {sig(m[f'mmd/{key}']):>8}"

    def interval_row(self, m: dict[str, float], key: str) -> str | None:
        return None

    def interval_note(self) -> str | None:
        return None


Suite = ImageSuite | PointSuite


#: The fewest points each side of the k-nearest-neighbour metrics (precision, recall, density,
#: coverage; k = 3) may have: the k-th neighbour of a point other than itself must exist.
MIN_POINTS = quality.K + 1


def check_sizes(data: Dataset, num_samples: int) -> None:
    """A tiny image folder (or split) is refused in one sentence naming the minimum, before any
    metric divides by it (k-NN radii on 2 held-out images, statistics of an empty split)."""
    for what, n in (
        ("training split", len(data.train_x)),
        ("held-out split", len(data.test_x)),
        ("eval.num_samples", num_samples),
    ):
        if n < MIN_POINTS:
            raise UserError(
                f"{data.name}: the {what} has {n} items, but the metrics (k-nearest neighbours, "
                f"k={quality.K}) need at least {MIN_POINTS} in each split and in eval.num_samples; "
                "add data (an image folder holds out every 1/data.test_fraction-th image, so "
                f"{MIN_POINTS * 10} images at 0.1) or raise data.test_fraction / eval.num_samples"
            )


def suite_for(
    data: Dataset, num_samples: int, seed: int, device: torch.device, fid: bool = False, **image
) -> Suite:
    """The one place that picks a data kind's metrics. ``image``: ``ImageSuite``'s options
    (``features``, ``inception_dir``, ``cache_dir``, ``fid_extractor``, ``decoder``,
    ``resamples``); points take none of them."""
    if data.kind == "points":
        if fid:
            raise UserError(f"eval.fid=true needs images, but {data.name} holds 2-D points")
        return PointSuite(data, num_samples, seed)
    return ImageSuite(data, num_samples, device, fid=fid, **image)
