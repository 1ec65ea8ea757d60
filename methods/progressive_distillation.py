"""Progressive distillation (Salimans & Ho, "Progressive Distillation for Fast Sampling of
Diffusion Models", ICLR 2022, arXiv 2202.00512), in the shortcut paper's DiT-velocity form.

A flow-matching teacher samples in ``M = 128`` Euler steps. Round ``r = 0..6`` trains a student
for ``N_r = 128 / 2^(r+1)`` steps (64, 32, ..., 1): one student step of size ``D = 1/N_r`` from a
grid time ``t = i D`` must equal two teacher steps of size ``D/2`` (no gradient):

    v1 = T(x_t, t, D/2);  x' = x_t + (D/2) v1;  v2 = T(x', t + D/2, D/2);  s(x_t, t, D) -> (v1 + v2)/2

The student starts as the teacher; after each round it becomes the next round's teacher. Round 0's
teacher is the flow-matching model at ``d = 1/128``. With ``d_conditioning=step`` the network's
``d`` input carries the round's step size, as it does for shortcut models; with ``constant`` every
call is at the flow-matching token ``1/128`` (the official networks ignore ``d``).

Budgets: each round's student serves only its own step count. At the start of round ``r`` the
round ``r-1`` student is saved to ``<run dir>/pd_round_<N>.pt``; sampling with ``N`` steps uses
that file (``N = 128``: the teacher; the last round's ``N``: the final weights). A budget whose
round has not been trained is a clear error.

Defaults: Salimans & Ho's recipe (fixed steps per round, ``train.steps / 7``; learning rate
annealed linearly to zero inside each round; a fresh optimizer state per round; no EMA). The
official code is kvfrans/shortcut-models (commit 6010043), ``baselines/targets_progressive.py``
(``TP``) and ``train.py``; every difference is an option:

==================  ============================  ================================================
option              default (source)              official code
==================  ============================  ================================================
clip                None (Salimans & Ho)          4.0: the midpoint ``x'`` only, not the target
                                                  (``TP:34``, ``TP:49``; ``TP:36`` unclipped)
bake_cfg_scale      None                          ``cfg_scale`` (1.5 on ImageNet) in round 0's
                                                  teacher when ``bootstrap_cfg=1`` (``TP:29-56``)
teacher_weights     ``online`` (Salimans & Ho)    ``ema``: the teacher is a snapshot of the train
                                                  state taken at each round start (``train.py:
                                                  309-312``) called through its EMA (``TP:28``,
                                                  ``bootstrap_ema=1``, ``train.py:64``)
d_conditioning      ``step`` (this project)       ``constant``: ``ignore_dt=True`` zeroes ``d``
                                                  (``train.py:140``, ``model.py:249-250``)
ema_rate            0.0, no EMA (Salimans & Ho)   null here = ``train.ema_rate``: the EMA runs at
                                                  0.999 through every round (``train.py:56, 265``)
lr_schedule         ``anneal`` in each round      ``constant`` (``train.py:151``)
reset_optimizer     true (a fresh state a round)  false: one optimizer state for the whole run
                                                  (``train.py:152``; the round switch at
                                                  ``train.py:312`` copies the state, not resets it)
rounds              7 equal rounds                the same (``max_steps // 7``, ``train.py:310``;
                                                  the round from the step, ``TP:10-11``)
label dropout       none                          none (``TP`` passes the labels as they are)
gradient clipping   none (``train.grad_clip``)    none (``optax.adamw`` alone, ``train.py:152``)
==================  ============================  ================================================

The official path uses ``sigma_min = 1e-5`` (``TP:27``); the golden tests map it out (data
``x1 + 1e-5 x0``), the project's path has none.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from bench.budget import Cost
from bench.data import Batch
from bench.dit import FLOW_MATCHING_LEVEL
from bench.errors import UserError
from bench.guidance import guided_velocity
from bench.options import Positive, Probability
from methods.base import MAX_STEPS, Embedding, Method, Nets, StageContext
from methods.common import interpolate, noise, two_step_average

ROUNDS = 7  # 128 -> 64 -> ... -> 1


def round_steps(r: int) -> int:
    """The student's step count in round ``r``: 64, 32, ..., 1."""
    return MAX_STEPS // 2 ** (r + 1)


