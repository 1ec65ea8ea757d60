"""The one data layer: every dataset yields the same ``Batch``.

Images live in [-1, 1] as ``(C, H, W)``; low-dimensional data as ``(D,)``. Batches are drawn
i.i.d. with a generator seeded by ``(seed, step)``, so a resumed run sees exactly the batches an
uninterrupted run would, with no data-loader state to checkpoint.

Datasets (docs/evaluation.md has the measured facts):
* ``digits16``  sklearn's 8x8 digits, /16, bilinear to 16x16, stratified 1347/450 split, 10 labels.
* ``shapes16``  procedural anti-aliased disks, squares and triangles in colour on black, 3 labels.
* ``toy2d``     8gaussians, moons, checkerboard (2-D points).
* ``image_folder``  a user's folder of images; class sub-folders become labels. Packed once into
  a uint8 memory-mapped store (``bench.store``), read a batch at a time.
* ``latents``   VAE latents: a memory-mapped store of posterior moments and their mirrors written
  by ``python -m bench.encode`` (``latents.json`` names the VAE that decodes them), or older
  ``.npy`` / ``.npz`` shards, read whole into memory.

``data.flip`` mirrors each training row left-right with probability 1/2 (pixels; a latent store
takes the moments of the mirrored image). Augmentation draws come after the rows' draw from the
same generator, so without them a batch is exactly the batch of earlier versions.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bench import rng
from bench.errors import UserError
from bench.store import (
    IMAGE_SUFFIXES,
    MOMENTS,
    LatentMoments,
    Rows,
    as_float,
    as_long,
    check_posterior,
    default_store_dir,
    every_kth,
    from_uint8,
    images_in,
    mirror,
    open_fields,
    pack_images,
    source_listing,
)


@dataclass
class Batch:
    """``x1`` data, ``y`` labels (None when unconditional), ``x0`` paired noise (reflow) or None."""

    x1: Tensor
    y: Tensor | None = None
    x0: Tensor | None = None

    def to(self, device) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.x1), move(self.y), move(self.x0))

    def __len__(self) -> int:
        return self.x1.shape[0]


@dataclass(frozen=True)
class LatentInfo:
    """Where VAE latents came from (``latents.json``, written by ``python -m bench.encode``):
    the latents are ``scaling_factor * E(x)`` of ``resolution``-px images, decoded by ``vae``."""

    vae: str  # a local folder (absolute) or a hub name, for AutoencoderKL.from_pretrained
    scaling_factor: float
    resolution: int
    vae_sha256: str = ""
    classes: tuple[str, ...] = ()


@dataclass
class Dataset:
    """An in-memory (or memory-mapped) split pair. ``labels`` are None for unlabeled data;
    ``latent`` says how to decode VAE latents (None for pixels and for latents without metadata)."""

    name: str
    train_x: Tensor
    train_y: Tensor | None
    test_x: Tensor
    test_y: Tensor | None
    num_classes: int = 0
    kind: str = "image"  # "image" | "latent" | "points"
    latent: LatentInfo | None = None
    fingerprint: str = ""  # of the files it was read from (bench.identity.pin_data); "" if none
    flip: bool = False  # mirror each training row left-right with probability 1/2
    moments: LatentMoments | None = None  # a latent store: rows are drawn from these

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def batch(self, batch_size: int, seed: int, step: int, conditional: bool = True) -> Batch:
        """The batch of micro-batch ``step``: i.i.d. indices from a (seed, step) generator, then
        (``flip``) one mirror coin per row, then (a latent store sampling its posterior) one
        standard normal per element, all from that generator: row ``i`` of the batch always gets
        the ``i``-th draw of each, whoever computes the batch."""
        g = rng.generator(rng.stream_key(seed, step))
        idx = torch.randint(len(self.train_x), (batch_size,), generator=g)
        y = self.train_y[idx] if conditional and self.train_y is not None else None
        flip = torch.rand(batch_size, generator=g) < 0.5 if self.flip else None
        if self.moments is not None:
            return Batch(self.moments.rows(idx, flip, g), y)
        return Batch(mirror(torch.as_tensor(self.train_x[idx]).float(), flip), y)


def _split(x: Tensor, y: Tensor, n_test: int, seed: int):
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(x))
    tr, te = train_test_split(idx, test_size=n_test, stratify=y.numpy(), random_state=seed)
    tr, te = torch.as_tensor(np.sort(tr)), torch.as_tensor(np.sort(te))
    return x[tr], y[tr], x[te], y[te]


def digits16(conditional: bool = False, **_) -> Dataset:
    """sklearn digits (1797 images, values 0..16) at 16x16 in [-1, 1]; 1347 train / 450 test."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = torch.tensor(raw.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1) * 2 - 1
    y = torch.tensor(raw.target, dtype=torch.long)
    return Dataset("digits16", *_split(x, y, n_test=450, seed=0), num_classes=10)


