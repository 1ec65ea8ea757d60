"""The latent space of the paper's image settings: diffusers' ``AutoencoderKL`` (SD-VAE).

A DiT on CelebA-HQ-256 / ImageNet-256 works on 32x32x4 VAE latents (Rombach et al. 2022; DiT,
Peebles & Xie 2023). ``python -m bench.encode`` stores ``z = scaling_factor * E(x)`` (0.18215 for
SD-VAE, which brings the latents near unit variance); a sample ``z`` is decoded as
``D(z / scaling_factor)``, an image in [-1, 1]. ``VAEDecoder`` is what ``eval.decoder`` builds, and
what the evaluator builds by itself from the latents' metadata (bench.data.LatentInfo).

diffusers is imported only here and only when a VAE is loaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor, nn

from bench.errors import UserError


def is_local(name: str) -> bool:
    """A VAE given as a path (absolute, ./relative, ~, or an existing folder), not a hub name."""
    return name.startswith(("/", ".", "~")) or Path(name).expanduser().exists()


def load_vae(name: str):
    """``AutoencoderKL.from_pretrained(name)`` for a local folder or a Hugging Face hub name (from
    the local hub cache first, then the hub); a failure is one sentence naming ``name``."""
    if not name:
        raise UserError("vae is not set; give a diffusers AutoencoderKL folder or hub name")
    try:
        from diffusers import AutoencoderKL
        from diffusers.utils import logging as diffusers_logging
    except ImportError as e:
        raise UserError(
            "the VAE needs diffusers, which is not installed; pip install diffusers"
        ) from e
    diffusers_logging.set_verbosity_error()  # no advice about `accelerate` on every load
    if is_local(name):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise UserError(f"VAE folder {str(folder)!r} does not exist")
        tries = [(str(folder), {})]
    else:  # the hub cache first: offline, an uncached name would retry the network for ~20 s
        tries = [(name, {"local_files_only": True}), (name, {})]
    error: Exception | None = None
    for source, kwargs in tries:
        try:
            return AutoencoderKL.from_pretrained(source, **kwargs).eval().requires_grad_(False)
        except Exception as e:  # any failure to load is about the user's VAE argument
            error = e
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise UserError(
        f"cannot load the VAE {name!r} as a diffusers AutoencoderKL ({reason}); give a folder "
        "written by save_pretrained or a hub name such as stabilityai/sd-vae-ft-mse"
    ) from error


def vae_source(name: str) -> str:
    """How metadata names a VAE: the absolute folder for a local path, else the hub name."""
    return str(Path(name).expanduser().resolve()) if is_local(name) else name


def weights_sha256(vae: nn.Module) -> str:
    """A hash of the VAE's parameters and buffers (names, shapes, values): which weights made the
    latents, whatever folder or hub revision they were loaded from."""
    h = hashlib.sha256()
    for key, t in sorted(vae.state_dict().items()):
        h.update(f"{key}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class VAEDecoder(nn.Module):
    """Latents stored by ``bench.encode`` -> images in [-1, 1]: ``D(z / scaling_factor)``.

    ``scaling_factor`` null takes the VAE's own ``config.scaling_factor`` (what ``bench.encode``
    multiplied by); ``chunk`` bounds how many latents go through the decoder at once (a 256 px
    SD-VAE decoder needs about 0.15 GB of activations per image)."""

    def __init__(self, vae: str, scaling_factor: float | None = None, chunk: int = 32):
        super().__init__()
        self.vae = load_vae(vae)
        self.name = vae_source(vae)
        self.scaling_factor = float(scaling_factor or self.vae.config.scaling_factor)
        self.chunk = chunk

    @torch.no_grad()
    def forward(self, z: Tensor) -> Tensor:
        z = z.to(next(self.vae.parameters()).dtype) / self.scaling_factor
        return torch.cat(
            [self.vae.decode(z[i : i + self.chunk]).sample for i in range(0, len(z), self.chunk)]
        )