class ProgressiveDistillation(Method):
    stages = ROUNDS
    needs_teacher = "required"
    ema_rate = 0.0  # no EMA (Salimans & Ho): the "EMA" net follows the online weights

    def __init__(
        self,
        clip: Positive | None = None,
        bake_cfg_scale: float | None = None,
        teacher_weights: Literal["online", "ema"] = "online",
        d_conditioning: Literal["step", "constant"] = "step",
        ema_rate: Probability | None = 0.0,  # None: train.ema_rate (the official EMA)
        lr_schedule: Literal["anneal", "constant"] = "anneal",
        reset_optimizer: bool = True,
        embedding: Embedding = "dit",
    ):
        super().__init__()
        self.set_options(locals())
        self.teacher: nn.Module | None = None  # the flow-matching model (round 0's teacher)
        self.round_teacher: nn.Module | None = None  # this round's teacher (in checkpoints)
        self.round = 0
        self.run_dir: Path | None = None
        self._students: dict[int, nn.Module] = {}

    def attach_teacher(self, net: nn.Module) -> None:
        super().attach_teacher(net)  # the flow-matching model, frozen
        self.round_teacher = copy.deepcopy(self.teacher)

    def bind(self, ctx: StageContext) -> None:
        self.run_dir = Path(ctx.run_dir)

    def stage_starts(self, total_steps: int) -> list[int]:
        if total_steps < ROUNDS:
            raise UserError(
                f"train.steps={total_steps} is too few for {ROUNDS} distillation rounds"
            )
        return [r * total_steps // ROUNDS for r in range(ROUNDS)]

    def lr_factor(self, step: int, total_steps: int) -> float:
        if self.lr_schedule == "constant":
            return 1.0
        starts = self.stage_starts(total_steps) + [total_steps]
        r = max(i for i in range(ROUNDS) if starts[i] <= step)
        return 1.0 - (step - starts[r]) / (starts[r + 1] - starts[r])

    def student_path(self, steps: int) -> Path:
        return self.run_dir / f"pd_round_{steps}.pt"

    def begin_stage(self, stage: int, nets: Nets, ctx: StageContext, fresh: bool) -> None:
        self.round = stage
        if not fresh:
            return  # the round's teacher and the student are in the checkpoint
        if stage == 0:
            self.check_teacher_embedding(nets.online)
            nets.online.load_state_dict(
                self.teacher.state_dict()
            )  # the student starts as the teacher
        elif ctx.world.main:  # the last round's student serves its own budget, teaches this one
            torch.save(nets.online.state_dict(), self.student_path(round_steps(stage - 1)))
        # Round 0: online = EMA = the flow-matching teacher. Later rounds: the official code
        # teaches from the EMA of the weights so far and keeps that EMA running.
        source = nets.ema if self.teacher_weights == "ema" and stage > 0 else nets.online
        self.round_teacher.load_state_dict(source.state_dict())
        if stage == 0 or self.ema_rate == 0.0:
            nets.ema.load_state_dict(nets.online.state_dict())
        if self.reset_optimizer:
            ctx.reset_optimizer()

    def check_teacher_embedding(self, student: nn.Module) -> None:
        """The student starts as a copy of the teacher's weights, so both must embed ``t`` and
        ``d`` alike (the scales are not weights: a mismatch would load without complaint)."""
        from bench.build import embedding_of

        if not all(hasattr(n, "t_embed") for n in (student, self.teacher)):
            return  # test stubs without embedders
        mine, theirs = embedding_of(student), embedding_of(self.teacher)
        if mine != theirs:
            raise UserError(
                f"the progressive-distillation teacher embeds t and d as {theirs} but the student "
                f"as {mine}; give the teacher the student's embedding "
                "(method.teacher.options.embedding)"
            )

    def token(self, step: float) -> float:
        """The ``d`` the networks are called with for a step of size ``step``."""
        return FLOW_MATCHING_LEVEL if self.d_conditioning == "constant" else step

    def loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        x1, y, n, x0 = batch.x1, batch.y, len(batch), noise(batch)
        steps = round_steps(self.round)
        D = 1.0 / steps
        t = torch.randint(steps, (n,), device=x1.device).float() * D
        xt = interpolate(x0, x1, t)
        half = torch.full_like(t, D / 2)
        half_token = torch.full_like(t, self.token(D / 2))
        # Official: guidance in round 0 only (its teacher is the flow-matching model).
        scale = self.bake_cfg_scale if self.round == 0 and y is not None else None

        def teacher(x, tt):
            if scale is None:
                return self.round_teacher(x, tt, half_token, y)
            return guided_velocity(self.round_teacher, x, tt, half_token, y, scale)

        with torch.no_grad():
            target = two_step_average(teacher, xt, t, half, self.clip, clip_target=False)
        v = nets.online(xt, t, torch.full_like(t, self.token(D)), y)
        loss = (v - target).square().mean()
        return loss, {"loss/distill": loss.detach()}

    def cost(self) -> Cost:
        # + two forwards of the round's teacher; baked guidance (class-conditional data only)
        # doubles them in round 0, 1/7 of the steps.
        baked = 2.0 / ROUNDS if self.bake_cfg_scale not in (None, 1.0) else 0.0
        return Cost(per_sample=3.0 + 2.0 + baked)

    def step_size(self, steps: int) -> float:
        return self.token(1.0 / steps)

    def student(self, steps: int, net: nn.Module) -> nn.Module:
        """The network that serves ``steps``: the teacher at 128, a saved round otherwise."""
        if steps == MAX_STEPS and self.teacher is not None:
            return self.teacher
        if steps not in self._students:
            path = None if self.run_dir is None else self.student_path(steps)
            if path is None or not path.exists():
                if steps == round_steps(ROUNDS - 1):
                    return net  # the last round's student is the run's own final weights
                raise UserError(
                    f"no progressive-distillation student for {steps} steps in {self.run_dir} (its round has not been trained)"
                )
            student = copy.deepcopy(net)
            student.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            self._students[steps] = student.eval()
        return self._students[steps]

    @torch.no_grad()
    def sample(self, net: nn.Module, x0: Tensor, steps: int, y: Tensor | None = None) -> Tensor:
        steps = self.check_budget(steps)
        return super().sample(self.student(steps, net), x0, steps, y)
