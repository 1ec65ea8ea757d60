"""What the bootstrap intervals of FD cost (bench/metrics/bootstrap.py), on this machine.

    python benchmarks/bootstrap_cost.py [--threads N]

Times ``resampled_fd`` (200 resamples, one reference) for the offline metric's 64-d features at
1,000 and 10,000 samples and for Inception's 2,048-d features at 1,000 samples (20 resamples,
scaled to 200), on the CPU and, when there is one, the GPU. Prints one Markdown row per case.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench.metrics.bootstrap import resampled_fd
from bench.metrics.frechet import Stats


def case(n: int, d: int, resamples: int, device: str) -> float:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(n, d))
    reference = Stats.of(rng.normal(size=(max(n, 2 * d), d)) + 0.1)
    resampled_fd(feats, reference, 2, device=device)  # warm-up (kernels, allocator)
    if device == "cuda":
        torch.cuda.synchronize()
    tick = time.perf_counter()
    resampled_fd(feats, reference, resamples, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - tick) * 200 / resamples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print("| device | samples | feature dim | seconds per 200 resamples (one reference) |")
    print("| --- | --- | --- | --- |")
    for device in devices:
        for n, d, resamples in ((1000, 64, 200), (10000, 64, 200), (1000, 2048, 20)):
            print(f"| {device} | {n} | {d} | {case(n, d, resamples, device):.2f} |")


if __name__ == "__main__":
    main()
