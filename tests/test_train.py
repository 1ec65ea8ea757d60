"""Training loop: bitwise resume, divergence handling, checkpoint checks."""

import pytest
import torch
from hydra.utils import instantiate

from bench import checkpoint
from bench.build import build, make_method
from bench.errors import UserError
from bench.train import DivergenceError, Trainer

FAST = ["train.batch_size=16", "train.log_every=2", "train.ckpt_every=4", "train.progress=false"]


def make_trainer(cfg, run_dir):
    data, net, method, conditional = build(cfg)
    meta = {"identity": "test", "model": net.name}
    return Trainer(net, method, data, cfg.train, run_dir, torch.device("cpu"), conditional, meta)


def weights(trainer):
    return {
        **{f"net.{k}": v for k, v in trainer.net.state_dict().items()},
        **{f"ema.{k}": v for k, v in trainer.ema.state_dict().items()},
    }


@pytest.mark.parametrize("method", ["shortcut", "flow_matching"])
def test_resume_after_a_crash_gives_the_uninterrupted_weights(
    compose, tmp_path, monkeypatch, method
):
    cfg = compose(f"method={method}", "train.steps=10", *FAST)
    straight = make_trainer(cfg, tmp_path / "a")
    (tmp_path / "a").mkdir()
    straight.fit()

    (tmp_path / "b").mkdir()
    crashing = make_trainer(cfg, tmp_path / "b")

    def crash(nets, step):
        if step == 5:  # after the step-4 checkpoint, before the step-8 one
            raise KeyboardInterrupt

    monkeypatch.setattr(crashing.method, "after_step", crash)
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    monkeypatch.undo()

    resumed = make_trainer(cfg, tmp_path / "b")
    assert resumed.resume() and resumed.step == 4
    resumed.fit()
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    sa, sb = straight.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)


def test_nan_loss_stops_within_one_interval_and_keeps_the_last_good_checkpoint(
    compose, tmp_path, monkeypatch
):
    cfg = compose("train.steps=20", *FAST)
    (tmp_path / "r").mkdir()
    trainer = make_trainer(cfg, tmp_path / "r")
    real_loss = trainer.method.loss

    def loss(nets, batch, step):
        value, logs = real_loss(nets, batch, step)
        return (value * float("nan") if step >= 9 else value), logs

    monkeypatch.setattr(trainer.method, "loss", loss)
    with pytest.raises(DivergenceError) as e:
        trainer.fit()
    assert e.value.step == 10  # first logging boundary after the NaN at step index 9
    assert checkpoint.load(tmp_path / "r" / "checkpoint.pt")["step"] == 8


def test_corrupt_and_foreign_checkpoints_are_clear_errors(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, {"meta": {"model": "tiny/4", "identity": "x"}, "step": 3})
    assert checkpoint.load(path, {"model": "tiny/4"})["step"] == 3
    with pytest.raises(
        UserError, match=r"written for model='tiny/4', but this run has model='S/2'"
    ):
        checkpoint.load(path, {"model": "S/2"})
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(UserError, match="truncated or corrupt"):
        checkpoint.load(path)


def test_every_config_option_composes_and_builds(compose):
    from bench.run import group_options

    groups = group_options({"method", "size", "data", "train", "eval", "experiment"})
    for group, options in groups.items():
        assert options, f"no options found for {group}"
        for option in options:
            override = f"+experiment={option}" if group == "experiment" else f"{group}={option}"
            cfg = compose(override)
            assert cfg[group if group != "experiment" else "method"] is not None
    for option in groups["method"]:
        make_method(compose(f"method={option}"))
    for option in ("tiny", "S"):
        cfg = compose(f"size={option}")
        net = instantiate(cfg.size, input_shape=(1, 16, 16), num_classes=0)
        assert net(torch.zeros(1, 1, 16, 16), torch.zeros(1), torch.ones(1)).shape == (1, 1, 16, 16)


def test_a_methods_own_parameters_are_trained_with_the_network_and_resume_bitwise(
    compose, tmp_path, monkeypatch
):
    """``Method.trainable_parameters``: a learned loss weight (as continuous-time consistency
    models use) is optimised by the trainer's AdamW, clipped with the network, carried by the
    checkpoint, and a resumed run ends bitwise where an uninterrupted one does."""
    from methods.flow_matching import FlowMatching

    class Weighted(FlowMatching):
        def __init__(self):
            super().__init__()
            self.log_w = torch.nn.Parameter(torch.zeros(()))

        def loss(self, nets, batch, step):
            loss, logs = super().loss(nets, batch, step)
            return loss * torch.exp(-self.log_w) + self.log_w, logs

        def trainable_parameters(self):
            return [self.log_w]

    cfg = compose("method=flow_matching", "train.steps=8", "train.grad_clip=1.0", *FAST)

    def trainer(run_dir):
        data, net, _, conditional = build(cfg)
        meta = {"identity": "test", "model": net.name}
        return Trainer(
            net, Weighted(), data, cfg.train, run_dir, torch.device("cpu"), conditional, meta
        )

    (tmp_path / "a").mkdir()
    straight = trainer(tmp_path / "a")
    straight.fit()
    assert straight.method.log_w.item() != 0.0  # it was trained
    (tmp_path / "b").mkdir()
    first = trainer(tmp_path / "b")
    first.fit(stop_at=4)
    resumed = trainer(tmp_path / "b")
    assert resumed.resume() and resumed.step == 4
    assert resumed.method.log_w.item() == first.method.log_w.item()
    resumed.fit()
    assert torch.equal(straight.method.log_w, resumed.method.log_w)
    for k, v in straight.net.state_dict().items():
        assert torch.equal(v, resumed.net.state_dict()[k]), k
