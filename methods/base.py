"""The method contract. The training loop and the evaluator only ever call these.

A method turns a batch into a loss (``loss``), turns noise into data in ``N`` steps (``sample``),
says what a step budget costs (``nfe``) and what a training step costs (``cost``). A method that
holds extra networks (a teacher, a target) keeps them as sub-modules so checkpoints carry them;
the online and EMA networks the trainer owns arrive in ``Nets``.

Time convention for the whole project (docs/methods.md): ``t = 0`` is noise ``x0 ~ N(0, I)``,
``t = 1`` is data ``x1``, ``x_t = (1 - t) x0 + t x1``, velocity ``v = x1 - x0``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from bench.data import Batch
from bench.distributed import SINGLE, World, barrier
from bench.dit import FLOW_MATCHING_LEVEL
from bench.errors import UserError
from bench.guidance import guided_velocity

MAX_STEPS = 128
BUDGETS = tuple(2**k for k in range(8))  # 1, 2, 4, ..., 128


@dataclass
class StageContext:
    """What a stage transition may need besides the networks."""

    run_dir: Path
    data: object  # bench.data.Dataset
    device: torch.device
    conditional: bool
    seed: int
    reset_optimizer: Callable[[], None]  # the method asks; the trainer owns the optimizer
    #: the data-parallel processes training this run: work that writes files (reflow pairs) is
    #: shared out by rank and joined by ``world_barrier``; only rank 0 writes everything else
    world: World = SINGLE

    def world_barrier(self) -> None:
        barrier(self.world)


@dataclass
class Nets:
    """The networks a method may use during training: ``online`` is optimised, ``ema`` is the
    exponential moving average the trainer keeps (no gradients, eval mode)."""

    online: nn.Module
    ema: nn.Module


@dataclass
class Regression:
    """A batch of regression problems ``net(xt, t, d, y) -> target`` (what most losses are)."""

    xt: Tensor
    t: Tensor
    d: Tensor
    y: Tensor | None
    target: Tensor
    num_consistency: int = 0  # leading rows with bootstrap targets (shortcut models)


def regression_loss(net: nn.Module, r: Regression, lead: str) -> tuple[Tensor, dict[str, Tensor]]:
    """Plain MSE of ``net(xt, t, d, y)`` against ``r.target`` over all rows, logged per part: the
    leading ``r.num_consistency`` rows as ``loss/<lead>``, the rest as ``loss/flow``."""
    v = net(r.xt, r.t, r.d, r.y)
    err = (v - r.target).square().flatten(1).mean(1)  # per row
    m = r.num_consistency
    logs = {"loss/flow": err[m:].mean().detach()}
    if m:
        logs[f"loss/{lead}"] = err[:m].mean().detach()
    return err.mean(), logs


def bcast(s: Tensor, x: Tensor) -> Tensor:
    """Per-row scalars ``s`` (N,) shaped to broadcast against ``x`` (N, ...)."""
    return s.view(-1, *([1] * (x.dim() - 1)))


def interpolate(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """``x_t = (1 - t) x0 + t x1`` with ``t`` of shape (N,) broadcast over the sample dims."""
    t = bcast(t, x0)
    return (1 - t) * x0 + t * x1


def two_step_average(
    velocity, xt: Tensor, t: Tensor, d: Tensor, clip: float | None = None
) -> Tensor:
    """The velocity of one step of size ``2d`` built from two of size ``d`` (shortcut bootstrap,
    progressive-distillation target): ``(v(x_t, t) + v(x_t + d v(x_t, t), t + d)) / 2``, with the
    midpoint and the result clipped to ``[-clip, clip]`` when ``clip`` is set."""
    dd = bcast(d, xt)
    v1 = velocity(xt, t)
    x_mid = xt + dd * v1
    if clip is not None:
        x_mid = x_mid.clamp(-clip, clip)
    target = (v1 + velocity(x_mid, t + d)) / 2
    return target.clamp(-clip, clip) if clip is not None else target


def check_budget(steps: int, allowed=BUDGETS, method: str = "this method") -> int:
    """A step budget must be a power of two in 1..128 (one of the shortcut levels)."""
    try:
        valid = not isinstance(steps, bool) and int(steps) == steps and int(steps) in allowed
    except (TypeError, ValueError, OverflowError):
        valid = False
    if not valid:
        raise UserError(
            f"step budget {steps!r} is not allowed for {method}; "
            f"choose from {', '.join(map(str, allowed))} (powers of two up to {MAX_STEPS})"
        )
    return int(steps)


class Method(nn.Module):
    """Base class. Subclasses implement ``loss``; the default sampler is Euler."""

    #: number of training stages (progressive distillation rounds, reflow stages)
    stages: int = 1
    #: classifier-free guidance scale used when sampling class-conditional models (1 = off)
    cfg_scale: float = 1.0

    def loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def step_size(self, steps: int) -> float:
        """The ``d`` the network is conditioned on when sampling with ``steps`` steps."""
        return FLOW_MATCHING_LEVEL

    def guided(self, steps: int) -> bool:
        """Whether sampling at this budget applies CFG (and so doubles every evaluation)."""
        return self.cfg_scale != 1.0

    def check_budget(self, steps: int) -> int:
        return check_budget(steps, method=type(self).__name__)

    def nfe(self, steps: int, conditional: bool) -> int:
        """Network evaluations per sample at this budget, CFG doubling included."""
        return steps * (2 if conditional and self.guided(steps) else 1)

    @torch.no_grad()
    def sample(self, net: nn.Module, x0: Tensor, steps: int, y: Tensor | None = None) -> Tensor:
        """Euler: ``t_i = i / N``, ``x <- x + (1/N) v(x, t_i, d, y)`` for ``i = 0..N-1``."""
        steps = self.check_budget(steps)
        dt = 1.0 / steps
        d = torch.full((x0.shape[0],), self.step_size(steps), device=x0.device)
        scale = self.cfg_scale if y is not None and self.guided(steps) else 1.0
        x = x0
        for i in range(steps):
            t = torch.full((x0.shape[0],), i * dt, device=x0.device)
            v = guided_velocity(net, x, t, d, y, scale) if y is not None else net(x, t, d)
            x = x + dt * v
        return x

    def cost(self) -> dict[str, float]:
        """Network forward-equivalents per training sample (a backward counts as two forwards)."""
        return {"forward_equivalents_per_sample": 3.0}

    #: whether the method trains from a frozen teacher network (``attach_teacher``): "no",
    #: "optional" (consistency: CT without, CD with) or "required" (progressive distillation)
    needs_teacher: str = "no"
    #: an EMA rate the method imposes (0 = the EMA follows the online weights: "no EMA")
    ema_rate: float | None = None
    #: a method whose loss calls the online network through ``torch.func`` (MeanFlow's JVP) sets
    #: this: a DDP wrapper's gradient hooks would be bypassed, so under DDP the trainer hands the
    #: method the unwrapped module and all-reduces the gradients itself after the backward.
    explicit_grad_sync: bool = False
    #: how the network embeds ``d`` and ``t`` (``bench.dit.DiT``; ``build`` passes both on): "level"
    #: = log2(1/d) for the shortcut levels or "linear" = d itself, like t; the sinusoid scale of t
    #: (MeanFlow, whose JVP differentiates through both, uses linear and 1.0)
    d_embedding: str = "level"
    t_scale: float = 1000.0

    def stage_starts(self, total_steps: int) -> list[int]:
        """The first optimizer step of each of the ``stages`` stages (stage 0 starts at 0; a
        stage may be empty, e.g. reflow's stage 0 when a teacher is given)."""
        return [0]

    def begin_stage(self, stage: int, nets: Nets, ctx: StageContext, fresh: bool) -> None:
        """Called when stage ``stage`` (0-based) starts (``fresh``) or a run resumes inside it.
        Work that changes the networks happens only when ``fresh``; state that is not in the
        method's ``state_dict`` (files such as reflow pairs) is reloaded either way."""

    def bind(self, ctx: StageContext) -> None:
        """Called once when the trainer is built (methods that keep files in the run directory)."""

    def lr_factor(self, step: int, total_steps: int) -> float:
        """Multiplier of the base learning rate at ``step`` (1 = constant, the default)."""
        return 1.0

    def one_off_cost(self) -> float:
        """Forward-equivalents spent outside the per-step loss (pair generation, ...)."""
        return 0.0

    def after_step(self, nets: Nets, step: int) -> None:
        """Called after every optimizer step (target updates, curricula)."""
