"""Run identity: a hash of everything that decides the trained weights.

Data, model size, method, training recipe and seed go in; evaluation, tracking, paths and
launcher settings stay out, so a finished run can be re-evaluated with new settings without
retraining, and the same command run twice finds the same run directory and MLflow run.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

IDENTITY_KEYS = ("data", "size", "method", "train", "seed")
#: ``train`` keys that change how a run is trained or shown, never its weights: logging and
#: checkpoint intervals (resume is bitwise), progress bars, compilation and gradient
#: checkpointing (same values, other speed/memory). ``precision`` and ``tf32`` do round
#: differently, so they stay in.
NOT_IDENTITY = ("log_every", "ckpt_every", "progress", "compile", "grad_checkpoint")
#: Method options added after runs were recorded, with the value that does what those runs did
#: (per method ``_target_``). At that value an option is left out of the hash, so a run recorded
#: before the option existed keeps its identity (run directory, MLflow run); any other value is
#: hashed. MLflow params still list every option. A new option goes here with its neutral value.
ADDED_OPTIONS: dict[str, dict[str, object]] = {
    "methods.reflow.Reflow": {"embedding": "dit"},
    "methods.shortcut.Shortcut": {"embedding": "dit", "sigma_min": 0.0},
    **{
        f"methods.{module}.{cls}": {"embedding": "dit", "sigma_min": 0.0}
        for module, cls in (
            ("flow_matching", "FlowMatching"),
            ("consistency", "Consistency"),
            ("live_reflow", "LiveReflow"),
        )
    },
    "methods.progressive_distillation.ProgressiveDistillation": {
        "embedding": "dit",
        "clip": None,
        "bake_cfg_scale": None,
        "teacher_weights": "online",
        "d_conditioning": "step",
        "ema_rate": 0.0,
        "lr_schedule": "anneal",
        "reset_optimizer": True,
    },
    "methods.meanflow.MeanFlow": {"label_dropout_rows": "any"},
}


def identity_config(cfg: DictConfig, effective: bool = True, world: int | None = None) -> dict:
    """The config that decides the weights; ``effective=False`` keeps ``train.grad_accum`` as the
    user set it (MLflow params) instead of the micro-batches over all processes (the hash).
    ``world``: the processes that train the run, when it is not this process's group (the planner
    names the run a SLURM job of several tasks will be)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    out = {k: resolved[k] for k in IDENTITY_KEYS if k in resolved}
    if isinstance(out.get("train"), dict):
        train = {k: v for k, v in out["train"].items() if k not in NOT_IDENTITY}
        # What decides the weights is the number of micro-batches a step is cut into, processes x
        # grad_accum (bench.distributed): 8 GPUs with grad_accum=1 are the run of 4 GPUs with 2,
        # and of one process with 8 -- and not the run of one process with 1.
        if effective and "grad_accum" in train:
            train["grad_accum"] = int(train["grad_accum"]) * (world or world_size())
        out["train"] = train
    return out


def fingerprint(root: Path, files: list[Path]) -> str:
    """A content fingerprint of ``files`` under ``root``: SHA-256 over each one's path relative
    to ``root``, size and modification time (ns), in sorted order. One ``stat`` per file and no
    reading: ~3 s per million files on a local disk, after the loader's own listing (~13 s;
    ``benchmarks/data_fingerprint.py``). A file added, removed, renamed, resized or rewritten changes it; a copy that does not keep
    modification times (``cp`` without ``-p``, ``rsync`` without ``-t``) counts as new data."""
    h = hashlib.sha256()
    cut = len(str(root).rstrip(os.sep)) + 1  # string slicing: Path.relative_to costs ~5 us/file
    for full in sorted(map(str, files)):
        st = os.stat(full)
        h.update(f"{full[cut:]}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"{len(files)}-{h.hexdigest()[:16]}"


def pin_data(cfg: DictConfig) -> None:
    """Set ``data.fingerprint`` for data read from a folder (``image_folder``, ``latents``): the
    files the loader will read, fingerprinted, so a changed dataset is another run (a new run
    directory and MLflow run) instead of the old results reported under the old identity. Data
    generated in code (digits16, shapes16, toy2d) has none; a missing folder is left to the
    loader's one-sentence error."""
    from omegaconf import open_dict

    from bench.data import source_files

    found = source_files(cfg.data)
    if found is None:
        return
    root, files = found
    with open_dict(cfg):
        cfg.data.fingerprint = fingerprint(root, files)


def pin_precision(cfg: DictConfig, resolved: str) -> None:
    """Write ``train.precision=auto`` as what this job's device resolves it to, when that is not
    fp32. ``auto`` is fp32 on a CPU and bf16 on a GPU: other rounding, other weights, so a GPU job
    of a CPU run's command is another run. ``auto`` that means fp32 is left as it is (every CPU run
    recorded keeps its identity, so hashed ``auto`` always means fp32); the GPU's is hashed as
    ``bf16``, the same run as asking for bf16."""
    from omegaconf import open_dict

    train = cfg.get("train")
    if train is not None and train.get("precision", "auto") == "auto" and resolved != "fp32":
        with open_dict(cfg):
            cfg.train.precision = resolved


def world_size() -> int:
    """Processes training this run (1 unless a torch.distributed process group is up)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def without_neutral_additions(config: dict) -> dict:
    """``config`` without the ``ADDED_OPTIONS`` of its method that sit at their neutral value."""
    method = config.get("method")
    if not isinstance(method, dict):
        return config
    neutral = ADDED_OPTIONS.get(str(method.get("_target_")), {})
    kept = {k: v for k, v in method.items() if not (k in neutral and v == neutral[k])}
    return {**config, "method": kept}


def identity_hash(cfg: DictConfig, world: int | None = None) -> str:
    blob = json.dumps(
        without_neutral_additions(identity_config(cfg, world=world)), sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def group_hash(cfg: DictConfig) -> str:
    """The identity hash with ``seed`` removed: runs that differ only in their seed share it, so a
    report can put them in one cell and give a mean and an interval over seeds (MLflow tag
    ``group_hash``; ``reports.collect`` groups by it)."""
    identity = {k: v for k, v in identity_config(cfg).items() if k != "seed"}
    if isinstance(identity.get("train"), dict):  # train.seed interpolates ${seed}
        identity["train"] = {k: v for k, v in identity["train"].items() if k != "seed"}
    blob = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def short_name(target: str) -> str:
    """``methods.shortcut.Shortcut`` -> ``shortcut``; ``bench.data.digits16`` -> ``digits16``."""
    parts = target.split(".")
    return parts[-2] if parts[-1][:1].isupper() else parts[-1]


def run_dir(cfg: DictConfig, world: int | None = None) -> Path:
    s = cfg.size
    size = str(s.get("name") or (f"{s.size}/{s.patch}" if "size" in s else short_name(s._target_)))
    name = "-".join(
        [
            short_name(cfg.method._target_),
            size.replace("/", "_"),
            short_name(cfg.data._target_),
            identity_hash(cfg, world),
        ]
    )
    return Path(cfg.paths.root) / "runs" / name
