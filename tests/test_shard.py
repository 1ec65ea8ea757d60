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


def counting_inception(folder: Path):
    """A stand-in for clean-fid's Inception (``clean_fid.inception``): pooled colour features of
    the [0, 255] 299x299 images, and a file per process counting the images it saw."""

    def load(inception_dir, device):
        def net(x):
            seen = folder / f"rank{os.environ.get('RANK', '0')}.count"
            before = int(seen.read_text()) if seen.exists() else 0
            seen.write_text(str(before + len(x)))
            return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1)

        return net

    return load


def _rank_fid(rank: int, port: int, overrides: list[str], out: str) -> None:
    from bench.metrics import clean_fid

    os.environ["RANK"] = str(rank)
    clean_fid.inception = counting_inception(Path(out) / "counts")
    _rank(rank, port, overrides, out)


def test_each_process_computes_the_fid_features_of_its_own_samples(tmp_path):
    """clean-fid's features are computed where the samples are (the expensive part at 50k x
    Inception, and a latent run's VAE decoding): rank 1 featurizes its batches, rank 0 gets the
    features and the FID one process gives."""
    from bench.metrics import clean_fid

    (tmp_path / "counts").mkdir()
    overrides = [
        "method=shortcut",
        *EVAL,
        "eval.fid=true",
        "eval.bootstrap=20",
        f"eval.cache_dir={tmp_path / 'stats'}",
    ]
    real = clean_fid.inception
    try:
        clean_fid.inception = counting_inception(tmp_path / "single")
        (tmp_path / "single").mkdir()
        single = evaluate_all(compose_cfg(*overrides), ddp.SINGLE)
    finally:
        clean_fid.inception = real
    mp.spawn(_rank_fid, args=(free_port(), overrides, str(tmp_path)), nprocs=2)
    sharded = torch.load(tmp_path / "sharded.pt")
    for steps, (samples, metrics) in single.items():
        assert f"fid/steps_{steps}" in metrics
        assert torch.equal(sharded[steps][0], samples)
        assert sharded[steps][1] == metrics, f"metrics differ at {steps} steps"
    # 40 samples in batches of 8: rank 0 holds batches 0, 2, 4 (24 images), rank 1 batches 1, 3
    # (16), at each of the two budgets; the reference statistics come from a cache (rank 0's
    # set-up computed them once in the single-process run above).
    counts = {p.stem: int(p.read_text()) for p in (tmp_path / "counts").glob("*.count")}
    assert counts == {"rank0": 2 * 24, "rank1": 2 * 16}
