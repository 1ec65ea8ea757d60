"""The training loop. It never asks which method it runs: ``method.loss`` gives the loss.

AdamW on the online network, an EMA copy, gradient clipping when configured, gradient accumulation
over ``grad_accum`` micro-batches (off by default), periodic atomic
checkpoints (network, EMA, optimizer, method state, RNG, step) and resume from the last one.
``Trainer.train_step`` is one optimizer step in full, the unit ``fit`` repeats and ``bench.perf``
times. Every micro-batch reseeds the global RNG from ``(seed, step, part)`` (``bench.rng.step_key``)
and draws its rows from a generator with the same key, so a resumed run is bitwise the run that was
never interrupted (CPU, same threads), and ``W`` data-parallel processes (``bench.distributed``) see
exactly the rows and noise of one process with ``grad_accum = W``: process ``rank`` takes parts
``rank * accum ..``. Losses are summed on the device and read back once per logging interval (no
per-step sync); a non-finite mean stops the run before anything is saved over the last good
checkpoint. A stop signal (``bench.preemption``) ends the current step, saves a checkpoint and
raises ``Preempted``, so the next start resumes where it stopped. Under DDP every decision that
ends the loop (a non-finite loss, a stop signal) is taken on all-reduced values at a logging
boundary, so all processes stop at the same step; only rank 0 writes checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from bench import accel, checkpoint
from bench import distributed as ddp
from bench.data import Batch, Dataset
from bench.ema import EMA
from bench.errors import UserError
from bench.preemption import Preempted, Preemption
from bench.rng import step_key
from methods.base import Method, Nets, StageContext

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int, value: float):
        super().__init__(
            f"training diverged: mean loss is {value} over the interval ending at step {step}"
        )
        self.step, self.value = step, value


def check_batch_split(cfg, world: ddp.World) -> int:
    """The global batch must cut into ``processes x grad_accum`` equal micro-batches; their count."""
    accum = cfg.get("grad_accum", 1)
    parts = world.size * int(accum) if isinstance(accum, int) and accum >= 1 else 0
    if parts == 0:
        raise UserError(f"train.grad_accum={accum!r} must be a positive whole number")
    if cfg.batch_size % parts:
        raise UserError(
            f"train.batch_size={cfg.batch_size} must split evenly into {parts} micro-batches "
            f"({world.size} processes x train.grad_accum={accum}); use a multiple of {parts}"
        )
    return parts


class Trainer:
    """Owns the optimizer and the EMA; ``fit`` trains until ``cfg.steps`` optimizer steps."""

    def __init__(
        self,
        net: nn.Module,
        method: Method,
        data: Dataset,
        cfg,
        run_dir: Path,
        device: torch.device,
        conditional: bool,
        meta: dict,
        tracker=None,
        preemption: Preemption | None = None,
        world: ddp.World = ddp.SINGLE,
    ):
        self.net, self.method, self.data, self.cfg = net, method, data, cfg
        self.run_dir, self.device, self.conditional, self.meta = (
            Path(run_dir),
            device,
            conditional,
            meta,
        )
        self.tracker, self.preemption, self.world = tracker, preemption, world
        check_batch_split(cfg, world)
        starts = method.stage_starts(cfg.steps)
        if len(starts) != method.stages or starts[0] != 0 or starts != sorted(starts):
            raise ValueError(
                f"{type(method).__name__}.stage_starts gave {starts} for {method.stages} stages"
            )
        self.stage_starts = starts
        # The network's parameters and the method's own (an adaptive loss weight): one
        # optimizer, one clip, one all-reduce. The method's come last, so a method without any
        # keeps the optimizer state layout of earlier checkpoints.
        self.own = list(method.trainable_parameters())
        self.params = [*net.parameters(), *self.own]
        self.opt = torch.optim.AdamW(
            self.params,
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            weight_decay=cfg.weight_decay,
            fused=device.type == "cuda",
        )
        rate = cfg.ema_rate if method.ema_rate is None else method.ema_rate
        self.ema = EMA(net, rate, cfg.ema_warmup and method.ema_rate is None)
        accel.configure(device, cfg)  # TF32 on CUDA (train.tf32)
        accel.compile_model(self.ema.net, cfg.get("compile"))  # the deepcopy dropped compilation
        self.precision = accel.resolve_precision(device, cfg.get("precision") or "auto")
        # The network the loss calls: DDP's wrapper (gradient all-reduce overlapped with the
        # backward) unless the method goes through torch.func, which would bypass its hooks.
        self.wrapped = net
        if world.distributed and not method.explicit_grad_sync:
            self.wrapped = ddp.wrap(net, device)
        self.step = 0
        self.store_down = False  # the tracking store failed at the last logging step
        # Called as hook(step, nets) after each step, before its checkpoint, on every process
        # (bench.curves: evaluation during training).
        self.hooks: list = []
        method.bind(self.context())

    def stage_of(self, step: int) -> int:
        return max(i for i, start in enumerate(self.stage_starts) if start <= step)

    def context(self) -> StageContext:
        return StageContext(
            self.run_dir,
            self.data,
            self.device,
            self.conditional,
            self.cfg.seed,
            reset_optimizer=lambda: self.opt.state.clear(),
            world=self.world,
        )

    @property
    def nets(self) -> Nets:
        return Nets(self.net, self.ema.net)

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT

    def state(self) -> dict:
        return {
            "meta": self.meta,
            "step": self.step,
            "net": self.net.state_dict(),
            "ema": self.ema.state_dict(),
            "opt": self.opt.state_dict(),
            "method": self.method.state_dict(),
            "rng": torch.get_rng_state(),
        }

    def save(self) -> None:
        if self.world.main:  # every rank holds the same weights; one writes them
            checkpoint.save(self.checkpoint_path, self.state())

    def resume(self, state: dict | None = None) -> bool:
        """Load the last checkpoint if there is one (``state``: it, already loaded and checked
        by the caller); returns whether it did."""
        if state is None:
            if self.world.main:  # rank 0 alone writes checkpoints (and so alone tidies them)
                checkpoint.remove_stale_temporaries(self.checkpoint_path)
            if not self.checkpoint_path.exists():
                return False
            state = checkpoint.load(self.checkpoint_path, self.meta)
        self.net.load_state_dict(state["net"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.method.load_state_dict(state["method"])
        torch.set_rng_state(state["rng"])
        self.step = int(state["step"])
        log.info("resumed from %s at step %d", self.checkpoint_path, self.step)
        return True

    def fit(self, stop_at: int | None = None) -> None:
        """Train to ``cfg.steps`` (or to ``stop_at``, for tests that simulate an interruption)."""
        cfg = self.cfg
        end = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
        # A signal during the set-up (bench.run watches from the moment the run is opened) stops
        # here, before the first step: the last checkpoint is all a rerun needs.
        stop = self.preemption is not None and self.preemption.requested
        if ddp.any_true(stop, self.world) if self.world.distributed else stop:
            kept = self.checkpoint_path.exists()
            saved = f"checkpoint {self.checkpoint_path} kept" if kept else "nothing trained yet"
            raise Preempted(
                self.preemption.signal_name if self.preemption else "a peer", None, saved
            )
        if self.step >= end:
            return
        with self.preemption.watching() if self.preemption else contextlib.nullcontext():
            self._fit(end)

    def train_step(self, batch: Batch | None = None) -> dict[str, torch.Tensor]:
        """One optimizer step at ``self.step``, then ``step += 1``: learning rate, zero_grad, this
        process's micro-batches (each reseeded from ``(seed, step, part)``; the loss under autocast,
        backward), the gradient sync, clipping, AdamW, EMA and the method's ``after_step``.
        Returns the logged values (``loss`` first) averaged over the micro-batches, detached and on
        the device: reading them is the caller's sync. ``batch`` replaces every micro-batch's draw
        from the data (``bench.perf`` times the step without the loader)."""
        cfg, net, world = self.cfg, self.net, self.world
        accum = int(cfg.get("grad_accum", 1))
        parts = world.size * accum  # micro-batches per optimizer step, over all processes
        for group in self.opt.param_groups:
            group["lr"] = cfg.lr * self.method.lr_factor(self.step, cfg.steps)
        self.opt.zero_grad(set_to_none=True)
        nets = Nets(self.wrapped, self.ema.net)
        logs: dict[str, torch.Tensor] = {}
        for micro in range(accum):  # accum = 1: one micro-batch per process and step
            part = world.rank * accum + micro
            torch.manual_seed(step_key(cfg.seed, self.step, part))
            if batch is None:
                batch_of = cfg.batch_size // parts, cfg.seed, self.step * parts + part
                rows = self.data.batch(*batch_of, self.conditional).to(self.device)
            else:
                rows = batch
            # DDP all-reduces during the last micro-batch's backward only.
            sync = micro == accum - 1 or self.wrapped is net
            with contextlib.nullcontext() if sync else self.wrapped.no_sync():
                # bf16 autocast (CUDA) around the forwards only; fp32 master weights.
                with accel.autocast(self.device, self.precision):
                    loss, extra = self.method.loss(nets, rows, self.step)
                (loss / accum).backward()
            for k, v in {"loss": loss.detach(), **extra}.items():
                logs[k] = logs[k] + v / accum if k in logs else v / accum
        if self.wrapped is net:  # no DDP wrapper: average explicitly (no-op for 1 process)
            ddp.average_gradients(net.parameters(), world)
        ddp.average_gradients(self.own, world)  # DDP's wrapper covers the network only
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        self.ema.update(net, self.step)
        self.method.after_step(self.nets, self.step)
        self.step += 1
        return logs

    def _fit(self, end: int) -> None:
        cfg, world = self.cfg, self.world
        stage = None
        self.net.train()
        sums: dict[str, torch.Tensor] = {}
        count, tick = 0, time.perf_counter()
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            desc="train",
            dynamic_ncols=True,
            disable=not (cfg.progress and world.main),
            mininterval=2.0,
        )
        while self.step < end:
            if self.stage_of(self.step) != stage:  # a stage starts, or the run resumes inside it
                stage = self.stage_of(self.step)
                fresh = self.step == self.stage_starts[stage]
                self.method.begin_stage(stage, self.nets, self.context(), fresh)
                self.log({"train/stage": stage})
            for k, v in self.train_step().items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            bar.update(1)
            log_now = self.step % cfg.log_every == 0 or self.step == end
            save_now = self.step % cfg.ckpt_every == 0 or self.step == end
            # A stop signal makes this step a logging and checkpoint boundary. Under DDP the
            # processes agree on it (and on the loss) at logging boundaries only: that is where
            # they synchronise anyway, and SLURM signals minutes before it kills.
            stop = self.preemption is not None and self.preemption.requested
            if world.distributed:  # a rank's own flag never decides alone: the others would hang
                stop = ddp.any_true(stop, world) if log_now or save_now else False
            log_now, save_now = log_now or stop, save_now or stop
            if log_now or save_now:
                means = self.interval_means(sums, count)  # the one sync per interval
                if not all(math.isfinite(v) for v in means.values()):
                    bar.close()
                    raise DivergenceError(self.step, means["loss"])
            if log_now:
                elapsed = time.perf_counter() - tick
                means["train/img_per_s"] = count * cfg.batch_size / max(elapsed, 1e-9)
                self.log(
                    {(f"train/{k}" if k.startswith("loss") else k): v for k, v in means.items()}
                )
                bar.set_postfix(loss=f"{means['loss']:.4f}")
                sums, count = {}, 0
            # Hooks run before the save (a crash in between repeats the step, never skips it),
            # not when stopping (the grace period is for the checkpoint); their time is not
            # training time.
            spent = time.perf_counter()
            for hook in self.hooks if not stop else ():
                hook(self.step, self.nets)
            tick += time.perf_counter() - spent
            if save_now:
                self.save()
            if log_now:
                tick = time.perf_counter()  # after the save: img/s counts training only
            if stop:
                bar.close()
                raise Preempted(
                    self.preemption.signal_name if self.preemption is not None else "a peer",
                    self.step,
                    f"checkpoint saved to {self.checkpoint_path}",
                )
        bar.close()

    def log(self, metrics: dict[str, float]) -> None:
        """Training metrics at this step. A failing store does not stop training: the points are
        kept and sent with the next ones (``Tracker.log_training``); one line says so per outage."""
        if self.tracker is None:
            return
        error = self.tracker.log_training(metrics, self.step)
        if error and not self.store_down:
            log.warning(
                "the tracking store failed at step %d (%s); training goes on and the points are "
                "sent when it answers again",
                self.step,
                error,
            )
        self.store_down = error is not None

    def interval_means(self, sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
        """Mean of each logged value over the interval (and over processes under DDP)."""
        keys = sorted(sums)
        stacked = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32) for k in keys])
        stacked = ddp.all_reduce_sum(stacked.to(self.device), self.world) / self.world.size
        return {k: float(v) / count for k, v in zip(keys, stacked.tolist(), strict=True)}
