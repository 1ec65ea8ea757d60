"""Sharded evaluation (bench.shard): two gloo processes sample their shares of the fixed noise and
rank 0 gets exactly the samples, and so the metrics, of one process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_distributed import compose_cfg, free_port

from bench import distributed as ddp
from bench import shard
from bench.build import build, make_evaluator

EVAL = ["eval=smoke", "eval.num_samples=40", "eval.batch_size=8", "eval.budgets=[1,4]"]


def evaluate_all(cfg, world: ddp.World) -> dict | None:
    """What Evaluator.run does for the budgets, without a run record: rank 0 announces each
    budget and evaluates it, the other ranks follow."""
    torch.manual_seed(0)
    data, net, method, conditional = build(cfg)
    ev = make_evaluator(cfg, data, torch.device("cpu"), conditional, world)
    g = torch.Generator().manual_seed(1)  # the DiT's output layer starts at zero: move it
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    net.eval()
    if not world.main:
        shard.follow(lambda steps: ev.sample(method, net, steps), world)
        return None
    out = {}
    for steps in ev.budgets:
        shard.announce(steps, world)
        r = ev.evaluate(method, net, steps)
        # float(): a bootstrap bound may be a numpy scalar, which torch.load(weights_only) refuses
        metrics = {k: float(v) for k, v in r.metrics.items() if "img_per_s" not in k}
        out[steps] = (r.samples, metrics)
    shard.announce(None, world)
    return out


def _rank(rank: int, port: int, overrides: list[str], out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    world = ddp.World(rank, rank, 2)
    ddp.init(world, torch.device("cpu"))
    try:
        result = evaluate_all(compose_cfg(*overrides), world)
        if world.main:
            torch.save(result, Path(out) / "sharded.pt")
    finally:
        ddp.shutdown()


def test_batches_are_dealt_round_robin_by_global_number():
    assert shard.my_batches(40, 8, ddp.World(0, 0, 2)) == [0, 2, 4]
    assert shard.my_batches(40, 8, ddp.World(1, 1, 2)) == [1, 3]
    assert shard.my_batches(41, 8, ddp.World(1, 1, 3)) == [1, 4]
    assert shard.my_batches(41, 8, ddp.SINGLE) == list(range(6))


@pytest.mark.parametrize("method", ["shortcut", "consistency"])
def test_two_gloo_processes_give_the_samples_and_metrics_of_one(tmp_path, method):
    """Consistency re-noises per batch (seeded by the batch's noise): batches, not rows, are
    what the processes share, so its multi-step samples match too."""
    overrides = [f"method={method}", "data.conditional=true", *EVAL]
    single = evaluate_all(compose_cfg(*overrides), ddp.SINGLE)
    mp.spawn(_rank, args=(free_port(), overrides, str(tmp_path)), nprocs=2)
    sharded = torch.load(tmp_path / "sharded.pt")
    assert sharded.keys() == single.keys() == {1, 4}
    for steps, (samples, metrics) in single.items():
        assert samples.shape == (40, 1, 16, 16)
        assert torch.equal(sharded[steps][0], samples), f"samples differ at {steps} steps"
        assert sharded[steps][1] == metrics
    assert not torch.equal(single[1][0], single[4][0])  # the budgets did differ
