"""Budget accounting: what a run spent, counted in network forward-equivalents.

Training: one forward of one sample is 1; a backward counts as 2 more, so a gradient step on a row
costs 3. Target, EMA and teacher forwards without gradient cost 1 per row, and so does the tangent
pass of a forward-mode JVP (MeanFlow): one extra product beside each matmul, about one forward.
Each method states its cost once, in ``Method.cost()``; ``CountingNet`` counts what a method
really calls, so tests hold the two to each other. Sampling: ``Method.nfe`` (CFG doubling
included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad

from bench.errors import UserError


@dataclass(frozen=True)
class Cost:
    """What a method spends on training, in forward-equivalents."""

    per_sample: float  # per training sample (row) of every optimizer step
    one_off: float = 0.0  # once per run, outside the steps: reflow's pair generation, ...


class CountingNet(nn.Module):
    """Wraps a network and counts evaluated rows, split by whether autograd records them, plus
    the rows whose inputs carry a forward-mode tangent (``torch.func.jvp``)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.num_classes = getattr(net, "num_classes", 0)
        self.grad_rows = 0
        self.nograd_rows = 0
        self.tangent_rows = 0

    def forward(self, x: Tensor, t: Tensor, d: Tensor, y: Tensor | None = None) -> Tensor:
        if torch.is_grad_enabled():
            self.grad_rows += x.shape[0]
        else:
            self.nograd_rows += x.shape[0]
        if any(forward_ad.unpack_dual(a).tangent is not None for a in (x, t, d)):
            self.tangent_rows += x.shape[0]
        return self.net(x, t, d, y)

    def forward_equivalents(self) -> int:
        return 3 * self.grad_rows + self.nograd_rows + self.tangent_rows


def training_budget(method, steps: int, batch_size: int) -> dict[str, float]:
    """The figures every run logs under ``budget/``."""
    samples, cost = steps * batch_size, method.cost()
    total = samples * cost.per_sample + cost.one_off  # + pair generation and the like
    return {"budget/train_samples": samples, "budget/forward_equivalents": total}


def steps_for_budget(total: float, method, batch_size: int, teacher: float = 0.0) -> int:
    """Optimizer steps that spend ``total`` forward-equivalents (``compute_budget``): what is
    left after the teacher's training and the method's one-off work (reflow's pairs), divided by
    the cost of one step (``batch_size`` rows at the method's per-sample cost)."""
    cost = method.cost()
    per_step = batch_size * cost.per_sample
    left = float(total) - teacher - cost.one_off
    steps = int(left // per_step)
    if steps < 1:
        raise UserError(
            f"compute_budget={total:g} forward-equivalents leaves {left:g} for "
            f"{type(method).__name__}'s training after its teacher ({teacher:g}) and one-off work "
            f"({cost.one_off:g}), less than one step ({per_step:g}); raise compute_budget"
        )
    return steps
