"""Budget accounting: what a run spent, counted in network forward-equivalents.

Training: one forward of one sample is 1; a backward counts as 2 more, so a gradient step on a row
costs 3. Target, EMA, teacher and JVP forwards without gradient cost 1 per row. Each method states
its per-sample cost once, in ``Method.cost()``; ``CountingNet`` counts what a method really calls,
so tests hold the two to each other. Sampling: ``Method.nfe`` (CFG doubling included).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bench.errors import UserError


class CountingNet(nn.Module):
    """Wraps a network and counts evaluated rows, split by whether autograd records them."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.num_classes = getattr(net, "num_classes", 0)
        self.grad_rows = 0
        self.nograd_rows = 0

    def forward(self, x: Tensor, t: Tensor, d: Tensor, y: Tensor | None = None) -> Tensor:
        if torch.is_grad_enabled():
            self.grad_rows += x.shape[0]
        else:
            self.nograd_rows += x.shape[0]
        return self.net(x, t, d, y)

    def forward_equivalents(self) -> int:
        return 3 * self.grad_rows + self.nograd_rows


def training_budget(method, steps: int, batch_size: int) -> dict[str, float]:
    """The figures every run logs under ``budget/``."""
    samples = steps * batch_size
    per_sample = method.cost()["forward_equivalents_per_sample"]
    total = samples * per_sample + method.one_off_cost()  # + pair generation and the like
    return {"budget/train_samples": samples, "budget/forward_equivalents": total}


def steps_for_budget(total: float, method, batch_size: int, teacher: float = 0.0) -> int:
    """Optimizer steps that spend ``total`` forward-equivalents (``compute_budget``): what is
    left after the teacher's training and the method's one-off work (reflow's pairs), divided by
    the cost of one step (``batch_size`` rows at the method's per-sample cost)."""
    per_step = batch_size * method.cost()["forward_equivalents_per_sample"]
    left = float(total) - teacher - method.one_off_cost()
    steps = int(left // per_step)
    if steps < 1:
        raise UserError(
            f"compute_budget={total:g} forward-equivalents leaves {left:g} for "
            f"{type(method).__name__}'s training after its teacher ({teacher:g}) and one-off work "
            f"({method.one_off_cost():g}), less than one step ({per_step:g}); raise compute_budget"
        )
    return steps
