"""Paper-scale data and evaluation, measured: memory-mapped latent stores vs the in-memory loader,
and evaluation on 1 vs 2 processes (issue 17). Results go to benchmarks/RESULTS.md by hand.

    python benchmarks/store_scale.py --root /tmp/store-bench [--big 1281167] [--small 13000]

1. Stores of ``--small`` and ``--big`` rows of 4x32x32 latents (bench.store's format). The small
   one is complete (random moments); the big one has its ``mean`` field written in full (10.5 GB of
   fp16 at 1,281,167 rows) and its ``logvar`` / mirror fields left as sparse files (zeros: std 1,
   mirror = 0) when ``--sparse-rest``, so it fits a small disk; the loader opens and reads all four.
2. For each, a fresh process builds the run's parts (``bench.build.prepare``: data, tiny DiT,
   flow matching) and takes one training step (batch 64, data.flip, data.posterior=sample); it
   reports the time from process start to the end of that step and its memory: RssAnon (the
   process's own), RssFile (mapped file pages: page cache, shared), VmHWM (peak).
3. The same with the in-memory loader (an older ``.npy`` folder of the same means) at the small
   size and at ``--memory-rows``.
4. Evaluation of one budget (tiny DiT, digits16, ``--eval-samples`` samples in batches of 64) on 1
   process and on 2 gloo processes, one thread each: rank 0's wall time to all samples gathered.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FIRST_STEP = r"""
import time, sys, json
t0 = float(sys.argv[3])
import torch
torch.set_num_threads(1)
from hydra import compose, initialize_config_dir
from bench.build import prepare
from bench.train import Trainer
kind, path = sys.argv[1], sys.argv[2]
store = kind == "store"
with initialize_config_dir(config_dir=sys.argv[4], version_base="1.3"):
    cfg = compose(config_name="config", overrides=[
        "data=latents", f"data.path={path}", f"data.flip={store}",
        f"data.posterior={'sample' if store else 'mean'}", "method=flow_matching", "size=tiny",
        "train.batch_size=64", "train.progress=false", "device=cpu"])
parts = prepare(cfg)
built = time.time()
trainer = Trainer(parts.net, parts.method, parts.data, cfg.train, "/tmp/unused", parts.device,
                  parts.conditional, {"identity": "bench", "model": "tiny"})
trainer.train_step()
done = time.time()
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
kb = lambda k: int(status[k].split()[0]) / 2**20  # GiB
print(json.dumps({"rows": len(parts.data.train_x) + len(parts.data.test_x),
                  "to_first_step_s": done - t0, "to_data_and_net_s": built - t0,
                  "rss_anon_gib": kb("RssAnon"), "rss_file_gib": kb("RssFile"),
                  "peak_rss_gib": kb("VmHWM")}))
"""


def write_store(out: Path, rows: int, sparse_rest: bool) -> float:
    """A latent store of ``rows`` x 4x32x32; returns the seconds it took."""
    from bench.data import LATENTS_META
    from bench.store import MOMENTS, allocate, synthetic_latents, write_meta

    tick = time.time()
    if not sparse_rest:
        synthetic_latents(out, rows, shape=(4, 32, 32), classes=1000)
        return time.time() - tick
    out.mkdir(parents=True, exist_ok=True)
    arrays = allocate(out, {**{m: ((rows, 4, 32, 32), "float16") for m in MOMENTS}})
    chunk = np.random.default_rng(0).standard_normal((4096, 4, 32, 32)).astype(np.float16)
    for start in range(0, rows, len(chunk)):  # one random chunk, repeated: the disk is the cost
        n = min(len(chunk), rows - start)
        arrays["mean"][start : start + n] = chunk[:n]
    arrays["mean"].flush()
    labels = allocate(out, {"labels": ((rows,), "int64")})["labels"]
    labels[:] = np.arange(rows) % 1000
    labels.flush()
    meta = json.loads(json.dumps(synthetic_meta(rows)))
    write_meta(out / LATENTS_META, meta, ("format", "complete", "rows_done"))
    return time.time() - tick


def synthetic_meta(rows: int) -> dict:
    from bench.data import LATENT_STORE_FORMAT

    return {
        "format": LATENT_STORE_FORMAT,
        "complete": True,
        "rows_done": rows,
        "vae": "none",
        "scaling_factor": 1.0,
        "resolution": 256,
        "latent_shape": [4, 32, 32],
        "count": rows,
        "classes": [str(c) for c in range(1000)],
        "source": {"folder": "synthetic", "files": rows, "hash": "synthetic"},
    }


def first_step(kind: str, path: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", FIRST_STEP, kind, str(path), str(time.time()), str(ROOT / "sweeps")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        timeout=3600,
    )
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def in_memory_folder(store: Path, out: Path, rows: int) -> Path:
    """An older-format folder (one .npy of fp16 latents + labels .npz-free) of the store's means."""
    out.mkdir(parents=True, exist_ok=True)
    mean = np.load(store / "mean.npy", mmap_mode="r")
    np.save(out / "latents.npy", np.asarray(mean[:rows]))
    return out


def _eval_rank(rank: int, world_size: int, port: int, samples: int, out: str) -> None:
    import torch

    from bench import distributed as ddp
    from bench import shard
    from bench.build import build
    from bench.evaluate import Evaluator

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    world = ddp.World(rank, rank, world_size)
    ddp.init(world, torch.device("cpu"))
    try:
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=str(ROOT / "sweeps"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=["method=flow_matching", "size=tiny"])
        data, net, method, cond = build(cfg)
        net.eval()
        ev = Evaluator(None, data, samples, 0, 64, torch.device("cpu"), cond, world=world)
        ddp.barrier(world)
        x, elapsed, _ = ev.sample(method, net, 4)
        if world.main:
            Path(out).write_text(json.dumps({"processes": world_size, "wall_s": elapsed}))
        del shard
    finally:
        ddp.shutdown()


def eval_wall(world_size: int, samples: int, out: Path) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_eval_rank, args=(world_size, port, samples, str(out)), nprocs=world_size)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, default=Path("/tmp/store-bench"))
    ap.add_argument("--small", type=int, default=13_000)
    ap.add_argument("--big", type=int, default=1_281_167)
    ap.add_argument("--memory-rows", type=int, default=130_000)
    ap.add_argument("--sparse-rest", action="store_true")
    ap.add_argument("--eval-samples", type=int, default=1024)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: store,memory,eval")
    args = ap.parse_args()
    skip = set(args.skip.split(","))
    out: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    small, big = args.root / f"store-{args.small}", args.root / f"store-{args.big}"
    if "store" not in skip:
        if not small.exists():
            out["write_small_s"] = write_store(small, args.small, sparse_rest=False)
        if not big.exists():
            out["write_big_s"] = write_store(big, args.big, sparse_rest=args.sparse_rest)
        out["store_small"] = first_step("store", small)
        out["store_big"] = first_step("store", big)
        print(json.dumps(out, indent=1), flush=True)
    if "memory" not in skip:
        for rows in (args.small, args.memory_rows):
            folder = in_memory_folder(big, args.root / f"memory-{rows}", rows)
            out[f"memory_{rows}"] = first_step("memory", folder)
        print(json.dumps(out, indent=1), flush=True)
    if "eval" not in skip:
        for w in (1, 2):
            out[f"eval_{w}_processes"] = eval_wall(
                w, args.eval_samples, args.root / f"eval{w}.json"
            )
    print(json.dumps(out, indent=1), flush=True)
    (args.root / "results.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
