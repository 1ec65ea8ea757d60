"""``python -m bench.encode``: a folder of images -> a memory-mapped latent store for ``data=latents``.

    python -m bench.encode input=/data/celebahq256 output=/data/celebahq256_latents
    python -m bench.encode input=/data/imagenet/train output=/data/imagenet256_latents

Every image is resized on its short side and centre-cropped to ``resolution`` (``load_image``, as
``data=image_folder`` does), mapped to [-1, 1] and encoded by a diffusers ``AutoencoderKL``
(``vae``: a save_pretrained folder or a hub name), and so is its horizontal mirror. Stored are
the posterior moments of both, in the scaled latent space that training sees (``s`` the VAE's
``config.scaling_factor``, 0.18215 for SD-VAE): ``mean = s * mu`` and ``logvar = log(s^2 sigma^2)``,
float16. Training then draws ``mean + exp(logvar / 2) * eps`` of the image or of its mirror at
every step (``data.posterior``, ``data.flip``): the distribution the official shortcut-models code
gets by encoding a randomly flipped image at every step, at the cost of reading 2 x 2 fp16
arrays. Class sub-folders become labels, sorted names -> 0, 1, ...

The output folder (config: sweeps/encode.yaml; bench.store describes stores):

* ``mean.npy``, ``logvar.npy``, ``mean_flip.npy``, ``logvar_flip.npy``: (N, C, H, W) float16;
  ``labels.npy`` (N,) int64 when labelled; ``files.txt``: the images' paths relative to the input
  folder, one per row;
* ``latents.json``: ``format``, ``complete``, ``rows_done``, ``vae`` (absolute folder or hub
  name), ``vae_sha256`` (its weights), ``scaling_factor``, ``resolution``, ``seed``, ``labels``,
  ``classes``, ``latent_shape``, ``count``, ``chunk_size``, ``moments`` (what is stored),
  ``source`` (``folder``, ``files``, ``hash``, ``hash_of``).

The images are stored in a seeded random order, so ``data=latents``' held-out tail is a random
subset, not the last classes. Rows are written in chunks of ``chunk_size``, each flushed to disk
before ``rows_done`` says so: running the same command again continues at the first unwritten
row, and says so when nothing is missing. The source hash is ``bench.store.source_listing``'s;
another source, or other settings, into an existing output folder is an error. Folders written by
the previous version (``shard-*.npz`` of one posterior draw) still load, as stored. Bad input is
one sentence and exit status 2, as in ``bench.run``.
"""

from __future__ import annotations

import math
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from bench.data import LATENT_STORE_FORMAT, LATENTS_META, latents_meta, load_image
from bench.errors import EXIT_USER_ERROR, UserError
from bench.store import HASH_OF, IMAGE_SUFFIXES, MOMENTS, allocate, source_listing, write_meta

FORMAT = LATENT_STORE_FORMAT
#: Settings that decide every stored number: a rerun into the same folder must match them.
SETTINGS = ("vae", "resolution", "seed", "labels", "chunk_size")


def class_labels(folder: Path, files: list[Path], mode: str) -> tuple[list[str], np.ndarray | None]:
    """Class names and per-image labels from the top-level sub-folders (``mode`` auto | folders |
    none); ``auto`` labels only when every image lies in a sub-folder, as data=image_folder."""
    if mode not in ("auto", "folders", "none"):
        raise UserError(f"labels={mode!r} is not allowed; choose one of auto, folders, none")
    loose = [f for f in files if f.parent == folder]
    if mode == "none" or (mode == "auto" and loose):
        return [], None
    if loose:
        raise UserError(
            f"labels=folders but {len(loose)} images lie directly in {folder} (e.g. {loose[0].name}); "
            "move them into class sub-folders or use labels=none"
        )
    tops = [f.relative_to(folder).parts[0] for f in files]
    classes = sorted(set(tops))
    index = {c: i for i, c in enumerate(classes)}
    return classes, np.array([index[t] for t in tops], dtype=np.int64)