def render_shapes(n: int, seed: int, size: int = 16, supersample: int = 4) -> tuple[Tensor, Tensor]:
    """``n`` RGB images of one disk (0), square (1) or triangle (2) each, anti-aliased by
    rendering at ``supersample`` times the resolution and average-pooling."""
    g = torch.Generator().manual_seed(seed)
    s = size * supersample
    label = torch.randint(3, (n,), generator=g)
    radius = (0.18 + 0.17 * torch.rand(n, generator=g)) * s  # half-extent in fine pixels
    centre = radius[:, None] + torch.rand(n, 2, generator=g) * (s - 2 * radius[:, None])
    colour = 0.25 + 0.75 * torch.rand(n, 3, generator=g)
    coords = torch.arange(s, dtype=torch.float32) + 0.5
    py, px = coords[None, :, None], coords[None, None, :]
    dy, dx = py - centre[:, 0, None, None], px - centre[:, 1, None, None]
    r = radius[:, None, None]
    disk = dx**2 + dy**2 <= r**2
    square = (dx.abs() <= r * 0.85) & (dy.abs() <= r * 0.85)
    # Upward triangle: below the apex, above the base, inside two slanted edges.
    triangle = (dy <= r * 0.8) & (dy >= -r) & (dx.abs() <= (dy + r) / 1.8 * 1.0)
    mask = torch.where(
        label[:, None, None] == 0, disk, torch.where(label[:, None, None] == 1, square, triangle)
    )
    img = mask[:, None].float() * colour[:, :, None, None]  # (n, 3, s, s)
    img = F.avg_pool2d(img, supersample)
    return img * 2 - 1, label


def shapes16(n_train: int = 20_000, n_test: int = 2_000, conditional: bool = False, **_) -> Dataset:
    tx, ty = render_shapes(n_train, seed=0)
    vx, vy = render_shapes(n_test, seed=1)
    return Dataset("shapes16", tx, ty, vx, vy, num_classes=3)


def toy_points(name: str, n: int, seed: int) -> Tensor:
    """2-D toy distributions, scaled to roughly unit variance."""
    g = torch.Generator().manual_seed(seed)
    if name == "8gaussians":
        angles = torch.randint(8, (n,), generator=g) * (2 * math.pi / 8)
        centres = torch.stack([torch.cos(angles), torch.sin(angles)], 1) * 2.0
        return (centres + 0.15 * torch.randn(n, 2, generator=g)) / 1.5
    if name == "moons":
        from sklearn.datasets import make_moons

        x, _ = make_moons(n, noise=0.05, random_state=seed)
        return (torch.tensor(x, dtype=torch.float32) - torch.tensor([0.5, 0.25])) / 0.7
    if name == "checkerboard":
        x1 = torch.rand(n, generator=g) * 4 - 2
        x2 = torch.rand(n, generator=g) - torch.randint(2, (n,), generator=g) * 2.0
        x2 = x2 + (torch.floor(x1) % 2)
        return torch.stack([x1, x2], 1) / 1.15
    raise UserError(
        f"unknown toy2d distribution {name!r}; choose one of 8gaussians, moons, checkerboard"
    )


def toy2d(name: str = "8gaussians", n_train: int = 20_000, n_test: int = 5_000, **_) -> Dataset:
    return Dataset(
        f"toy2d-{name}",
        toy_points(name, n_train, 0),
        None,
        toy_points(name, n_test, 1),
        None,
        kind="points",
    )


_images_in = images_in  # older name, kept for callers


