"""FID through clean-fid (Parmar, Zhang, Zhu; "On Aliased Resizing and Surprising Subtleties in GAN
Evaluation", CVPR 2022): Inception-v3 pool features after clean (PIL bicubic) resizing to 299.

The papers' protocol for real datasets: FID of ``N`` generated samples (50k for image datasets at
32 px and up) against statistics of the training set. Here

* clean-fid is imported lazily (it imports torchvision at import time);
* the Inception TorchScript file ``inception-2015-12-05.pt`` is looked up in a configurable folder
  (``eval.inception_dir``); clean-fid would download it into /tmp, which fails offline, so a
  missing file is a ``UserError`` naming the file, the folder, its sha256 and its URL;
* samples reach clean-fid as a generator (``cleanfid.fid.get_model_features``: the same resize and
  feature code the library's own ``compute_fid(gen=...)`` runs), never as 50k PNG files; the
  reference statistics go through the very same path, so both sides are resized alike;
* reference statistics are cached as ``.npz`` in ``cache_dir`` (next to the data for a user's
  folder, a user cache for built-in data; never site-packages), keyed by dataset, split,
  resolution and extractor;
* any feature network can stand in for Inception (``extractor=``): the tests use a tiny one
  through exactly this code path;
* latents are decoded to images batch by batch (``transform=``, the run's ``eval.decoder``) on
  both sides, so the reference statistics are those of the decoded training latents.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bench.errors import UserError
from bench.metrics.frechet import Stats, frechet_distance

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"


def inception(inception_dir: str | Path, device: torch.device) -> Callable[[Tensor], Tensor]:
    """clean-fid's TorchScript Inception from ``inception_dir``; maps [0, 255] NCHW -> (N, 2048)."""
    folder = Path(inception_dir).expanduser()
    if not (folder / INCEPTION_FILE).is_file():
        from cleanfid.downloads_helper import inception_url

        raise UserError(
            f"Inception weights not found: place {INCEPTION_FILE} (sha256 {INCEPTION_SHA256[:16]}..., "
            f"from {inception_url}) in {folder}, or set eval.inception_dir to the folder that holds it"
        )
    from cleanfid.inception_torchscript import InceptionV3W

    net = InceptionV3W(str(folder), download=False, resize_inside=False).to(device).eval()
    return lambda x: net(x)


def to_uint8_range(x: Tensor) -> Tensor:
    """[-1, 1] images -> [0, 255] floats, 3 channels (grey is repeated, as clean-fid expects RGB)."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round()
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def features(images: Iterator[Tensor], n: int, batch_size: int, extractor, device) -> np.ndarray:
    """Features of ``n`` images from an iterator of [-1, 1] batches, via clean-fid's generator path.

    ``get_model_features`` calls ``G(z)`` for ``ceil(n / batch_size)`` batches of exactly
    ``batch_size``; our G ignores its (unseeded) ``z`` and returns the next stored batch.
    """
    from cleanfid.fid import get_model_features

    # No batch larger than the images: clean-fid pads every batch to batch_size, and a process's
    # share of a sharded evaluation is one sampling batch at a time (bench.evaluate).
    batch_size = max(1, min(batch_size, n))

    def G(z: Tensor) -> Tensor:  # noqa: N802 -- clean-fid's name for the generator
        batch = next(images)
        if len(batch) < len(z):  # pad the last batch; the extra rows are cut off below
            batch = torch.cat([batch, batch[-1:].expand(len(z) - len(batch), *batch.shape[1:])])
        return to_uint8_range(batch)

    return get_model_features(
        G,
        extractor,
        mode="clean",
        z_dim=1,
        num_gen=n,
        batch_size=batch_size,
        device=device,
        verbose=False,
    )


def batches(x: Tensor, batch_size: int, transform=None) -> Iterator[Tensor]:
    """Batches of ``x``, each passed through ``transform`` (a latent decoder) when given."""
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size] if transform is None else transform(x[i : i + batch_size])


def reference_stats(
    train_x: Tensor,
    key: dict[str, str],
    cache_dir: Path,
    extractor,
    device,
    batch_size: int = 200,
    transform=None,
) -> tuple[Stats, Path]:
    """Training-set statistics, computed once and cached as ``.npz`` under ``cache_dir``."""
    name = "-".join(f"{k}={v}" for k, v in sorted(key.items()))
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    path = Path(cache_dir).expanduser() / f"fid-stats-{key.get('dataset', 'data')}-{digest}.npz"
    if path.exists():
        with np.load(path) as z:
            return Stats(z["mu"], z["sigma"], int(z["n"])), path
    feats = features(
        batches(train_x, batch_size, transform), len(train_x), batch_size, extractor, device
    )
    stats = Stats.of(feats)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, mu=stats.mu, sigma=stats.sigma, n=stats.n, key=name)
    tmp.replace(path)
    return stats, path


def sample_features(
    samples: Tensor, extractor, device, batch_size: int = 200, transform=None
) -> np.ndarray:
    """Inception (or ``extractor``) features of ``samples``, batch by batch."""
    return features(
        batches(samples, batch_size, transform), len(samples), batch_size, extractor, device
    )


def fid(
    samples: Tensor, reference: Stats, extractor, device, batch_size: int = 200, transform=None
) -> float:
    feats = sample_features(samples, extractor, device, batch_size, transform)
    return frechet_distance(Stats.of(feats), reference)
