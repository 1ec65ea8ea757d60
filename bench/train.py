"""The training loop. It never asks which method it runs: ``method.loss`` gives the loss.

AdamW on the online network, an EMA copy, gradient clipping when configured, gradient accumulation
over ``grad_accum`` micro-batches (off by default), periodic atomic
checkpoints (network, EMA, optimizer, method state, RNG, step) and resume from the last one.
Every micro-batch reseeds the global RNG from ``(seed, step, part)`` and draws its rows from a
generator with the same key, so a resumed run is bitwise the run that was never interrupted (CPU,
same threads), and ``W`` data-parallel processes (``bench.distributed``) see exactly the rows and
noise of one process with ``grad_accum = W``: process ``rank`` takes parts ``rank * accum ..``.
Losses are summed on the device and read back once per logging interval (no per-step sync);
a non-finite mean stops the run before anything is saved over the last good checkpoint.
A stop signal (SIGUSR1, SIGUSR2, SIGTERM; see ``Preemption``) ends the current step, saves a
checkpoint and raises ``Preempted``, so the next start resumes where it stopped. Under DDP every
decision that ends the loop (a non-finite loss, a stop signal) is taken on all-reduced values at a
logging boundary, so all processes stop at the same step; only rank 0 writes checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from bench import accel, checkpoint
from bench import distributed as ddp
from bench.data import Dataset
from bench.ema import EMA
from bench.errors import UserError
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


class Preempted(RuntimeError):
    """A stop signal arrived; what the next start needs to resume is saved."""

    def __init__(self, signal_name: str, step: int, saved: str):
        super().__init__(
            f"preempted by {signal_name} at step {step}; {saved}; "
            "run the same command again to resume"
        )
        self.signal_name, self.step = signal_name, step


class Preemption:
    """``with Preemption() as p:`` turns SIGUSR1, SIGUSR2 and SIGTERM (what SLURM, submitit and most
    schedulers send before they kill a job) into a request to stop. The handler only records the
    signal -- no I/O inside a handler; the trainer checks ``p.requested`` after each optimizer step.
    Handlers are installed only in the main thread (Python allows no other) and restored on exit.

    A handler that was installed before ours (submitit's: on its signal, SIGUSR2 by default, it
    requeues the job and exits) is kept: ``forward()`` calls it once our checkpoint is saved, so a
    job at its time limit saves first and is requeued second."""

    SIGNALS = tuple(
        getattr(signal, n) for n in ("SIGUSR1", "SIGUSR2", "SIGTERM") if hasattr(signal, n)
    )

    def __init__(self, signals: tuple[int, ...] = SIGNALS):
        self.signals = signals
        self.signum: int | None = None
        self.armed = 0  # how many watching loops are active
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.armed:
            self.signum = signum  # acted on at the end of the step / budget
        else:  # no loop is watching (setup, a teacher's evaluation): what would have happened
            self._pass_on(signum, frame)

    def _pass_on(self, signum, frame) -> None:
        previous = self._previous.get(signum)
        if callable(previous):  # submitit's: requeue and exit on its signal, log SIGTERM
            previous(signum, frame)
        elif previous != signal.SIG_IGN:  # the default action: terminate
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    @contextlib.contextmanager
    def watching(self):
        """``with p.watching():`` around a loop that checks ``requested`` often (training, the
        evaluation budgets); outside one, a signal takes the effect it would have had without
        us, so a time-limit signal during setup still gets submitit's requeue."""
        self.armed += 1
        try:
            yield self
        finally:
            self.armed -= 1

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "none"

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():  # None: installed outside Python
            signal.signal(s, signal.SIG_DFL if previous is None else previous)
        # _previous is kept: ``forward`` runs after the ``with`` block has restored the handlers.

    def forward(self) -> None:
        """Hand the recorded signal to the Python handler that was installed before ours, if any
        (submitit's requeue-and-exit); default actions (terminate) are not replayed."""
        previous = self._previous.get(self.signum) if self.signum is not None else None
        if callable(previous) and previous not in (signal.default_int_handler,):
            previous(self.signum, None)


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


def step_seed(seed: int, step: int, part: int = 0) -> int:
    """The RNG key of micro-batch ``part`` of optimizer step ``step`` (part < 7919: no collisions)."""
    return (seed * 1_000_003 + step * 7_919 + part * 104_729) % 2**63


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
        self.opt = torch.optim.AdamW(
            net.parameters(),
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

    def resume(self) -> bool:
        """Load the last checkpoint if there is one; returns whether it did."""
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
        accum = int(cfg.get("grad_accum", 1))
        parts = self.world.size * accum  # micro-batches per optimizer step, over all processes
        if self.step >= end:
            return
        with self.preemption.watching() if self.preemption else contextlib.nullcontext():
            self._fit(end, accum, parts)

    def _fit(self, end: int, accum: int, parts: int) -> None:
        cfg, net, world = self.cfg, self.net, self.world
        stage = None
        net.train()
        train_nets = Nets(self.wrapped, self.ema.net)
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
                if self.tracker is not None:
                    self.tracker.log_metrics({"train/stage": stage}, step=self.step)
            factor = self.method.lr_factor(self.step, cfg.steps)
            for group in self.opt.param_groups:
                group["lr"] = cfg.lr * factor
            self.opt.zero_grad(set_to_none=True)
            for micro in range(accum):  # accum = 1: one micro-batch per process and step
                part = world.rank * accum + micro
                torch.manual_seed(step_seed(cfg.seed, self.step, part))
                batch = self.data.batch(
                    cfg.batch_size // parts, cfg.seed, self.step * parts + part, self.conditional
                ).to(self.device)
                # DDP all-reduces during the last micro-batch's backward only.
                sync = micro == accum - 1 or self.wrapped is net
                with contextlib.nullcontext() if sync else self.wrapped.no_sync():
                    # bf16 autocast (CUDA) around the forwards only; fp32 master weights.
                    with accel.autocast(self.device, self.precision):
                        loss, logs = self.method.loss(train_nets, batch, self.step)
                    (loss / accum).backward()
                for k, v in {"loss": loss.detach(), **logs}.items():
                    sums[k] = sums.get(k, 0.0) + v / accum
            if self.wrapped is net:  # no DDP wrapper: average explicitly (no-op for 1 process)
                ddp.average_gradients(net.parameters(), world)
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            self.opt.step()
            self.ema.update(net, self.step)
            self.method.after_step(self.nets, self.step)
            self.step += 1
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
                if self.tracker is not None:
                    named = {
                        (f"train/{k}" if k.startswith("loss") else k): v for k, v in means.items()
                    }
                    self.tracker.log_metrics(named, step=self.step)
                bar.set_postfix(loss=f"{means['loss']:.4f}")
                sums, count = {}, 0
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

    def interval_means(self, sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
        """Mean of each logged value over the interval (and over processes under DDP)."""
        keys = sorted(sums)
        stacked = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32) for k in keys])
        stacked = ddp.all_reduce_sum(stacked.to(self.device), self.world) / self.world.size
        return {k: float(v) / count for k, v in zip(keys, stacked.tolist(), strict=True)}
