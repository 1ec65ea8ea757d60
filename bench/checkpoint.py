"""Checkpoints: written atomically, read with ``weights_only=True``, checked against the model.

A checkpoint is a plain dict of tensors and primitives (state dicts, step, RNG state, a ``meta``
record of the architecture and the run identity) -- never pickled code. Saving writes a temporary
file in the same folder and ``os.replace``s it, so a kill during a save leaves the previous
checkpoint intact. The temporary file's name carries the host and process id, so the next start
can delete what a killed save left behind without touching a save still in progress elsewhere.
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import zipfile
from pathlib import Path

import torch

from bench.errors import UserError


def save(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically. A write that fails (a full disk, a quota, a
    vanished mount) removes its temporary file, keeps the previous checkpoint and is one sentence
    naming the path: the run resumes from the previous checkpoint once there is room."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)  # a failed write is an OSError, or torch's RuntimeError around it
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"cannot write checkpoint {path} ({write_error(e, path.parent)}); the temporary file "
            "is removed and the previous checkpoint kept: free space (or fix the folder), then "
            "run the same command again to resume"
        ) from e
    os.replace(tmp, path)  # atomic: readers see the old checkpoint or the new one, never half
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:  # make the rename itself durable, so a node crash cannot undo it
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_error(e: BaseException, folder: Path) -> str:
    """Why a write into ``folder`` failed, in a few words, with the room left on its disk."""
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:120]
    try:
        free = shutil.disk_usage(folder).free
        return f"{reason}; {free / 2**20:.0f} MiB free on the disk holding {folder}"
    except OSError:
        return reason


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete temporary files that killed saves of ``path`` left behind (their process, on this
    host, is gone); returns what it deleted. They are never read: ``load`` only opens ``path``."""
    path, host = Path(path), socket.gethostname()
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        owner, _, pid = tmp.name[len(path.name) + 2 : -len(".tmp")].rpartition(".")
        if owner == host and pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


#: ``meta`` keys added after checkpoints were first written: an older checkpoint without one
#: still resumes (the run identity already covers what they record).
OPTIONAL_META = ("embedding",)


def load(path: Path, expect_meta: dict | None = None) -> dict:
    """Load ``path``; a truncated file or one written for another model is a ``UserError``."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as e:
        if str(e).startswith("Weights only load failed"):  # a class or a function: never run
            raise UserError(
                f"checkpoint {path} holds pickled objects other than tensors and plain data; "
                "refusing to load it (checkpoints load with weights_only=True)"
            ) from e
        raise UserError(
            f"checkpoint {path} is truncated or corrupt ({str(e).splitlines()[0][:80]}); "
            "delete it to start this run from scratch"
        ) from e
    if not isinstance(state, dict) or "meta" not in state:
        raise UserError(f"checkpoint {path} is not a fewstep-bench checkpoint (no 'meta' record)")
    if expect_meta is not None:
        for key, want in expect_meta.items():
            if key not in state["meta"] and key in OPTIONAL_META:
                continue  # written before the record held it: nothing to compare
            got = state["meta"].get(key)
            if got != want:
                raise UserError(
                    f"checkpoint {path} was written for {key}={got!r}, but this run has {key}={want!r}"
                )
    return state