def pick_device(name: str) -> torch.device:
    if name not in ("auto", "cpu", "cuda"):
        raise UserError(f"device={name!r} is not allowed; choose one of auto, cpu, cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda was requested but no CUDA device is visible; use cpu or auto")
    cuda = name == "cuda" or (name == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if cuda else "cpu")


#: The order keys are written in (latents.json is read by people too).
KEYS = (
    "format",
    "complete",
    "rows_done",
    "vae",
    "vae_sha256",
    "scaling_factor",
    "resolution",
    "latent_shape",
)


def write_json(path: Path, meta: dict) -> None:
    write_meta(path, meta, KEYS)


def check_output(out: Path, meta: dict | None, wanted: dict) -> None:
    """An existing output folder must hold latents of this source with these settings."""
    if meta is None:
        if out.is_dir() and any(p.suffix in (".npz", ".npy") for p in out.iterdir()):
            raise UserError(
                f"output folder {out} already holds latent shards without {LATENTS_META}; "
                "choose a new or empty output folder"
            )
        return
    if meta.get("format") != FORMAT:
        raise UserError(
            f"output folder {out} holds latents of an older bench.encode ({meta.get('format')}); "
            "they still load as they are; to encode again use a new output folder"
        )
    src, had = wanted["source"], meta.get("source", {})
    if had.get("hash") != src["hash"]:
        raise UserError(
            f"output folder {out} holds latents of another source ({had.get('files')} images in "
            f"{had.get('folder')}, hash {str(had.get('hash'))[:12]}; this input: {src['files']} "
            f"images in {src['folder']}, hash {src['hash'][:12]}); use a new output folder"
        )
    for key in SETTINGS:
        if meta.get(key) != wanted[key]:
            raise UserError(
                f"output folder {out} was encoded with {key}={meta.get(key)!r}, this run asks for "
                f"{key}={wanted[key]!r}; use the same setting or a new output folder"
            )


def prefetch(pool: ThreadPoolExecutor, files: list[Path], resolution: int, batch: int):
    """Batches of loaded images, the next batch read by ``pool`` while this one is encoded."""
    pending: list[Future] | None = None
    for i in range(0, len(files) + batch, batch):
        nxt = [pool.submit(load_image, f, resolution, 3) for f in files[i : i + batch]]
        if pending:
            yield torch.stack([f.result() for f in pending])
        pending = nxt


@torch.no_grad()
def encode_moments(vae, x: torch.Tensor) -> tuple[np.ndarray, ...]:
    """Scaled posterior moments of a batch of [-1, 1] images and of their mirrors:
    ``(mean, logvar, mean_flip, logvar_flip)``, float16, ``mean = s * mu``,
    ``logvar = log(s^2 sigma^2)`` (``s`` the VAE's scaling factor). The encoder is a
    deterministic function of its input, so the mirror's moments are those of the flipped image."""
    n, s = len(x), float(vae.config.scaling_factor)
    dist = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist
    mean = (dist.mean.float() * s).cpu().numpy().astype(np.float16)
    logvar = (dist.logvar.float() + 2 * math.log(s)).cpu().numpy().astype(np.float16)
    return mean[:n], logvar[:n], mean[n:], logvar[n:]


