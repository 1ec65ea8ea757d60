"""Memory-mapped stores: datasets that stay on disk and are read one batch of rows at a time.

A store is a folder of ``.npy`` arrays (one per field, rows first) and a JSON metadata file.
Training opens every field with ``np.load(mmap_mode="r")`` and gathers only the rows of a batch,
so a process's memory does not grow with the number of rows (the page cache aside, which the
processes of one node share), and opening a store of 1.28M rows costs what opening one of 13,000
does. Stores are written once, in chunks of rows: the metadata's ``rows_done`` says how far
writing got, so an interrupted writer resumes at the first unwritten row.

Two kinds:

* **latent** stores (written by ``python -m bench.encode``, ``latents.json``): the VAE posterior
  moments of every image and of its horizontal mirror, ``mean``, ``logvar``, ``mean_flip``,
  ``logvar_flip`` (float16, already in the scaled latent space: ``mean = s * mu``,
  ``logvar = log(s^2 sigma^2)``, ``s`` the VAE's scaling factor), and ``labels`` (int64). A batch
  draws ``z = mean + exp(logvar / 2) * eps`` and a random mirror per row (``data.posterior``,
  ``data.flip``): the distribution of encoding a randomly flipped image at every step, as the
  official shortcut-models training does, without running the encoder. The encoder is a
  deterministic function of the image, so the mirror's moments are those of the flipped image.
* **pixel** stores (``data=image_folder`` packs a folder once, ``store.json``): ``pixels``
  (uint8, ``(N, C, H, W)``) and ``labels``; a batch is mapped to [-1, 1] and mirrored per row
  when ``data.flip``.

Every random choice of a batch (rows, mirrors, posterior noise) comes from the generator of the
batch's key ``(seed, micro-batch)`` (``bench.rng``), in that order: the row draw is the one
in-memory datasets make, and sample ``i`` of a micro-batch always gets the ``i``-th draw of each
kind, so resume, ``grad_accum`` and DDP see exactly the same data.

A store remembers its source: ``source_listing`` hashes the sorted relative paths and byte sizes
of the images (not their contents, which would read ImageNet twice; not mtimes, so a copied
dataset keeps its hash). Writing into a folder that holds another source, or the same source at
another setting, is refused in one sentence.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bench.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
PIXEL_FORMAT = "fewstep-bench pixel store v1"
PIXEL_META = "store.json"
#: The four moment fields of a latent store, in the order bench.encode writes them.
MOMENTS = ("mean", "logvar", "mean_flip", "logvar_flip")
POSTERIORS = ("sample", "mean")


# -- the source of a store -------------------------------------------------------------------------
def images_in(folder: Path) -> list[Path]:
    """The image files under ``folder``, sorted."""
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )


def source_listing(folder: Path) -> tuple[list[Path], str]:
    """The images under ``folder`` (sorted) and the sha256 of their relative paths and sizes."""
    files = images_in(folder)
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(folder).as_posix()}\t{f.stat().st_size}\n".encode())
    return files, h.hexdigest()


HASH_OF = "sha256 of the sorted relative paths and byte sizes"


# -- metadata --------------------------------------------------------------------------------------
def read_meta(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}); delete the folder and write it again") from e


def write_meta(path: Path, meta: dict, first: tuple[str, ...] = ()) -> None:
    """Atomically (a ``.part`` file renamed); ``first`` keys lead, for people reading it."""
    rank = {k: i for i, k in enumerate(first)}
    ordered = dict(sorted(meta.items(), key=lambda kv: rank.get(kv[0], len(first))))
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(ordered, indent=1) + "\n")
    tmp.replace(path)


def allocate(folder: Path, fields: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, np.memmap]:
    """Writable memory maps of every field, created (zeros, sparse on most file systems) when
    missing and reopened when present: a resumed writer keeps the rows already written."""
    out = {}
    for name, (shape, dtype) in fields.items():
        path = folder / f"{name}.npy"
        if path.is_file():
            arr = np.load(path, mmap_mode="r+")
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise UserError(
                    f"{path} holds {arr.dtype} {arr.shape}, expected {np.dtype(dtype)} "
                    f"{tuple(shape)}; delete the folder and write it again"
                )
        else:
            arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))
        out[name] = arr
    return out


def open_fields(folder: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Read-only memory maps of ``names`` (nothing is read until rows are indexed)."""
    out = {}
    for name in names:
        path = folder / f"{name}.npy"
        if not path.is_file():
            raise UserError(f"store field {path} is missing; write the store again")
        try:
            out[name] = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read store field {path} ({e}); write the store again") from e
    return out


