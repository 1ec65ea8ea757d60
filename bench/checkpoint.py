"""Checkpoints: written atomically, read with ``weights_only=True``, checked against the model.

A checkpoint is a plain dict of tensors and primitives (state dicts, step, RNG state, a ``meta``
record of the architecture and the run identity) -- never pickled code. Saving writes a temporary
file in the same folder and ``os.replace``s it, so a kill during a save leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from bench.errors import UserError


def save(path: Path, state: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path, expect_meta: dict | None = None) -> dict:
    """Load ``path``; a truncated file or one written for another model is a ``UserError``."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as e:
        raise UserError(
            f"checkpoint {path} is truncated or corrupt ({str(e).splitlines()[0][:80]}); "
            "delete it to start this run from scratch"
        ) from e
    if not isinstance(state, dict) or "meta" not in state:
        raise UserError(f"checkpoint {path} is not a fewstep-bench checkpoint (no 'meta' record)")
    if expect_meta is not None:
        for key, want in expect_meta.items():
            got = state["meta"].get(key)
            if got != want:
                raise UserError(
                    f"checkpoint {path} was written for {key}={got!r}, but this run has {key}={want!r}"
                )
    return state
