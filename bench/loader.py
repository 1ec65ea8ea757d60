"""The input pipeline of a training step: the next micro-batch is made while this one computes.

A micro-batch is a pure function of its key ``(seed, micro-batch number)`` (``Dataset.batch``), so
it can be made ahead of time in another thread without changing a single value. On a GPU the
``Loader`` gathers the next micro-batch of this process in a background thread into pinned host
memory while the current step runs, and copies it to the device with ``non_blocking=True`` (the
copy overlaps the step's kernels). On a CPU there is nothing to overlap with (the step uses every
core), so batches are made when asked. ``wait_s`` is the time steps spent waiting for data:
``bench.perf`` and the training log can report it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from bench.data import Batch


def pin(batch: Batch) -> Batch:
    """The batch in page-locked host memory (what a non-blocking copy to a GPU needs)."""
    p = lambda t: None if t is None else t.pin_memory()  # noqa: E731
    return Batch(p(batch.x1), p(batch.y), p(batch.x0))


class Loader:
    """``get(key, next_key)``: the micro-batch ``key`` on the device; ``next_key`` (this process's
    next micro-batch) is started in the background when ``prefetch`` (default: on CUDA)."""

    def __init__(
        self, make: Callable[[int], Batch], device: torch.device, prefetch: bool | None = None
    ):
        self.make, self.device = make, device
        self.prefetch = device.type == "cuda" if prefetch is None else prefetch
        self.pinned = device.type == "cuda"
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="loader") if self.prefetch else None
        self.pending: dict[int, Future] = {}
        self.wait_s = 0.0  # time steps spent waiting for their batch
        self.batches = 0

    def prepare(self, key: int) -> Batch:
        batch = self.make(key)
        return pin(batch) if self.pinned else batch

    def get(self, key: int, next_key: int | None = None) -> Batch:
        tick = time.perf_counter()
        future = self.pending.pop(key, None)
        for stale in list(self.pending):  # a key that was not asked for (a resume): drop it
            self.pending.pop(stale).cancel()
        batch = future.result() if future is not None else self.prepare(key)
        self.wait_s += time.perf_counter() - tick
        self.batches += 1
        if self.pool is not None and next_key is not None:
            self.pending[next_key] = self.pool.submit(self.prepare, next_key)
        return batch.to(self.device)  # non_blocking: from pinned memory it overlaps the step

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