def load_image(path: Path, resolution: int, channels: int) -> Tensor:
    """Resize the shorter side to ``resolution`` and centre-crop; returns (C, H, W) in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            scale = resolution / min(im.size)
            w, h = (
                max(resolution, round(im.width * scale)),
                max(resolution, round(im.height * scale)),
            )
            im = im.resize((w, h), Image.BICUBIC)
            left, top = (w - resolution) // 2, (h - resolution) // 2
            im = im.crop((left, top, left + resolution, top + resolution))
            arr = np.asarray(im, dtype=np.float32)
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(
            f"cannot read image {path} ({e.__class__.__name__}); remove or replace it"
        ) from e
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr / 127.5 - 1.0)


def _existing_dir(path: str | None, what: str) -> Path:
    if not path:
        raise UserError(
            f"data.path is not set; give the {what} folder, e.g. data.path=/data/{what}"
        )
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"dataset path {str(folder)!r} does not exist or is not a folder")
    return folder


def image_folder(
    path: str | None = None,
    resolution: int = 32,
    channels: int = 3,
    test_fraction: float = 0.1,
    conditional: bool = False,
    fingerprint: str = "",
    flip: bool = False,
    store: str | None = None,
    progress: bool = True,
    **_,
) -> Dataset:
    """A user's folder of images. Sub-folders are classes (sorted names -> 0, 1, ...); images
    directly in the folder make an unlabeled dataset. Held-out split: every 1/test_fraction-th
    image, deterministic. The images are decoded once into a uint8 store (``store``, default
    ``~/.cache/fewstep-bench/stores/<folder>-<res>px-<ch>ch-<source hash>``; bench.store) that
    every later run, and every process of one, memory-maps."""
    folder = _existing_dir(path, "images")
    files, digest = source_listing(folder)
    if not files:
        raise UserError(
            f"dataset path {str(folder)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    classes = sorted({f.parent.relative_to(folder).parts[0] for f in files if f.parent != folder})
    labelled = bool(classes) and all(f.parent != folder for f in files)
    labels = (
        np.array([classes.index(f.relative_to(folder).parts[0]) for f in files], dtype=np.int64)
        if labelled
        else None
    )
    out = (
        Path(store).expanduser()
        if store
        else default_store_dir(folder.resolve(), int(resolution), int(channels), digest)
    )
    pack_images(
        folder.resolve(),
        files,
        digest,
        labels,
        classes if labelled else [],
        out,
        int(resolution),
        int(channels),
        progress=progress,
    )
    fields = open_fields(out, ("pixels", "labels") if labelled else ("pixels",))
    n = len(files)
    every = max(2, round(1 / test_fraction)) if test_fraction > 0 else n + 1
    n_test = n // every
    if (
        n_test == 0 or n_test == n
    ):  # tiny folders: keep one held-out image so test metrics stay defined
        split = {False: dict(start=0, n=n - 1), True: dict(start=n - 1, n=1)}
    else:
        split = {
            False: dict(n=n - n_test, locate=every_kth(every, False)),
            True: dict(n=n_test, locate=every_kth(every, True)),
        }

    def rows(field: str, held_out: bool, convert) -> Rows | None:
        return Rows(fields[field], convert=convert, **split[held_out]) if field in fields else None

    # Labels (8 bytes a row: 10 MB for ImageNet) are read into memory, pixels stay mapped.
    labels_of = lambda held_out: rows("labels", held_out, as_long)  # noqa: E731
    return Dataset(
        folder.name,
        rows("pixels", False, from_uint8),
        labels_of(False)[:] if labelled else None,
        rows("pixels", True, from_uint8),
        labels_of(True)[:] if labelled else None,
        num_classes=len(classes) if labelled else 0,
        flip=bool(flip),
        fingerprint=fingerprint,
    )


def source_files(node) -> tuple[Path, list[Path]] | None:
    """The folder and the files a data config's loader reads (``image_folder``: its images;
    ``latents``: its shards and ``latents.json``), for ``bench.identity.pin_data``; None for data
    made in code or a folder that does not exist (the loader refuses that in one sentence)."""
    target, path = str(node.get("_target_", "")), node.get("path")
    if not path or target not in ("bench.data.image_folder", "bench.data.latents"):
        return None
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return None
    if target.endswith("image_folder"):
        return folder, _images_in(folder)
    meta = folder / LATENTS_META
    shards = sorted(p for p in folder.iterdir() if p.suffix in (".npy", ".npz") and p.is_file())
    return folder, [*shards, *([meta] if meta.is_file() else [])]


#: bench.encode's metadata file beside the latent shards.
LATENTS_META = "latents.json"


def latents_meta(folder: Path) -> dict | None:
    """The ``latents.json`` in ``folder`` (None for shards written without one)."""
    path = folder / LATENTS_META
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}); re-run python -m bench.encode") from e


#: The format bench.encode writes: a memory-mapped store of posterior moments (bench.store).
LATENT_STORE_FORMAT = "fewstep-bench latents v2"


def latents(
    path: str | None = None,
    test_fraction: float = 0.02,
    conditional: bool = False,
    fingerprint: str = "",
    flip: bool = False,
    posterior: str = "mean",
    **_,
) -> Dataset:
    """VAE latents. A store written by ``python -m bench.encode`` (``latents.json`` format v2) is
    memory-mapped: training rows draw ``mean + std * eps`` (``posterior=sample``) or take the mean
    (``posterior=mean``), of the mirrored image with probability 1/2 when ``flip``; the held-out
    rows and the reference features use the unflipped means. The last ``test_fraction`` of the
    rows is held out (bench.encode stores the images in a seeded random order, so that is a
    random split). Older folders -- ``*.npz`` shards with ``latents`` (N, C, H, W) and optional
    ``labels``, or ``*.npy`` latents only, with or without bench.encode's v1 ``latents.json`` --
    are read whole into memory and used as stored (``posterior=mean``, no ``flip``)."""
    check_posterior(posterior)
    folder = _existing_dir(path, "latents")
    meta = latents_meta(folder)
    if meta is not None and meta.get("format") == LATENT_STORE_FORMAT:
        data = latent_store(folder, meta, test_fraction, flip, posterior)
        data.fingerprint = fingerprint
        return data
    if flip or posterior != "mean":
        raise UserError(
            f"the latents in {folder} are older shards (one fixed latent per image, no mirrors), "
            f"so data.flip={flip} / data.posterior={posterior} cannot apply; re-encode them with "
            "python -m bench.encode, or set data.flip=false data.posterior=mean to use them as stored"
        )
    return latent_shards(folder, meta, test_fraction, fingerprint)


def latent_info(meta: dict) -> LatentInfo:
    return LatentInfo(
        vae=meta["vae"],
        scaling_factor=float(meta["scaling_factor"]),
        resolution=int(meta["resolution"]),
        vae_sha256=meta.get("vae_sha256", ""),
        classes=tuple(meta.get("classes", [])),
    )


def latent_store(
    folder: Path, meta: dict, test_fraction: float, flip: bool, posterior: str
) -> Dataset:
    """A bench.encode store, memory-mapped (bench.store): nothing is read before a batch."""
    if not meta.get("complete"):
        raise UserError(
            f"the latents in {folder} are unfinished ({meta.get('rows_done', 0)} of "
            f"{meta.get('count')} images so far); re-run the same python -m bench.encode "
            "command to finish them"
        )
    labelled = bool(meta.get("classes"))
    fields = open_fields(folder, MOMENTS + (("labels",) if labelled else ()))
    n = int(meta["count"])
    n_test = max(1, int(n * test_fraction))
    train = lambda name, convert: Rows.range(fields[name], 0, n - n_test, convert)  # noqa: E731
    test = lambda name, convert: Rows.range(fields[name], n - n_test, n, convert)  # noqa: E731
    moments = LatentMoments(*(train(name, as_float) for name in MOMENTS), posterior=posterior)
    info = latent_info(meta)
    return Dataset(
        folder.name,
        train("mean", as_float),
        train("labels", as_long)[:] if labelled else None,  # 8 bytes a row, in memory
        test("mean", as_float),
        test("labels", as_long)[:] if labelled else None,
        num_classes=len(info.classes) if labelled else 0,
        kind="latent",
        latent=info,
        flip=bool(flip),
        moments=moments,
    )


def latent_shards(
    folder: Path, meta: dict | None, test_fraction: float, fingerprint: str = ""
) -> Dataset:
    """Older latent folders: shards read whole into memory (see ``latents``)."""
    if meta is not None and not meta.get("complete"):
        raise UserError(
            f"the latents in {folder} are unfinished ({len(meta.get('shards', []))} shards so far); "
            "re-run the same python -m bench.encode command to finish them"
        )
    if meta is not None:
        shards = [folder / name for name in meta["shards"]]
        if missing := [p.name for p in shards if not p.is_file()]:
            raise UserError(
                f"latent shard {folder / missing[0]} listed in {LATENTS_META} is missing"
            )
    else:
        shards = sorted(p for p in folder.iterdir() if p.suffix in (".npy", ".npz"))
    if not shards:
        raise UserError(f"dataset path {str(folder)!r} holds no .npy or .npz latent shards")
    xs, ys = [], []
    for shard in shards:
        try:
            if shard.suffix == ".npy":
                xs.append(np.load(shard))
                ys.append(None)
            else:
                with np.load(shard) as z:
                    xs.append(z["latents"])
                    ys.append(z["labels"] if "labels" in z else None)
        except (ValueError, OSError, KeyError) as e:
            raise UserError(
                f"cannot read latent shard {shard} ({e}); expected an array 'latents'"
            ) from e
    if len({a.shape[1:] for a in xs}) != 1 or xs[0].ndim != 4:
        raise UserError(f"latent shards in {folder} must all be (N, C, H, W) of one shape")
    x = torch.from_numpy(np.concatenate(xs)).float()
    y = None if any(a is None for a in ys) else torch.from_numpy(np.concatenate(ys)).long()
    n_test = max(1, int(len(x) * test_fraction))
    num_classes = int(y.max()) + 1 if y is not None else 0
    info = None
    if meta is not None:
        info = latent_info(meta)
        num_classes = max(num_classes, len(info.classes)) if y is not None else 0
    return Dataset(
        folder.name,
        x[:-n_test],
        None if y is None else y[:-n_test],
        x[-n_test:],
        None if y is None else y[-n_test:],
        num_classes=num_classes,
        kind="latent",
        latent=info,
        fingerprint=fingerprint,
    )