def encode(
    input: str | None,
    output: str | None,
    vae: str,
    resolution: int = 256,
    seed: int = 0,
    labels: str = "auto",
    batch_size: int = 64,
    chunk_size: int = 10_000,
    workers: int = 8,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Encode ``input`` into ``output`` (see the module docstring); returns ``latents.json``."""
    from tqdm import tqdm

    from bench.vae import load_vae, vae_source, weights_sha256

    if not input:
        raise UserError("input is not set; give the image folder, e.g. input=/data/celebahq256")
    if not output:
        raise UserError("output is not set; give the latent folder, e.g. output=/data/latents")
    for key, value in (("resolution", resolution), ("batch_size", batch_size)):
        if int(value) < 1:
            raise UserError(f"{key}={value} must be a positive integer")
    if int(chunk_size) < 1 or int(workers) < 1:
        raise UserError(f"chunk_size={chunk_size} and workers={workers} must be positive integers")
    folder, out = Path(input).expanduser().resolve(), Path(output).expanduser().resolve()
    if not folder.is_dir():
        raise UserError(f"input folder {str(folder)!r} does not exist or is not a folder")
    files, digest = source_listing(folder)
    if not files:
        raise UserError(
            f"input folder {str(folder)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    classes, y = class_labels(folder, files, labels)
    dev = pick_device(device)
    wanted = {
        "format": FORMAT,
        "complete": False,
        "rows_done": 0,
        "vae": vae_source(vae),
        "resolution": int(resolution),
        "seed": int(seed),
        "labels": labels,
        "chunk_size": int(chunk_size),
        "classes": classes,
        "count": len(files),
        "moments": "float16 scaled posterior moments of each image and of its mirror: "
        "mean = s * mu, logvar = log(s^2 sigma^2), s = scaling_factor",
        "source": {"folder": str(folder), "files": len(files), "hash": digest, "hash_of": HASH_OF},
    }
    meta = latents_meta(out) if out.is_dir() else None
    check_output(out, meta, wanted)
    if meta is not None and meta.get("complete"):
        print(
            f"{out} already holds these {len(files)} images ({folder}, source hash {digest[:12]}) "
            "encoded with the same settings; nothing to do",
            flush=True,
        )
        return meta

    model = load_vae(vae).to(dev)
    vae_hash = weights_sha256(model)
    if meta is not None and meta.get("vae_sha256") not in (None, vae_hash):
        raise UserError(
            f"output folder {out} was encoded with other weights for vae={vae!r} (sha256 "
            f"{meta['vae_sha256']}, now {vae_hash}); use a new output folder"
        )
    res, batch_size, chunk_size = int(resolution), int(batch_size), int(chunk_size)
    with torch.no_grad():  # the latent shape, from one blank image through the encoder
        shape = list(
            model.encode(torch.zeros(1, 3, res, res, device=dev)).latent_dist.mean.shape[1:]
        )
    meta = {
        **wanted,
        **(meta or {}),
        "vae_sha256": vae_hash,
        "scaling_factor": float(model.config.scaling_factor),
        "latent_shape": shape,
    }
    out.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(int(seed)).permutation(len(files))
    n = len(files)
    fields = {name: ((n, *shape), "float16") for name in MOMENTS}
    if y is not None:
        fields["labels"] = ((n,), "int64")
    arrays = allocate(out, fields)
    if y is not None:
        arrays["labels"][:] = y[order]
        arrays["labels"].flush()
    names = "\n".join(files[j].relative_to(folder).as_posix() for j in order)
    (out / "files.txt").write_text(names + "\n")
    done = int(meta.get("rows_done", 0))
    write_json(out / LATENTS_META, meta)
    print(
        f"encoding {n} images and their mirrors from {folder} into {out} (vae {meta['vae']}, "
        f"{resolution} px, {len(classes) or 'no'} classes): {done} of {n} already done",
        flush=True,
    )
    bar = tqdm(total=n, initial=done, unit="img", disable=not progress, file=sys.stderr)
    with ThreadPoolExecutor(int(workers)) as pool:
        for start in range(done, n, chunk_size):
            stop = min(start + chunk_size, n)
            rows = [files[j] for j in order[start:stop]]
            at = start
            for x in prefetch(pool, rows, res, batch_size):
                for name, m in zip(MOMENTS, encode_moments(model, x.to(dev)), strict=True):
                    arrays[name][at : at + len(x)] = m
                at += len(x)
                bar.update(len(x))
            for a in arrays.values():
                a.flush()  # on disk before the metadata says so
            meta["rows_done"] = stop
            write_json(out / LATENTS_META, meta)
    bar.close()
    meta.update(complete=True, rows_done=n)
    write_json(out / LATENTS_META, meta)
    print(f"wrote {n} x 2 posterior moments of {tuple(shape)} latents and {out / LATENTS_META}")
    return meta


@hydra.main(config_path="../sweeps", config_name="encode", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        encode(**OmegaConf.to_container(cfg, resolve=True))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