# -- rows of a memory map, read on indexing ---------------------------------------------------------
# Each conversion copies: a tensor never points into a read-only map.
def as_float(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32))


def as_long(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.array(a, dtype=np.int64))


def from_uint8(a: np.ndarray) -> Tensor:
    """uint8 pixels -> [-1, 1] (as ``load_image`` maps them)."""
    return torch.from_numpy(np.array(a, dtype=np.float32)) / 127.5 - 1.0


class Rows:
    """Rows of a memory-mapped array, read only when indexed and returned as tensors by
    ``convert``. Position ``p`` of the view is row ``locate(p)`` of the file (a split: a range,
    or every k-th row). Indexing takes what tensors take in this code base: an int, a slice, index
    tensors or arrays, boolean masks. ``numpy()`` / ``flatten`` / ``float`` read every row (the
    metric suites' reference features do that once)."""

    def __init__(
        self,
        array: np.ndarray,
        n: int,
        convert: Callable[[np.ndarray], Tensor],
        locate: Callable[[np.ndarray], np.ndarray] | None = None,
        start: int = 0,
    ):
        self.array, self.n, self.convert, self.locate = array, int(n), convert, locate
        self.start = int(start)  # with locate None: position p is row start + p

    @classmethod
    def range(cls, array, start: int, stop: int, convert) -> Rows:
        return cls(array, stop - start, convert, start=start)

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.n, *self.array.shape[1:]))

    def rows_of(self, positions: np.ndarray) -> np.ndarray:
        return self.start + positions if self.locate is None else self.locate(positions)

    def __getitem__(self, key) -> Tensor:
        if isinstance(key, int | np.integer):
            if not -self.n <= key < self.n:
                raise IndexError(f"row {key} of {self.n}")
            return self[np.array([key % self.n])][0]
        if isinstance(key, slice):
            a, b, step = key.indices(self.n)
            if self.locate is None:  # one contiguous read
                return self.convert(self.array[self.start + a : self.start + b : step])
            key = np.arange(a, b, step)
        idx = key.numpy() if isinstance(key, Tensor) else np.asarray(key)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        rows = self.rows_of(idx.astype(np.int64) % max(self.n, 1))
        # A gather reads the pages of the rows asked for, nothing else; sorted, it reads them
        # in file order (one pass over the disk for a batch).
        order = np.argsort(rows, kind="stable")
        got = self.array[rows[order]]
        out = np.empty_like(got)
        out[order] = got
        return self.convert(out)

    def numpy(self) -> np.ndarray:
        return self[:].numpy()

    def flatten(self, *dims) -> Tensor:
        return self[:].flatten(*dims)

    def float(self) -> Tensor:
        return self[:].float()


def every_kth(k: int, held_out: bool) -> Callable[[np.ndarray], np.ndarray]:
    """Row numbers of a split that holds out every ``k``-th row (rows ``k-1, 2k-1, ...``):
    the held-out split's position ``p`` is row ``p*k + k-1``, the rest's is ``p + p // (k-1)``."""
    if held_out:
        return lambda p: p * k + (k - 1)
    return lambda p: p + p // (k - 1)


