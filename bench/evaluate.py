"""Evaluation at step budgets: fixed noise, one protocol, every number with its protocol.

For each budget ``N`` the method samples ``num_samples`` images from the same fixed noise (seed
``eval.seed``; balanced labels when class-conditional) with the EMA (or online) weights, and the
evaluator reports ``nfe/steps_N`` (CFG doubling included), ``sample/img_per_s_steps_N`` and the
metrics of its data kind's suite (``bench.metrics.suites``: offline FD, KID, precision/recall, ...
for images; energy distance and MMD for points), beside the suite's real-data floor.

``run`` is the evaluation phase of a job: it evaluates only the budgets the run record does not
hold yet for this protocol, checks for a stop signal between budgets, saves each budget as soon
as it is done (a crash keeps the budgets already evaluated), writes grids and sample files, and
prints the results table. Stored results are reused under ``reuse_key()``: a hash of everything
that decides the numbers (``settings()``: the whole protocol, the metrics' version, the weights,
the sampling batch), so a changed setting of any kind is measured anew, never reported under a
protocol that did not produce it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from bench import distributed as ddp
from bench import shard
from bench.data import Dataset
from bench.grids import interpolation_grid, save_grid, save_samples
from bench.metrics.suites import Suite
from bench.preemption import Preempted, Preemption
from methods.base import Nets

if TYPE_CHECKING:  # the record imports the trainer; the evaluator needs neither at run time
    from bench.record import RunRecord

#: Bumped whenever a metric's definition changes: stored results of another version are
#: recomputed on the next run instead of being reported beside new ones.
METRICS_VERSION = 3  # 3: bootstrap intervals of FD/FID; random-cnn features z-scored


@dataclass
class BudgetResult:
    steps: int
    metrics: dict[str, float]
    samples: Tensor = field(repr=False)


class Drawn(NamedTuple):
    """One budget's samples (all of them, on rank 0), the seconds spent sampling, and the
    sample-side FID features when the suite has FID (``None`` otherwise and on other ranks)."""

    samples: Tensor | None
    seconds: float
    fid_features: np.ndarray | None


def finite(x: Tensor) -> Tensor:
    """Non-finite samples as finite extremes, so every metric can be computed (their share is
    reported as ``nonfinite_fraction``)."""
    return torch.nan_to_num(x, nan=0.0, posinf=1e3, neginf=-1e3)


def fixed_noise(
    data: Dataset, n: int, seed: int, conditional: bool
) -> tuple[Tensor, Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn((n, *data.shape), generator=g)
    y = torch.arange(n) % data.num_classes if conditional and data.num_classes else None
    return x0, y


class Evaluator:
    """Fixed noise, fixed references, one protocol for every budget of a run."""

    def __init__(
        self,
        suite: Suite,
        data: Dataset,
        num_samples: int,
        seed: int,
        batch_size: int,
        device: torch.device,
        conditional: bool,
        budgets: tuple[int, ...] = (1,),
        weights: str = "ema",
        grids: bool = True,
        save_samples: bool = False,
        interpolation: bool = False,
        world: ddp.World = ddp.SINGLE,
        featurize=None,
    ):
        self.suite, self.data, self.n, self.seed = suite, data, num_samples, seed
        self.batch_size, self.device = batch_size, device
        self.budgets, self.weights = [int(s) for s in budgets], weights
        self.grids, self.save_samples, self.interpolation = grids, save_samples, interpolation
        self.x0, self.y = fixed_noise(data, num_samples, seed, conditional)
        self.world = world  # every process samples its share of the batches (bench.shard)
        # Sample-side FID features, computed by the process that drew the samples (None: no FID)
        self.featurize = featurize

    @property
    def floor(self) -> dict[str, float]:
        return self.suite.floor

    def protocol(self) -> dict[str, str]:
        """What a reader needs beside the numbers (MLflow tags, the printed table)."""
        return {
            "eval.num_samples": str(self.n),
            "eval.noise_seed": str(self.seed),
            **self.suite.protocol(),
        }

    def settings(self) -> dict[str, str]:
        """Everything that decides the numbers: the protocol, the metrics' version, the weights,
        and the sampling batch (a sampler may draw per batch: consistency's re-noising)."""
        return {
            **self.protocol(),
            "eval.weights": str(self.weights),
            "eval.batch_size": str(self.batch_size),
            "eval.metrics_version": str(METRICS_VERSION),
        }

    def reuse_key(self) -> str:
        """The name stored results go under: equal exactly when ``settings()`` are equal."""
        blob = json.dumps(self.settings(), sort_keys=True).encode()
        return f"v{METRICS_VERSION}-{hashlib.sha256(blob).hexdigest()[:16]}"

    @torch.no_grad()
    def sample(self, method, net: nn.Module, steps: int) -> Drawn:
        """All ``num_samples`` samples at ``steps``, the wall time spent sampling, and the
        sample-side features of the suite's FID when it has one. Under DDP each process samples
        its share of the batches (``bench.shard``: batch ``j`` on rank ``j % W``, the same
        batches whatever ``W``), computes the FID features of its own batches (Inception, and
        a latent run's decoding, are the expensive part), and rank 0 gets them all, in order;
        the wall time runs from the first batch to the last gathered sample. Other ranks get
        ``None`` for both."""
        shard.wall_time_sync(self.device)
        tick = time.perf_counter()
        mine = {}
        for j in shard.my_batches(self.n, self.batch_size, self.world):
            rows = slice(j * self.batch_size, (j + 1) * self.batch_size)
            x0 = self.x0[rows].to(self.device)
            y = None if self.y is None else self.y[rows].to(self.device)
            mine[j] = method.sample(net, x0, steps, y).float().cpu()
        gathered = shard.gather_batches(mine, self.world)
        shard.wall_time_sync(self.device)
        elapsed = time.perf_counter() - tick
        samples = None if gathered is None else torch.cat(gathered)
        if self.featurize is None:
            return Drawn(samples, elapsed, None)
        # Per sampling batch, so one process and W processes featurize exactly the same images
        # in the same groups (and get the same features).
        feats = {j: self.featurize(finite(x)) for j, x in mine.items()}
        gathered_feats = shard.gather_batches(feats, self.world)
        return Drawn(
            samples, elapsed, None if gathered_feats is None else np.concatenate(gathered_feats)
        )

    def evaluate(self, method, net: nn.Module, steps: int) -> BudgetResult:
        net.eval()
        samples, elapsed, fid_features = self.sample(method, net, steps)
        key = f"steps_{steps}"
        m = {
            f"nfe/{key}": float(method.nfe(steps, self.y is not None)),
            f"sample/img_per_s_{key}": self.n / max(elapsed, 1e-9),
        }
        if not torch.isfinite(samples).all():
            m["nonfinite_fraction/" + key] = float((~torch.isfinite(samples)).float().mean())
            samples = finite(samples)
        # Only a suite with FID is handed its features: a suite's contract is metrics(x, key).
        extra = {} if fid_features is None else {"fid_features": fid_features}
        m.update(self.suite.metrics(samples, key, **extra))
        return BudgetResult(steps, m, samples)

    def run(
        self,
        method,
        nets: Nets,
        record: RunRecord,
        preemption: Preemption | None = None,
        step: int = 0,
    ) -> dict[int, dict[str, float]]:
        """The evaluation phase: every budget not yet in ``record`` under this protocol, saved one
        by one; returns the metrics of every budget. ``step``: the training step the weights are
        at (named if a stop signal ends the phase)."""
        net = nets.ema if self.weights == "ema" else nets.online
        key = self.reuse_key()
        record.tags({**self.protocol(), "eval.weights": self.weights, "eval.protocol_key": key})
        record.metrics(self.floor)
        done = record.evaluated(key)
        missing = [s for s in self.budgets if str(s) not in done]
        if len(missing) < len(self.budgets):
            print(
                f"already evaluated at {sorted(set(self.budgets) - set(missing))} steps; "
                f"evaluating {missing or 'nothing more'}",
                flush=True,
            )
        results: dict[int, dict[str, float]] = {}
        # Budgets are watched for stop signals between them (each finished one is saved).
        watching = preemption.watching() if preemption else contextlib.nullcontext()
        with watching, record.evaluating():
            for steps in self.budgets:
                if str(steps) in done:
                    # Logged again with its protocol: the tracking store's latest value of a
                    # budget may come from another protocol evaluated since.
                    results[steps] = done[str(steps)]
                    self.store(record, key, steps, done[str(steps)])
                    continue
                if preemption is not None and preemption.requested:
                    saved = f"evaluated budgets {sorted(map(int, done))} are saved"
                    shard.announce(None, self.world)  # the other ranks stop sampling too
                    raise Preempted(preemption.signal_name, step, saved)
                shard.announce(steps, self.world)  # the other ranks sample their share
                r = self.evaluate(method, net, steps)
                self.keep(r, record)
                results[steps] = done[str(steps)] = r.metrics
                self.store(record, key, steps, r.metrics)
        shard.announce(None, self.world)
        if self.interpolation:
            path = record.dir / "grids" / "interpolation.png"
            grid = interpolation_grid(
                method, net, self.data, path, seed=self.seed, device=self.device
            )
            if grid is not None:
                record.artifact(grid, "grids")
        others = self.other_protocols(record, key, results)
        # The run-level eval.* tags describe this evaluation only: say when budgets of another
        # protocol share the run (their own protocol/steps_N tags name it).
        record.tags({"eval.other_protocol_budgets": ",".join(map(str, sorted(others))) or "none"})
        print(self.table(results, others), flush=True)
        return results

    def store(self, record: RunRecord, key: str, steps: int, metrics: dict[str, float]) -> None:
        """A budget's metrics with the protocol they were measured under: the metrics, the tags
        ``protocol/steps_N`` (the settings as JSON) and ``protocol_key/steps_N``, and the run
        record's entry under ``key``."""
        settings = self.settings()
        record.metrics(metrics)
        record.tags(
            {
                f"protocol/steps_{steps}": json.dumps(settings, sort_keys=True),
                f"protocol_key/steps_{steps}": key,
            }
        )
        record.store_evaluation(key, settings, steps, metrics)

    @staticmethod
    def other_protocols(
        record: RunRecord, key: str, results: dict[int, dict[str, float]]
    ) -> dict[int, tuple[str, dict[str, str]]]:
        """Budgets this run's record holds (and its tracking run shows) under another protocol
        than ``key`` and that this evaluation did not measure: budget -> (key, settings)."""
        state = getattr(record, "state", None) or {}
        evaluated, protocols = state.get("evaluated", {}), state.get("protocols", {})
        latest = state.get("latest", {})  # budget -> the key it was last logged under
        out: dict[int, tuple[str, dict[str, str]]] = {}
        for other, budgets in evaluated.items():
            for b in budgets:
                if other == key or int(b) in results or latest.get(b, other) != other:
                    continue
                out[int(b)] = (other, protocols.get(other, {}))
        return out

    def keep(self, r: BudgetResult, record: RunRecord) -> None:
        """A budget's sample grid (an MLflow artifact) and sample file, as configured."""
        name = f"steps_{r.steps}"
        if self.grids and (
            grid := save_grid(r.samples, record.dir / "grids" / f"{name}.png", self.data.kind)
        ):
            record.artifact(grid, "grids")
        if self.save_samples:
            save_samples(r.samples, self.y, record.dir / "samples" / f"{name}.npz")

    def table(
        self,
        results: dict[int, dict[str, float]],
        others: dict[int, tuple[str, dict[str, str]]] | None = None,
    ) -> str:
        """The printed results: a row per budget (under it the suite's interval row, if any),
        then the protocol, the real-data floor, and the budgets this run holds under another
        protocol (``others``), named as such and never as rows of this table."""
        lines = [f"{'steps':>5} {'NFE':>5}  {self.suite.table_head}  samples/s"]
        for steps in sorted(results):
            m, k = results[steps], f"steps_{steps}"
            lines.append(
                f"{steps:>5} {int(m[f'nfe/{k}']):>5}  {self.suite.table_row(m, k)}"
                f"  {m[f'sample/img_per_s_{k}']:9.0f}"
            )
            if interval := self.suite.interval_row(m, k):
                lines.append(f"{'':>11}  {interval}")
        if note := self.suite.interval_note():
            lines.append(note)
        detail = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in self.protocol().items())
        floor = ", ".join(f"{k}={v:.3g}" for k, v in self.floor.items())
        text = (
            f"{chr(10).join(lines)}\nprotocol: {detail}\n"
            f"real-data floor ({self.suite.floor_label}): {floor}"
        )
        for steps, (other, settings) in sorted((others or {}).items()):
            mine = self.settings()
            differ = [
                f"{k.split('.', 1)[1]}={settings.get(k, '?')} (here {mine.get(k, '?')})"
                for k in sorted(set(mine) | set(settings))
                if settings.get(k) != mine.get(k)
            ]
            text += (
                f"\nNOT IN THIS TABLE: this run also holds steps {steps} under another protocol "
                f"(key {other}; {'; '.join(differ) or 'settings not recorded'}); "
                "those numbers are not comparable with the rows above"
            )
        return text
