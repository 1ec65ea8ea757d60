"""Evaluation during training: ``eval.every=N`` evaluates chosen budgets every N training steps.

At every step that is a multiple of ``eval.every`` (and not the last one, which the final
evaluation covers) the weights the final evaluation uses (``eval.weights``) are evaluated at
``eval.every_budgets`` from ``eval.every_num_samples`` samples of the same fixed noise seed, with
the same metric suite at that sample count. Each value is logged to MLflow as
``curve/<metric>/steps_<N>`` at the training step (MLflow's metric history is the curve: metric vs
step, one per budget) and kept in ``curves.json`` in the run directory with its protocol, so a
resumed run skips the steps it has already evaluated and the report can draw the curves. These
are progress curves at a small sample count; the numbers the report tables use are the final
evaluation's, at ``eval.num_samples``. Under DDP every process samples its share (bench.shard).
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from bench import distributed as ddp
from bench import shard

CURVES = "curves.json"


def curve_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` with the evaluation cut down to the curves' budgets and sample count."""
    small = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    e = small.eval
    n = int(e.get("every_num_samples") or e.num_samples)
    with open_dict(small):
        e.budgets = list(e.get("every_budgets") or e.budgets)
        e.num_samples = n
        e.batch_size = min(int(e.batch_size), n)
        e.grids = e.save_samples = e.interpolation = False
    return small


class Curves:
    """The ``Trainer`` hook (``Trainer.hooks``) that evaluates every ``every`` steps."""

    def __init__(self, cfg: DictConfig, parts, run_dir: Path, tracker, world: ddp.World):
        from bench.build import make_evaluator

        self.every, self.end = int(cfg.eval.every), int(cfg.train.steps)
        small = curve_config(cfg)
        self.evaluator = make_evaluator(small, parts.data, parts.device, parts.conditional, world)
        self.method, self.tracker, self.world = parts.method, tracker, world
        self.path = Path(run_dir) / CURVES
        self.key = self.evaluator.reuse_key() if world.main else ""
        self.curves = self.load() if world.main else {}

    def load(self) -> dict:
        """Steps already evaluated under this protocol (a changed protocol starts a new curve)."""
        if not self.path.is_file():
            return {}
        stored = json.loads(self.path.read_text())
        return stored.get(self.key, {}).get("steps", {})

    def save(self) -> None:
        stored = json.loads(self.path.read_text()) if self.path.is_file() else {}
        stored[self.key] = {"settings": self.evaluator.settings(), "steps": self.curves}
        tmp = self.path.with_name(self.path.name + ".part")
        tmp.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
        tmp.replace(self.path)

    def __call__(self, step: int, nets) -> None:
        if step % self.every or step >= self.end:
            return
        net = nets.ema if self.evaluator.weights == "ema" else nets.online
        was_training = net.training
        try:
            if not self.world.main:
                shard.follow(
                    lambda steps: self.evaluator.sample(self.method, net, steps), self.world
                )
                return
            if str(step) in self.curves:  # a resumed run: evaluated before the interruption
                shard.announce(None, self.world)
                return
            values = {}
            for steps in self.evaluator.budgets:
                shard.announce(steps, self.world)
                values.update(self.evaluator.evaluate(self.method, net, steps).metrics)
            shard.announce(None, self.world)
            self.curves[str(step)] = values
            self.save()
            if self.tracker is not None:
                self.tracker.log_metrics({f"curve/{k}": v for k, v in values.items()}, step=step)
        finally:
            net.train(was_training)
