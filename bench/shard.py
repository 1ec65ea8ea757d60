"""Sharded evaluation: every process samples its share of the fixed noise, rank 0 gets them all.

The fixed evaluation noise is cut into batches of ``eval.batch_size`` by global sample number
(batch ``j`` holds samples ``j * B .. j * B + B - 1``), and process ``rank`` of ``W`` samples the
batches ``j`` with ``j % W == rank``. A batch is the unit because a sampler may draw per batch
(consistency's re-noising is seeded by its batch's noise): the same batches on any number of
processes give the same samples, so one process and eight give the same numbers. The samples are
gathered to rank 0 in global order; rank 0 computes the metrics and logs them (metric suites hold
the reference features; sample-side features are computed once on rank 0 from the gathered
samples). With ``eval.batch_size`` >= ``eval.num_samples`` there is one batch and rank 0 samples
it alone: shard by choosing ``eval.batch_size <= num_samples / W``.

Rank 0 decides what is evaluated (it holds the run record and the stop signal): before each
budget it ``announce``s the budget's steps, after the last one ``None``; the other ranks
``follow`` those announcements (bench.run).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from bench import distributed as ddp


def my_batches(n: int, batch_size: int, world: ddp.World) -> list[int]:
    """The batch numbers this process samples: ``j % W == rank`` of ``ceil(n / batch_size)``."""
    return [j for j in range(-(-n // batch_size)) if j % world.size == world.rank]


def gather_batches(mine: dict[int, Tensor], world: ddp.World) -> list[Tensor] | None:
    """Every process's ``{batch number: samples}`` on rank 0, as a list in batch order (None on
    the other ranks). CPU tensors travel through gloo or nccl's object gather."""
    if not world.distributed:
        return [mine[j] for j in sorted(mine)]
    parts: list[dict[int, Tensor]] | None = [{} for _ in range(world.size)] if world.main else None
    dist.gather_object(mine, parts, dst=0)
    if not world.main:
        return None
    merged = {j: t for part in parts for j, t in part.items()}
    return [merged[j] for j in sorted(merged)]


def announce(steps: int | None, world: ddp.World) -> int | None:
    """Rank 0 tells every process the budget it evaluates next (``None``: evaluation is over);
    every process returns that value."""
    if not world.distributed:
        return steps
    box = [steps if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def follow(sample: Callable[[int], object], world: ddp.World) -> int:
    """A rank other than 0: sample its share of every budget rank 0 announces, until ``None``.
    Returns how many budgets it took part in."""
    count = 0
    while (steps := announce(None, world)) is not None:
        sample(steps)
        count += 1
    return count


def wall_time_sync(device: torch.device) -> None:
    """Wait for the device, so a wall clock read after it covers the work queued before."""
    if device.type == "cuda":
        torch.cuda.synchronize()
