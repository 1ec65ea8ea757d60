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
(``cost().one_off``), and so is the teacher's training when a teacher is used. The optimizer state and
the EMA restart at stage 2 (a new model initialised from stage 1). The final one-step distillation of
the reflow paper is not built.

The shortcut repository ships no reflow code (its baselines are naive flow matching, CT, CD,
progressive distillation and live reflow), so there is no official row to match beyond the
backbone conventions every baseline shares:

================  ==============================  ========================================
option            default (source)                official code
================  ==============================  ========================================
stage1_fraction   0.5 (this project)              no reflow code
num_pairs         4,096 (this project)            no reflow code
gen_steps         128 (Liu et al.: an ODE solve)  no reflow code
time_sampler      ``uniform`` (Liu et al.)        (flow matching there: ``grid128``)
label_dropout     0.1                             (flow matching there: 0.1)
cfg_scale         1.0                             (pairs: no code; sampling as flow matching)
rounds            1 (2-rectified flow)            no reflow code
embedding         ``dit``: 1000 t                 ``raw`` for every baseline DiT
                                                  (``model.py:82-88``, ``model.py:262``)
================  ==============================  ========================================
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
from torch import Tensor, nn

from bench import rng
from bench.budget import Cost
from bench.data import Batch
from bench.dit import FLOW_MATCHING_LEVEL
from bench.errors import UserError
from bench.guidance import drop_labels
from bench.options import PositiveInt, Probability, Range
from methods.base import Embedding, Method, Nets, StageContext
from methods.common import euler, interpolate, noise
from methods.flow_matching import TimeSampler, sample_time

SHARD = 512  # pairs per shard file
PAIR_STREAM = 7_777  # the RNG draws of stage s's shard i are index 7,777 s + i of the run's stream


class Reflow(Method):
    stages = 2
    needs_teacher = "optional"  # stage 1 is skipped when a teacher is given

    def __init__(
        self,
        stage1_fraction: Annotated[float, Range(0, 1, lo_open=True, hi_open=True)] = 0.5,
        num_pairs: PositiveInt = 4096,
        gen_steps: PositiveInt = 128,
        time_sampler: TimeSampler = "uniform",
        label_dropout: Probability = 0.1,
        cfg_scale: float = 1.0,
        gen_batch_size: PositiveInt = 512,
        rounds: PositiveInt = 1,  # reflow stages after stage 1
        embedding: Embedding = "dit",
    ):
        super().__init__()
        self.set_options(locals())
        self.stages = 1 + self.rounds  # stage 1 (flow matching), then `rounds` reflow stages
        self.teacher: nn.Module | None = None
        self.pairs: tuple[Tensor, Tensor, Tensor | None] | None = None  # not in the state dict

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
            g = rng.generator(rng.stream_key(ctx.seed, PAIR_STREAM * stage + i))
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
        y = None if y is None else y.to(device)
        x1 = euler(net, x0.to(device), self.gen_steps, FLOW_MATCHING_LEVEL, y, self.cfg_scale)
        return x1.float().cpu()

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
            x1, y, x0 = batch.x1, batch.y, noise(batch)
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

    def cost(self) -> Cost:
        # One fwd+bwd per row in every stage; once per run, the pairs: num_pairs x gen_steps
        # forwards per reflow round (CFG doubles them).
        per_round = self.num_pairs * self.gen_steps * (2 if self.cfg_scale != 1.0 else 1)
        return Cost(per_sample=3.0, one_off=float(per_round * self.rounds))
