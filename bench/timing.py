"""Timing on a device, for ``bench.perf``: clocks that mean what they say on CPUs and GPUs.

``timed`` stops the clock only after the device has finished (CUDA events around the calls, after
a sync; the host clock on CPUs). ``host_syncs`` counts the host-device synchronisations of a call
(CUDA's sync debug mode), ``peak_memory_gib`` reads the allocator's (or the process's) peak,
``profile`` lists the operators with the most self time, and ``free`` releases a measured row's
memory and compiled graphs so the next row starts clean.
"""

from __future__ import annotations

import gc
import resource
import sys
import time
import warnings

import torch


def timed(fn, n: int, device: torch.device) -> float:
    """Seconds for ``fn(0..n-1)``: CUDA events around the calls (after a sync), else host clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(n):
            fn(i)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    tick = time.perf_counter()
    for i in range(n):
        fn(i)
    return time.perf_counter() - tick


def host_syncs(fn, device: torch.device) -> int | None:
    """Host-device synchronisations during ``fn()`` (CUDA's sync debug mode); None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def profile(fn, device: torch.device, steps: int = 3, top: int = 12) -> list[dict]:
    """The operators with the most self time over ``steps`` calls (device time on CUDA)."""
    from torch.profiler import ProfilerActivity

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        for i in range(steps):
            fn(i)
        if cuda:
            torch.cuda.synchronize(device)
    attr = ("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)
    us = lambda e: next(getattr(e, a) for a in attr if hasattr(e, a))  # noqa: E731
    events = sorted((e for e in prof.key_averages() if us(e) > 0), key=lambda e: -us(e))
    total = sum(us(e) for e in events) or 1.0
    return [
        {"op": e.key, "ms_per_step": us(e) / 1e3 / steps, "share": us(e) / total}
        for e in events[:top]
    ]


def free(device: torch.device) -> None:
    """Release the last row's memory and compiled graphs: every row compiles afresh, so no row
    runs eagerly because earlier rows filled the recompile limit."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
