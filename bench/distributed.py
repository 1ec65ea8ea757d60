"""Data-parallel training across processes: who am I (``World``), and the few collectives we need.

One run may train on ``W`` processes (GPUs, or CPU processes under ``gloo``). The global batch of
``train.batch_size`` rows is split into ``W * train.grad_accum`` equal micro-batches; process
``rank`` computes micro-batches ``rank * accum .. rank * accum + accum - 1``, each with its own
step-seeded data draw and noise (``bench.train``), and the gradients are averaged across
processes. A run on ``W`` processes therefore sees exactly the rows and noise that one process
sees with ``grad_accum = W * accum``: same global batch, same result up to float summation order
(tests/test_distributed.py checks it with two gloo processes).

Where the rank comes from, in this order:
* torchrun (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``);
* a SLURM job step with more than one task (``srun``, or submitit with ``tasks_per_node > 1``;
  not the batch script itself, which is one process whatever ``--ntasks`` says):
  ``submitit.helpers.TorchDistributedEnvironment`` exports the same variables from SLURM's.
Otherwise the run is one process and nothing here does anything.

Only rank 0 writes: checkpoints, state.json, MLflow, evaluation. Other ranks train and exit.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from bench.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place among the processes that train one run (1 process by default)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()


def detect() -> World:
    """The world this process was launched into (see the module docstring)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
        return World(rank, int(env.get("LOCAL_RANK", rank)), size)
    # SLURM_STEP_NUM_TASKS, not SLURM_NTASKS: a batch script of an `sbatch -n 4` job sees
    # SLURM_NTASKS=4 too, but it is one process (measured on the test cluster); srun steps,
    # submitit's included, set the step's task count.
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and "SLURM_PROCID" in env:
        from submitit.helpers import TorchDistributedEnvironment

        # Exports MASTER_ADDR (the first node), MASTER_PORT (from the job id), RANK, WORLD_SIZE,
        # LOCAL_RANK for torch's env:// rendezvous; devices are chosen by local rank below.
        tde = TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return World(tde.rank, tde.local_rank, tde.world_size)
    return SINGLE


def device_for(world: World, device: torch.device) -> torch.device:
    """One GPU per process: local rank ``r`` takes ``cuda:r`` (modulo the GPUs it can see)."""
    if device.type == "cuda" and world.distributed:
        return torch.device("cuda", world.local_rank % torch.cuda.device_count())
    return device


def init(world: World, device: torch.device) -> None:
    """Join the process group (``nccl`` on GPUs, ``gloo`` on CPUs); a no-op for one process."""
    if not world.distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        rank=world.rank,
        world_size=world.size,
        device_id=device if device.type == "cuda" else None,
        # Ranks > 0 wait at a barrier while rank 0 evaluates a teacher it trained (bench.teacher);
        # the default 10-30 minutes is shorter than a 50k-sample FID evaluation.
        timeout=timedelta(hours=4),
    )
    log.info("rank %d of %d joined the %s process group", world.rank, world.size, backend)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_reduce_sum(x: torch.Tensor, world: World) -> torch.Tensor:
    """The sum of ``x`` over all processes (in place; returns ``x``)."""
    if world.distributed:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def any_true(flag: bool, world: World) -> bool:
    """Whether ``flag`` is true on any process; every process gets the same answer."""
    if not world.distributed:
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    x = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return bool(x.item() > 0)


def main_ready(world: World, failed: bool = False) -> None:
    """Rank 0 says whether the work it alone does before training (its MLflow run, state.json)
    succeeded; the other ranks wait here and stop at once if it failed, instead of waiting in the
    next collective until the timeout."""
    if any_true(failed, world) and not world.main:
        raise UserError(
            f"rank 0 stopped before training (its error says why); rank {world.rank} stops too"
        )


class DataParallel(DistributedDataParallel):
    """DDP whose other attributes resolve on the wrapped network: methods read ``num_classes`` or
    ``input_shape`` from whatever ``nets.online`` is, wrapped or not."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap(net: torch.nn.Module, device: torch.device) -> DataParallel:
    """The DDP wrapper: gradients are all-reduced in buckets while the backward still runs."""
    # broadcast_buffers=False: the only buffers are the DiT's fixed positions (no BatchNorm).
    return DataParallel(
        net, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False
    )


def average_gradients(params, world: World) -> None:
    """Average ``.grad`` over processes, for methods that cannot run under the DDP wrapper
    (``Method.explicit_grad_sync``: forward-mode AD through ``torch.func`` bypasses its hooks).
    The gradients are flattened into one buffer: one collective instead of one per tensor."""
    if not world.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world.size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
