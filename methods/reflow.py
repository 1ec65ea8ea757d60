"""Reflow / rectified flow, two stages (Liu, Gong, Liu; "Flow Straight and Fast", ICLR 2023,
arXiv 2209.03003), as the shortcut paper runs it for its baselines.

Stage 1 trains flow matching, ``v(x_t, t) -> x1 - x0`` with independent noise and data -- or is
skipped when ``method.teacher`` names an existing flow-matching run. Between the stages the
stage-1 model (its EMA weights, or the teacher) turns ``num_pairs`` fixed noises into samples with
``gen_steps`` Euler steps, giving the coupling ``(x0, x1_hat = ODE(x0))``. Stage 2 starts from the
stage-1 weights and trains the same loss on those fixed pairs:

    v(x_t, t) -> x1_hat - x0,   x_t = (1 - t) x0 + t x1_hat,   t ~ U[0, 1)

The coupling is deterministic, so its flow is straighter and few-step Euler samples improve.
Sampling: Euler with ``N`` steps at the flow-matching level, ``N`` evaluations (CFG doubles).

With ``rounds = k > 1`` the procedure repeats: round ``j`` trains on pairs made by round ``j-1``'s
EMA weights (Liu et al.'s k-rectified flow); the steps after stage 1 are shared equally.
Pairs are written in shards to ``<run dir>/reflow_pairs/round_<stage>/`` as they are made: a job killed during
generation resumes after the last complete shard, and a resumed stage 2 reloads them. Their cost,
``num_pairs * gen_steps`` forwards (doubled with CFG), is counted in the run's budget
(``one_off_cost``), and so is the teacher's training when a teacher is used. The optimizer state and
the EMA restart at stage 2 (a new model initialised from stage 1). The final one-step distillation of
the reflow paper is not built.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from bench.data import Batch
from bench.dit import FLOW_MATCHING_LEVEL
from bench.errors import UserError
from bench.guidance import drop_labels, guided_velocity
from methods.base import Method, Nets, StageContext, interpolate
from methods.flow_matching import TIME_SAMPLERS, sample_time

SHARD = 512  # pairs per shard file


class Reflow(Method):
    stages = 2
    needs_teacher = "optional"  # stage 1 is skipped when a teacher is given

    def __init__(
        self,
        stage1_fraction: float = 0.5,
        num_pairs: int = 4096,
        gen_steps: int = 128,
        time_sampler: str = "uniform",
        label_dropout: float = 0.1,
        cfg_scale: float = 1.0,
        gen_batch_size: int = 512,
        rounds: int = 1,
    ):
        super().__init__()
        if not 0.0 < stage1_fraction < 1.0:
            raise UserError(
                f"method.stage1_fraction={stage1_fraction!r} must lie in (0, 1): the share of train.steps spent on stage 1"
            )
        if time_sampler not in TIME_SAMPLERS:
            raise UserError(
                f"method.time_sampler={time_sampler!r} is not allowed; choose one of {', '.join(TIME_SAMPLERS)}"
            )
        if num_pairs < 1 or gen_steps < 1:
            raise UserError(
                f"method.num_pairs={num_pairs} and method.gen_steps={gen_steps} must be positive"
            )
        self.stage1_fraction, self.num_pairs, self.gen_steps = stage1_fraction, num_pairs, gen_steps
        self.time_sampler, self.label_dropout, self.cfg_scale = (
            time_sampler,
            label_dropout,
            cfg_scale,
        )
        self.gen_batch_size = gen_batch_size
        if rounds < 1:
            raise UserError(
                f"method.rounds={rounds!r} must be at least 1 (reflow stages after stage 1)"
            )
        self.rounds = rounds
        self.stages = 1 + rounds  # stage 1 (flow matching), then `rounds` reflow stages
        self.teacher: nn.Module | None = None
        self.pairs: tuple[Tensor, Tensor, Tensor | None] | None = None  # not in the state dict

    def attach_teacher(self, net: nn.Module) -> None:
        self.teacher = copy.deepcopy(net).eval().requires_grad_(False)

    def stage_starts(self, total_steps: int) -> list[int]:
        first = 0 if self.teacher is not None else round(self.stage1_fraction * total_steps)
        per = (total_steps - first) / self.rounds  # the reflow rounds share the rest equally
        return [0] + [first + round(k * per) for k in range(self.rounds)]

    @staticmethod
    def folder(run_dir: Path, stage: int) -> Path:
        return Path(run_dir) / "reflow_pairs" / f"round_{stage}"

    # -- between the stages --------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, source: nn.Module, ctx: StageContext, stage: int = 1) -> None:
        """Make (or finish making) stage ``stage``'s pairs with ``source``; shards on disk are kept."""
        folder = self.folder(ctx.run_dir, stage)
        folder.mkdir(parents=True, exist_ok=True)
        data, shape = ctx.data, tuple(ctx.data.shape)
        conditional = ctx.conditional and data.num_classes > 0
        source.eval()
        world = ctx.world
        for i, start in enumerate(range(0, self.num_pairs, SHARD)):
            path = folder / f"shard_{i:05d}.pt"
            if path.exists() or i % world.size != world.rank:  # DDP: shards are dealt out by rank
                continue
            n = min(SHARD, self.num_pairs - start)
            g = torch.Generator().manual_seed(ctx.seed * 1_000_003 + 7_777 * stage + i)
            x0 = torch.randn((n, *shape), generator=g)
            y = torch.randint(data.num_classes, (n,), generator=g) if conditional else None
            x1 = torch.cat(
                [
                    self._ode(
                        source,
                        x0[j : j + self.gen_batch_size],
                        y if y is None else y[j : j + self.gen_batch_size],
                        ctx.device,
                    )
                    for j in range(0, n, self.gen_batch_size)
                ]
            )
            tmp = path.with_suffix(".tmp")
            torch.save({"x0": x0, "x1": x1, "y": y}, tmp)
            tmp.replace(path)  # a shard is whole or absent
        ctx.world_barrier()  # every process reads every shard next

    def _ode(self, net: nn.Module, x0: Tensor, y: Tensor | None, device) -> Tensor:
        x = x0.to(device)
        y = None if y is None else y.to(device)
        n, dt = x.shape[0], 1.0 / self.gen_steps
        d = torch.full((n,), FLOW_MATCHING_LEVEL, device=device)
        for i in range(self.gen_steps):
            t = torch.full((n,), i * dt, device=device)
            v = guided_velocity(net, x, t, d, y, self.cfg_scale) if y is not None else net(x, t, d)
            x = x + dt * v
        return x.float().cpu()

    def load_pairs(self, run_dir: Path, device, stage: int = 1) -> None:
        shards = sorted(self.folder(run_dir, stage).glob("shard_*.pt"))
        parts = [torch.load(p, map_location="cpu", weights_only=True) for p in shards]
        x0 = torch.cat([p["x0"] for p in parts])
        if len(x0) != self.num_pairs:
            raise UserError(
                f"{self.folder(run_dir, stage)} holds {len(x0)} pairs, expected {self.num_pairs}; delete the folder to regenerate"
            )
        y = None if parts[0]["y"] is None else torch.cat([p["y"] for p in parts]).to(device)
        self.pairs = (x0.to(device), torch.cat([p["x1"] for p in parts]).to(device), y)

    def begin_stage(self, stage: int, nets: Nets, ctx: StageContext, fresh: bool) -> None:
        if stage == 0:
            return
        # Round 1's pairs come from the teacher (or stage 1's EMA); round k's from round k-1's EMA.
        source = self.teacher if self.teacher is not None and stage == 1 else nets.ema
        if fresh:  # a new model initialised from the previous stage, trained on its pairs
            self.generate(source, ctx, stage)
            nets.online.load_state_dict(source.state_dict())
            nets.ema.load_state_dict(source.state_dict())
            ctx.reset_optimizer()
        self.load_pairs(ctx.run_dir, ctx.device, stage)

    # -- training ------------------------------------------------------------------------------
    def loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        if self.pairs is None:  # stage 1: independent coupling
            x1, y = batch.x1, batch.y
            x0 = batch.x0 if batch.x0 is not None else torch.randn_like(x1)
        else:  # stage 2: the fixed pairs, drawn i.i.d. from the (step-seeded) global RNG
            p0, p1, py = self.pairs
            idx = torch.randint(len(p0), (len(batch),), device=p0.device)
            x0, x1, y = p0[idx], p1[idx], None if py is None else py[idx]
        t = sample_time(len(x1), self.time_sampler, x1.device)
        d = torch.full_like(t, FLOW_MATCHING_LEVEL)
        y = drop_labels(y, self.label_dropout, nets.online.num_classes)
        v = nets.online(interpolate(x0, x1, t), t, d, y)
        loss = (v - (x1 - x0)).square().mean()
        return loss, {"loss/reflow" if self.pairs is not None else "loss/flow": loss.detach()}

    def one_off_cost(self) -> float:
        per_round = self.num_pairs * self.gen_steps * (2 if self.cfg_scale != 1.0 else 1)
        return float(per_round * self.rounds)