# -- the batches of a store ------------------------------------------------------------------------
def mirror(x: Tensor, flip: Tensor | None) -> Tensor:
    """Rows of ``x`` where ``flip`` is true mirrored left-right (in place; returns ``x``)."""
    if flip is not None and flip.any():
        x[flip] = x[flip].flip(-1)
    return x


@dataclass
class LatentMoments:
    """The moment fields of a latent store's training rows; ``rows`` draws a batch from them."""

    mean: Rows
    logvar: Rows
    mean_flip: Rows
    logvar_flip: Rows
    posterior: str = "sample"

    def rows(self, idx: Tensor, flip: Tensor | None, g: torch.Generator) -> Tensor:
        """``mean + exp(logvar / 2) * eps`` of rows ``idx`` (the mirror's moments where ``flip``);
        ``eps`` drawn from ``g`` after the flips, one standard normal per element."""
        use = flip if flip is not None else torch.zeros(len(idx), dtype=torch.bool)
        mean = torch.empty((len(idx), *self.mean.shape[1:]))
        plain, mirrored = (~use).nonzero().flatten(), use.nonzero().flatten()
        for part, m in ((plain, self.mean), (mirrored, self.mean_flip)):
            if len(part):
                mean[part] = m[idx[part]]
        if self.posterior == "mean":
            return mean
        logvar = torch.empty_like(mean)
        for part, lv in ((plain, self.logvar), (mirrored, self.logvar_flip)):
            if len(part):
                logvar[part] = lv[idx[part]]
        eps = torch.randn(mean.shape, generator=g)
        return mean + torch.exp(0.5 * logvar) * eps


def check_posterior(posterior: str) -> None:
    if posterior not in POSTERIORS:
        raise UserError(
            f"data.posterior={posterior!r} is not allowed; choose one of {', '.join(POSTERIORS)}"
        )


# -- packing an image folder into a pixel store ----------------------------------------------------
def default_store_dir(folder: Path, resolution: int, channels: int, digest: str) -> Path:
    """Where a folder's pixel store goes when ``data.store`` is not given: under
    ``$FEWSTEP_STORE_DIR`` (default ``~/.cache/fewstep-bench/stores``), named by the folder, the
    resolution and a hash of the folder's absolute path and listing (a changed folder packs anew)."""
    root = Path(os.environ.get("FEWSTEP_STORE_DIR", "~/.cache/fewstep-bench/stores")).expanduser()
    key = hashlib.sha256(f"{folder.resolve()}\n{digest}".encode()).hexdigest()[:12]
    return root / f"{folder.name}-{resolution}px-{channels}ch-{key}"


