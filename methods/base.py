"""The method contract: everything the harness calls on a method, declared here and nowhere else.

A method is an ``nn.Module``: its ``state_dict`` is the method state checkpoints carry (a
teacher, a round's teacher). The trainer, the evaluator, the budget and ``bench.run`` call only
the members below; a new method implements the two abstract ones and overrides a default only
where it differs. The loop never asks which method it runs.

==========================================  ==========================================================
member                                      what the harness does with it
==========================================  ==========================================================
``loss(nets, batch, step)`` (abstract)      each training step: the loss to minimise and the parts
                                            to log (``{"loss/flow": ...}``)
``cost() -> Cost`` (abstract)               budgets: forward-equivalents per training sample
                                            (``per_sample``; a backward counts as 2 forwards) and
                                            once per run (``one_off``: pair generation, ...)
``sample(net, x0, steps, y=None)``          evaluation: noise to data in ``steps`` steps (default:
                                            Euler, ``t_i = i/N``, conditioned on ``step_size(N)``)
``nfe(steps, conditional)``                 network evaluations per sample (CFG doubling included)
``check_budget(steps)``                     refuses a step budget in one sentence, before training
``attach_teacher(net)``                     hands over a trained teacher (``needs_teacher``); the
                                            default keeps a frozen copy as ``self.teacher``
``stage_starts(total_steps)``               the first optimizer step of each of ``stages`` stages
``begin_stage(stage, nets, ctx, fresh)``    a stage starts (``fresh``) or a run resumes inside it
``bind(ctx)``                               once, when the trainer is built (files in the run dir)
``lr_factor(step, total_steps)``            multiplier of the base learning rate
``trainable_parameters()``                  the method's own parameters the trainer optimises with
                                            the network (an adaptive loss weight); default none
``stages``                                  number of training stages (reflow, distillation rounds)
``needs_teacher``                           ``"no"``, ``"optional"`` or ``"required"``
``ema_rate``                                an EMA rate the method imposes (None: ``train.ema_rate``)
``explicit_grad_sync``                      the loss calls the net through ``torch.func`` (DDP hooks
                                            bypassed: the trainer all-reduces gradients itself)
``d_embedding``, ``t_scale``, ``d_scale``  how the network embeds ``d`` and ``t`` (``bench.dit``;
                                            the option ``embedding: dit | raw`` sets the scales)
==========================================  ==========================================================

The default sampler has three knobs a method may set instead of rewriting ``sample`` and
``nfe``: ``step_size(steps)`` (the ``d`` the net is conditioned on), ``guided(steps)`` (whether
CFG applies at this budget) and ``cfg_scale``.

Options: every constructor argument is an option, a key of ``sweeps/method/<name>.yaml``,
declared once in the signature with its type (``bench.options``: ``Literal[...]`` for choices,
``Annotated[float, Range(...)]`` for bounds); ``self.set_options(locals())`` checks them all in
one call, with one message style, and keeps each as an attribute of the same name.

Helpers shared by several methods (Euler, noise, the row split, interpolation) live in
``methods/common.py``; ``CONTRIBUTING.md`` walks through adding a method.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from bench import options
from bench.budget import Cost
from bench.data import Batch
from bench.distributed import SINGLE, World, barrier
from bench.dit import EMBEDDING_SCALES, FLOW_MATCHING_LEVEL
from bench.errors import UserError
from methods.common import euler, frozen_copy

MAX_STEPS = 128
BUDGETS = tuple(2**k for k in range(8))  # 1, 2, 4, ..., 128
Budget = Literal[BUDGETS]  # an option that must be one of the step budgets
#: the ``embedding`` option: how ``t`` and the level of ``d`` enter the sinusoid (bench.dit)
Embedding = Literal[tuple(EMBEDDING_SCALES)]


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


class Method(nn.Module, abc.ABC):
    """The contract (the module docstring's table). Subclasses implement ``loss`` and ``cost``."""

    stages: int = 1
    needs_teacher: Literal["no", "optional", "required"] = "no"
    ema_rate: float | None = None
    explicit_grad_sync: bool = False
    d_embedding: Literal["level", "linear"] = "level"
    t_scale: float = 1000.0
    d_scale: float | None = None  # None: bench.dit.default_d_scale for d_embedding
    cfg_scale: float = 1.0  # classifier-free guidance when sampling labelled models (1 = off)

    # -- training ----------------------------------------------------------------------------
    @abc.abstractmethod
    def loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of optimizer step ``step`` on ``batch`` (``nets.online`` carries the gradient)
        and detached values to log, keyed ``loss/<part>``."""

    @abc.abstractmethod
    def cost(self) -> Cost:
        """What training spends, as ``CountingNet`` counts it (tests hold the two equal)."""

    def attach_teacher(self, net: nn.Module) -> None:
        """Hand over a trained teacher: a frozen eval-mode copy is kept as the sub-module
        ``teacher`` (so checkpoints carry it). A method without a teacher refuses."""
        if self.needs_teacher == "no":
            raise UserError(
                f"{type(self).__name__} learns without a teacher; remove method.teacher"
            )
        self.teacher = frozen_copy(net)

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

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters of the method itself (not the network's) that the trainer optimises with
        the network: same optimizer, clipping and gradient all-reduce; no EMA. They live in the
        method's ``state_dict``, so checkpoints carry them. Default: none -- opting in is
        explicit, so a teacher copy that forgot ``requires_grad_(False)`` is never trained."""
        return []

    # -- sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, net: nn.Module, x0: Tensor, steps: int, y: Tensor | None = None) -> Tensor:
        """Euler: ``t_i = i / N``, ``x <- x + (1/N) v(x, t_i, step_size(N), y)``, ``i < N``."""
        steps = self.check_budget(steps)
        scale = self.cfg_scale if y is not None and self.guided(steps) else 1.0
        return euler(net, x0, steps, self.step_size(steps), y, scale)

    def nfe(self, steps: int, conditional: bool) -> int:
        """Network evaluations per sample at this budget, CFG doubling included."""
        return steps * (2 if conditional and self.guided(steps) else 1)

    def check_budget(self, steps: int) -> int:
        return check_budget(steps, method=type(self).__name__)

    def step_size(self, steps: int) -> float:
        """The ``d`` the network is conditioned on when sampling with ``steps`` steps."""
        return FLOW_MATCHING_LEVEL

    def guided(self, steps: int) -> bool:
        """Whether sampling at this budget applies CFG (and so doubles every evaluation)."""
        return self.cfg_scale != 1.0

    # -- for subclasses ----------------------------------------------------------------------
    def set_options(self, values: dict, rename: dict[str, str] | None = None) -> None:
        """Check the constructor's arguments (``locals()``) against its type hints in one call
        and keep each as an attribute: ``self.<name>``, or ``self.<rename[name]>`` where the
        option's name is taken by a member (Consistency's ``loss``)."""
        declared = {}
        for cls in type(self).__mro__:  # a subclass's hints first
            if issubclass(cls, Method) and "__init__" in vars(cls):
                declared = {**options.hints(cls.__init__), **declared}
        given = {k: v for k, v in values.items() if k != "self" and not k.startswith("__")}
        for name, value in given.items():
            if name not in declared:
                raise TypeError(f"{type(self).__name__}: option {name!r} has no type hint")
            attr = (rename or {}).get(name, name)
            member = getattr(type(self), attr, None)
            if callable(member) or isinstance(member, property):
                raise TypeError(f"{type(self).__name__}: option {name!r} would hide {attr}()")
            setattr(self, attr, options.check(f"method.{name}", value, declared[name]))
        if "embedding" in given:  # the option of the level-conditioned methods (bench.dit)
            self.t_scale, self.d_scale = EMBEDDING_SCALES[self.embedding]

    def after_step(self, nets: Nets, step: int) -> None:
        """Not part of the contract (no method needs it): a no-op the trainer still calls."""
