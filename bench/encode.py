"""``python -m bench.encode``: a folder of images -> VAE latent shards for ``data=latents``.

    python -m bench.encode input=/data/celebahq256 output=/data/celebahq256_latents
    python -m bench.encode input=/data/imagenet/train output=/data/imagenet256_latents

Every image is resized on its short side and centre-cropped to ``resolution`` (``load_image``, as
``data=image_folder`` does), mapped to [-1, 1] and encoded by a diffusers ``AutoencoderKL``
(``vae``: a save_pretrained folder or a hub name). Stored is ``scaling_factor * z`` (the VAE's
``config.scaling_factor``, 0.18215 for SD-VAE), ``z`` the posterior mean or one posterior sample
seeded by ``(seed, image)``. Class sub-folders become labels, sorted names -> 0, 1, ...

The output folder (config: sweeps/encode.yaml):

* ``shard-00000.npz``, ... with ``latents`` (n, C, H, W) float32, ``labels`` (n,) int64 when
  labelled, and ``files`` (n,), the images' paths relative to the input folder;
* ``latents.json``: ``format``, ``complete``, ``vae`` (absolute folder or hub name),
  ``vae_sha256`` (its weights), ``scaling_factor``, ``resolution``, ``posterior``, ``seed``,
  ``labels``, ``classes``, ``latent_shape``, ``count``, ``shard_size``, ``shards`` (finished),
  ``source`` (``folder``, ``files``, ``hash``, ``hash_of``).

The images go into the shards in a seeded random order, so ``data=latents``' held-out tail is a
random subset, not the last classes. Shard ``i`` always holds the same images and is written to a
``.part`` file that is renamed when complete: running the same command again encodes only the
missing shards, and says so when nothing is missing. The source hash is the sha256 of the sorted
relative paths and byte sizes (no contents: hashing ImageNet would read it all twice; no mtimes:
a copied dataset keeps its hash); another source, or other settings, into an existing output
folder is an error. Bad input is one sentence and exit status 2, as in ``bench.run``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from bench import rng
from bench.data import IMAGE_SUFFIXES, LATENTS_META, _images_in, latents_meta, load_image
from bench.errors import EXIT_USER_ERROR, UserError

FORMAT = "fewstep-bench latents v1"
#: Settings that decide every stored number: a rerun into the same folder must match them.
SETTINGS = ("vae", "resolution", "posterior", "seed", "labels", "shard_size")


def source_listing(folder: Path) -> tuple[list[Path], str]:
    """The images under ``folder`` (sorted) and the sha256 of their relative paths and sizes."""
    files = _images_in(folder)
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(folder).as_posix()}\t{f.stat().st_size}\n".encode())
    return files, h.hexdigest()


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
KEYS = ("format", "complete", "vae", "vae_sha256", "scaling_factor", "resolution", "latent_shape")


def write_json(path: Path, meta: dict) -> None:
    rank = {k: i for i, k in enumerate(KEYS)}
    ordered = dict(sorted(meta.items(), key=lambda kv: rank.get(kv[0], len(KEYS))))
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(ordered, indent=1) + "\n")
    tmp.replace(path)


def check_output(out: Path, meta: dict | None, wanted: dict) -> None:
    """An existing output folder must hold latents of this source with these settings."""
    if meta is None:
        if out.is_dir() and any(p.suffix in (".npz", ".npy") for p in out.iterdir()):
            raise UserError(
                f"output folder {out} already holds latent shards without {LATENTS_META}; "
                "choose a new or empty output folder"
            )
        return
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
def encode_batch(vae, x: torch.Tensor, posterior: str, seeds: list[int]) -> np.ndarray:
    """``scaling_factor * z`` for a batch of [-1, 1] images; a sample draws its noise from a
    generator seeded per image, so it does not depend on batching, order or device."""
    dist = vae.encode(x).latent_dist
    z = dist.mean
    if posterior == "sample":
        noise = torch.stack(
            [torch.randn(z.shape[1:], generator=rng.generator(key)) for key in seeds]
        )
        z = z + dist.std * noise.to(z.device, z.dtype)
    return (z * vae.config.scaling_factor).float().cpu().numpy()


def encode(
    input: str | None,
    output: str | None,
    vae: str,
    resolution: int = 256,
    posterior: str = "sample",
    seed: int = 0,
    labels: str = "auto",
    batch_size: int = 64,
    shard_size: int = 10_000,
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
    if posterior not in ("sample", "mean"):
        raise UserError(f"posterior={posterior!r} is not allowed; choose one of sample, mean")
    for key, value in (("resolution", resolution), ("batch_size", batch_size)):
        if int(value) < 1:
            raise UserError(f"{key}={value} must be a positive integer")
    if int(shard_size) < 1 or int(workers) < 1:
        raise UserError(f"shard_size={shard_size} and workers={workers} must be positive integers")
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
        "vae": vae_source(vae),
        "resolution": int(resolution),
        "posterior": posterior,
        "seed": int(seed),
        "labels": labels,
        "shard_size": int(shard_size),
        "classes": classes,
        "count": len(files),
        "source": {
            "folder": str(folder),
            "files": len(files),
            "hash": digest,
            "hash_of": "sha256 of the sorted relative paths and byte sizes",
        },
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
    meta = {
        **wanted,
        **(meta or {}),
        "vae_sha256": vae_hash,
        "scaling_factor": float(model.config.scaling_factor),
    }
    out.mkdir(parents=True, exist_ok=True)
    shard_size, batch_size = int(shard_size), int(batch_size)
    order = np.random.default_rng(int(seed)).permutation(len(files))
    n_shards = -(-len(files) // shard_size)
    names = [f"shard-{i:05d}.npz" for i in range(n_shards)]
    todo = [i for i in range(n_shards) if not (out / names[i]).is_file()]
    shard = lambda i: order[i * shard_size : (i + 1) * shard_size]  # noqa: E731
    done = len(files) - sum(len(shard(i)) for i in todo)
    meta["shards"] = [n for i, n in enumerate(names) if i not in todo]
    write_json(out / LATENTS_META, meta)
    print(
        f"encoding {len(files)} images from {folder} into {out} (vae {meta['vae']}, "
        f"{resolution} px, posterior {posterior}, {len(classes) or 'no'} classes): "
        f"{n_shards - len(todo)} of {n_shards} shards already done",
        flush=True,
    )
    bar = tqdm(total=len(files), initial=done, unit="img", disable=not progress, file=sys.stderr)
    with ThreadPoolExecutor(int(workers)) as pool:
        for i in todo:
            idx = shard(i)
            chunks = []
            batches = prefetch(pool, [files[j] for j in idx], int(resolution), batch_size)
            for start, x in zip(range(0, len(idx), batch_size), batches, strict=True):
                seeds = [rng.stream_key(seed, j) for j in idx[start : start + batch_size]]
                chunks.append(encode_batch(model, x.to(dev), posterior, seeds))
                bar.update(len(x))
            z = np.concatenate(chunks)
            arrays = {
                "latents": z,
                "files": np.array([files[j].relative_to(folder).as_posix() for j in idx]),
            }
            if y is not None:
                arrays["labels"] = y[idx]
            part = out / (names[i] + ".part")
            with open(part, "wb") as fh:  # np.savez would append .npz to a path
                np.savez(fh, **arrays)
            part.replace(out / names[i])
            meta["latent_shape"] = list(z.shape[1:])
            meta["shards"] = sorted({*meta["shards"], names[i]})
            write_json(out / LATENTS_META, meta)
    bar.close()
    if "latent_shape" not in meta:  # every shard was there already (metadata lost its update)
        with np.load(out / names[0]) as shard:
            meta["latent_shape"] = list(shard["latents"].shape[1:])
    meta.update(complete=True, shards=names)
    write_json(out / LATENTS_META, meta)
    print(
        f"wrote {n_shards} shards of {tuple(meta['latent_shape'])} latents and {out / LATENTS_META}"
    )
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