def pack_images(
    folder: Path,
    files: list[Path],
    digest: str,
    labels: np.ndarray | None,
    classes: list[str],
    out: Path,
    resolution: int,
    channels: int,
    workers: int | None = None,
    chunk: int = 1024,
    progress: bool = True,
) -> dict:
    """Decode ``files`` once into ``out`` (``pixels.npy`` uint8, ``labels.npy``, ``store.json``):
    parallel decoding, a progress bar, chunks of rows written in order so a rerun resumes at
    ``rows_done``. A store of another source or setting in ``out`` is refused. Returns the meta."""
    from tqdm import tqdm

    from bench.data import load_image

    wanted = {
        "format": PIXEL_FORMAT,
        "resolution": int(resolution),
        "channels": int(channels),
        "count": len(files),
        "classes": classes,
        "source": {"folder": str(folder), "files": len(files), "hash": digest, "hash_of": HASH_OF},
    }
    meta = read_meta(out / PIXEL_META)
    if meta is not None:
        had = meta.get("source", {})
        if had.get("hash") != digest:
            raise UserError(
                f"store {out} holds another source ({had.get('files')} images in "
                f"{had.get('folder')}, hash {str(had.get('hash'))[:12]}; now {len(files)} images "
                f"in {folder}, hash {digest[:12]}): the folder changed; delete the store or give "
                "another data.store"
            )
        for key in ("resolution", "channels"):
            if meta.get(key) != wanted[key]:
                raise UserError(
                    f"store {out} was packed at {key}={meta.get(key)}, this run asks for "
                    f"{key}={wanted[key]}; use the same setting or another data.store"
                )
        if meta.get("complete"):
            return meta
    elif out.is_dir() and any(out.iterdir()):
        raise UserError(f"data.store {out} is a non-empty folder without {PIXEL_META}")
    meta = {**wanted, "complete": False, "rows_done": int((meta or {}).get("rows_done", 0))}
    out.mkdir(parents=True, exist_ok=True)
    fields = {"pixels": ((len(files), channels, resolution, resolution), "uint8")}
    if labels is not None:
        fields["labels"] = ((len(files),), "int64")
    arrays = allocate(out, fields)
    if labels is not None:
        arrays["labels"][:] = labels
    write_meta(out / PIXEL_META, meta, ("format", "complete", "rows_done"))
    done = meta["rows_done"]
    bar = tqdm(
        total=len(files),
        initial=done,
        unit="img",
        desc=f"packing {folder.name}",
        disable=not progress,
        file=sys.stderr,
    )

    def decode(path: Path) -> np.ndarray:
        x = load_image(path, resolution, channels)  # [-1, 1], exact multiples of 1/127.5
        return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()

    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        for start in range(done, len(files), chunk):
            stop = min(start + chunk, len(files))
            arrays["pixels"][start:stop] = np.stack(list(pool.map(decode, files[start:stop])))
            arrays["pixels"].flush()  # on disk before the metadata says so
            meta["rows_done"] = stop
            write_meta(out / PIXEL_META, meta, ("format", "complete", "rows_done"))
            bar.update(stop - start)
    bar.close()
    for a in arrays.values():
        a.flush()
    meta["complete"] = True
    write_meta(out / PIXEL_META, meta, ("format", "complete", "rows_done"))
    return meta


# -- synthetic stores (tests, benchmarks/) ---------------------------------------------------------
def synthetic_latents(
    out: Path,
    count: int,
    shape: tuple[int, ...] = (4, 32, 32),
    classes: int = 0,
    seed: int = 0,
    chunk: int = 65_536,
) -> dict:
    """A latent store of ``count`` random rows in bench.encode's format (no VAE behind it:
    ``vae`` is ``none``): means ~ N(0, 1), log-variances ~ U(-6, -2), the mirrors the flipped
    means. Written a chunk at a time, so writing 1.28M rows needs no more memory than 65k."""
    from bench.data import LATENT_STORE_FORMAT, LATENTS_META

    out.mkdir(parents=True, exist_ok=True)
    fields = {name: ((count, *shape), "float16") for name in MOMENTS}
    if classes:
        fields["labels"] = ((count,), "int64")
    arrays = allocate(out, fields)
    g = np.random.default_rng(seed)
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        mean = g.standard_normal((n, *shape), dtype=np.float32)
        logvar = g.uniform(-6, -2, (n, *shape)).astype(np.float32)
        arrays["mean"][start : start + n] = mean
        arrays["logvar"][start : start + n] = logvar
        arrays["mean_flip"][start : start + n] = mean[..., ::-1]
        arrays["logvar_flip"][start : start + n] = logvar[..., ::-1]
        if classes:
            arrays["labels"][start : start + n] = g.integers(0, classes, n)
    for a in arrays.values():
        a.flush()
    meta = {
        "format": LATENT_STORE_FORMAT,
        "complete": True,
        "rows_done": count,
        "vae": "none",
        "scaling_factor": 1.0,
        "resolution": 8 * shape[-1],
        "latent_shape": list(shape),
        "count": count,
        "classes": [str(c) for c in range(classes)],
        "source": {"folder": "synthetic", "files": count, "hash": f"synthetic-{seed}"},
    }
    write_meta(out / LATENTS_META, meta, ("format", "complete", "rows_done"))
    return meta
