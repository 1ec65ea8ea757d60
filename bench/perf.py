"""``python -m bench.perf``: where a training step's and a sampler's time goes, on this device.

    python -m bench.perf                                      # CPU: the embedded default's shape
    python -m bench.perf sizes=[B,XL] '+variants.compiled={compile:default}'        # on a GPU
    benchmarks/gpu_check.sh                                   # every GPU measurement of issue #9

For every size, variant (a set of speed switches, ``bench/accel.py``) and method it times the
method's full training step on a batch already on the device: the trainer's own optimizer step
(``bench.train.Trainer.train_step``: learning rate, zero_grad, reseed, loss under autocast,
backward, gradient sync, clip, AdamW, EMA, after_step), and reports

* ms/step and images/s; the step's FLOPs from the DiT's own count (``DiT.gflops``: multiply-adds,
  x 2 for FLOPs) times the method's forward-equivalents (``Method.cost``); the FLOP ratio to flow
  matching beside the measured time ratio; MFU against the card's dense bf16 peak (known cards
  only); peak memory (CUDA: max allocated; CPU: the process's peak RSS so far); host syncs in one
  step (CUDA, ``torch.cuda.set_sync_debug_mode``);
* Euler sampling (``Method.sample``) images/s at 1, 4 and 128 steps;
* each variant's images/s against the ``baseline`` variant's (naive attention, fp32, no TF32);
* the operators that take the time in a profiled step.

Rows are timed in rounds (``bench/rounds.py``): on a CPU every row of a size is built first and the
rows take turns, A B C, A B C, ..., ``iters`` steps per turn, so a burst of load from another
process falls on every row of a round alike; a row's time is the median over rounds with its spread
(IQR / median), every ratio is the median of the per-round ratios, and a row or ratio whose spread
exceeds ``max_spread`` is flagged TOO NOISY. On CUDA (a card to itself, and too little memory to
keep every DiT-XL row resident) rows run one at a time in the same rounds (``interleave``).

Results go to ``<out>/<device>-<time>.json`` and ``.md``, rewritten after every row (an interrupted
run keeps what it measured), and with ``record`` into this device kind's section of
``<out>/RESULTS.md``. Every number is printed with its protocol; nothing is estimated.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bench import accel
from bench.build import CONFIG_DIR, make, make_method, pick_device
from bench.data import Batch
from bench.errors import EXIT_USER_ERROR, UserError
from bench.perf_report import FM, SWITCHES, fmt, markdown, protocol, record, summarise
from bench.rounds import interleave, summary
from bench.timing import free, host_syncs, peak_memory_gib, profile, timed
from bench.train import Trainer
from methods.base import Method, check_budget
from methods.flow_matching import FlowMatching

DEFAULTS = {  # device type -> values of the keys left null
    "cpu": {
        "sizes": ["tiny"],
        "shape": [1, 16, 16],
        "batch": 128,
        "warmup": 3,
        "iters": 4,
        "rounds": 7,
    },
    "cuda": {
        "sizes": ["B", "XL"],
        "shape": [4, 32, 32],
        "batch": 256,
        "warmup": 10,
        "iters": 10,
        "rounds": 3,
    },
}
VARIANT_KEYS = ("methods", "sample_steps", "warmup", "iters")
SAMPLE_EVALS = 16  # each sampling budget is repeated until it has made at least this many calls


@dataclass
class Variant:
    name: str
    attention: str
    precision: str  # resolved: fp32 | bf16
    compile: str | None
    compile_backend: str
    tf32: bool
    grad_checkpoint: bool
    deterministic: bool
    methods: list[str]
    sample_steps: list[int]
    warmup: int
    iters: int


# -- configuration ---------------------------------------------------------------------------------
def options(group: str) -> list[str]:
    names = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
    return ([FM] if FM in names else []) + [n for n in names if n != FM]


def load(group: str, name: str) -> DictConfig:
    if name not in options(group):
        raise UserError(f"unknown {group} {name!r}; choose one of: {', '.join(options(group))}")
    return OmegaConf.load(CONFIG_DIR / group / f"{name}.yaml")


def variants(cfg: DictConfig, device, methods: list[str], warmup: int, iters: int) -> list[Variant]:
    """The variants to time, each switch resolved (the variant's value, else the top-level key)."""
    out = []
    for name, spec in (cfg.variants or {}).items():
        spec = OmegaConf.to_container(spec) if spec else {}
        unknown = set(spec) - set(SWITCHES) - set(VARIANT_KEYS)
        if unknown:
            raise UserError(
                f"variants.{name} sets {', '.join(sorted(unknown))}; a variant may set "
                f"{', '.join(SWITCHES + VARIANT_KEYS)}"
            )
        get = lambda k, s=spec: s[k] if k in s else cfg[k]  # noqa: E731
        if get("attention") not in ("sdpa", "naive"):
            raise UserError(f"attention={get('attention')!r} is not allowed; choose sdpa or naive")
        if get("compile_backend") not in ("inductor", "aot_eager", "eager"):
            raise UserError(
                f"compile_backend={get('compile_backend')!r} is not allowed; choose one of "
                "inductor, aot_eager, eager"
            )
        chosen = spec.get("methods") or methods
        steps = spec.get("sample_steps", list(cfg.sample_steps))
        out.append(
            Variant(
                str(name),
                get("attention"),
                accel.resolve_precision(device, get("precision")),
                accel.compile_mode(get("compile")),
                get("compile_backend"),
                bool(get("tf32")),
                bool(get("grad_checkpoint")),
                bool(get("deterministic")),
                [m for m in methods if m in chosen],
                [check_budget(s, method="bench.perf sample_steps") for s in steps or []],
                int(spec.get("warmup", warmup)),
                int(spec.get("iters", iters)),
            )
        )
    if not out:
        raise UserError("variants is empty; keep at least one (e.g. variants.fast={})")
    return out


def train_config(cfg: DictConfig, batch: int, v: Variant) -> DictConfig:
    """The recipe's optimizer and EMA settings, with this run's batch and the variant's switches."""
    root = OmegaConf.create({"seed": cfg.seed, "train": load("train", cfg.train)})
    OmegaConf.resolve(root)
    root.train.batch_size, root.train.grad_accum = batch, 1
    for k in ("precision", "compile", "tf32", "grad_checkpoint"):
        root.train[k] = getattr(v, k)
    return root.train


def build_net(cfg: DictConfig, size: str, v: Variant, shape) -> nn.Module:
    node = load("size", size)
    if "dit" not in str(node.get("_target_", "")).lower():
        raise UserError(f"size={size} is not a DiT; bench.perf times DiT sizes (tiny, S, B, L, XL)")
    if cfg.patch:
        node.patch = cfg.patch
    try:
        net = make(
            node,
            input_shape=tuple(shape),
            num_classes=cfg.num_classes,
            naive_attention=v.attention == "naive",
            grad_checkpoint=v.grad_checkpoint,
        )
    except Exception as e:  # the DiT's own ValueError (shape vs patch), wrapped by Hydra
        cause = e.__cause__ if e.__cause__ is not None else e
        if isinstance(cause, ValueError):
            raise UserError(f"size={size}, shape={list(shape)}: {cause}") from None
        raise
    return net


def build_method(cfg: DictConfig, name: str, train: DictConfig, net: nn.Module) -> Method:
    root = OmegaConf.create({"seed": cfg.seed, "train": train, "method": load("method", name)})
    method = make_method(root)
    if method.needs_teacher == "required":  # a fresh teacher: its weights do not change the time
        method.attach_teacher(copy.deepcopy(net))
    return method


# -- measurement -----------------------------------------------------------------------------------
def random_batch(n: int, shape, num_classes: int, device: torch.device) -> Batch:
    y = torch.randint(num_classes, (n,), device=device) if num_classes else None
    return Batch(torch.randn(n, *shape, device=device), y)


def switch(device: torch.device, v: Variant) -> None:
    """The variant's process-wide switches, set before each of its blocks (rows of different
    variants take turns in a round)."""
    accel.configure(device, {"tf32": v.tf32})
    torch.use_deterministic_algorithms(v.deterministic, warn_only=True)


class TrainingRow:
    """One row, built and warmed up: the method's training step at this size, variant and batch.
    ``block(round)`` times ``iters`` steps (one round's turn), ``finish(seconds)`` makes the row."""

    def __init__(self, cfg, size, v, method_name, batch, shape, device, ctx):
        self.size, self.v, self.method_name, self.batch = size, v, method_name, batch
        self.device, self.ctx = device, ctx
        switch(device, v)
        train = train_config(cfg, batch, v)
        self.net = build_net(cfg, size, v, shape).to(device)
        self.method = build_method(cfg, method_name, train, self.net).to(device)
        accel.compile_model(self.net, v.compile, v.compile_backend)
        self.run_dir = tempfile.TemporaryDirectory()
        self.trainer = Trainer(
            net=self.net,
            method=self.method,
            data=None,
            cfg=train,
            run_dir=Path(self.run_dir.name),
            device=device,
            conditional=cfg.num_classes > 0,
            meta={},
        )
        accel.compile_model(
            self.trainer.ema.net, v.compile, v.compile_backend
        )  # deepcopy dropped it
        self.method.begin_stage(0, self.trainer.nets, self.trainer.context(), True)
        self.net.train()
        self.rows = random_batch(batch, shape, cfg.num_classes, device)
        self.shape, self.num_classes = tuple(shape), cfg.num_classes
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.total = torch.zeros((), device=device)
        for _ in range(v.warmup):
            self.run()

    def step(self, _: int = 0) -> torch.Tensor:  # the timers pass the call's index
        return self.trainer.train_step(self.rows)["loss"]

    def run(self, _: int = 0) -> None:
        self.total = self.total + self.step()

    def block(self, _round: int) -> float:
        switch(self.device, self.v)
        return timed(self.run, self.v.iters, self.device)

    def finish(self, seconds: list[float]) -> dict:
        finite = bool(torch.isfinite(self.total))  # the one read-back, after the clocks stopped
        switch(self.device, self.v)
        syncs = host_syncs(self.step, self.device)
        ops = profile(self.step, self.device) if self.ctx["profile"] else None
        fed = data_wait(
            self.trainer, self.batch, self.shape, self.num_classes, self.device, self.v.iters
        )
        fe = float(self.method.cost().per_sample)
        gflops = self.net.gflops()
        flops = 2 * gflops * 1e9 * fe * self.batch  # multiply-adds x 2
        per_round = [t / self.v.iters * 1e3 for t in seconds]
        ms = summary(per_round)
        peak = self.ctx["peak_tflops"]
        return {
            "size": self.size,
            "variant": self.v.name,
            "method": self.method_name,
            "status": "ok" if finite else "non-finite loss",
            "batch": self.batch,
            "teacher": "fresh (timing only)"
            if getattr(self.method, "teacher", None) is not None
            else None,
            "rounds": ms.n,
            "round_ms_per_step": per_round,
            "ms_per_step": ms.median,
            "spread": ms.spread,
            "img_per_s": self.batch / (ms.median / 1e3),
            "dit_gflops_per_sample": gflops,
            "forward_equivalents_per_sample": fe,
            "train_tflop_per_step": flops / 1e12,
            "achieved_tflops": flops / 1e12 / (ms.median / 1e3),
            "mfu": flops / (ms.median / 1e3) / (peak * 1e12) if peak else None,
            "peak_mem_gib": peak_memory_gib(self.device),
            "host_syncs_per_step": syncs,
            **fed,
            "profile": ops,
        }

    def close(self) -> None:
        self.run_dir.cleanup()


def data_wait(trainer: Trainer, batch: int, shape, num_classes: int, device, iters: int) -> dict:
    """The same step fed by the input pipeline (bench.loader: a memory-mapped latent store of
    ``4 x batch`` random rows, a posterior draw and a mirror per row, pinned and prefetched one
    step ahead on a GPU): ms/step and the ms a step waited for its batch. Measured once, after
    the interleaved rounds: it is the pipeline's overhead, not a timing to compare rows by."""
    from bench.data import latents
    from bench.loader import Loader
    from bench.store import synthetic_latents

    with tempfile.TemporaryDirectory() as folder:
        synthetic_latents(Path(folder), 4 * batch + 1, tuple(shape), classes=num_classes)
        trainer.data = latents(folder, test_fraction=0.0, flip=True, posterior="sample")
        trainer.loader = Loader(trainer.loader.make, device)
        trainer.train_step()  # the first batch is made on demand: not a steady-state wait
        trainer.loader.wait_s = 0.0
        ms = timed(lambda i: trainer.train_step(), iters, device) / iters * 1e3
        trainer.loader.close()
    return {"ms_per_step_fed": ms, "data_wait_ms_per_step": trainer.loader.wait_s / iters * 1e3}


def prepare_row(cfg, size, v, method, batch, shape, device, ctx) -> TrainingRow | dict:
    """A built and warmed-up ``TrainingRow``, halving the batch on CUDA out-of-memory
    (``shrink_on_oom``); a failure is the row (its status says why) and the run goes on."""
    while True:
        row = {"size": size, "variant": v.name, "method": method, "batch": batch}
        try:
            return TrainingRow(cfg, size, v, method, batch, shape, device, ctx)
        except torch.cuda.OutOfMemoryError:
            pass  # freed below, once the failed attempt's frames are unreachable
        except UserError as e:  # a method that refuses a switch (MeanFlow: checkpointing)
            return {**row, "status": f"refused: {e}"}
        except Exception as e:  # a method that cannot run here (e.g. an op without a kernel)
            return {**row, "status": error(size, v, method, e)}
        free(device)
        if not cfg.shrink_on_oom or batch == 1:
            return {**row, "status": f"out of memory at batch {batch}"}
        batch //= 2


def error(size, v, what, e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    print(f"  {size} {v.name} {what}: {type(e).__name__}: {first}", file=sys.stderr)
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "out of memory during the timed rounds"
    return f"error: {type(e).__name__}: {first}"[:200]


def measure_group(group: list[TrainingRow | dict], rounds: int, device) -> list[dict]:
    """The rows of ``group`` timed in interleaved rounds (A B C, A B C, ...), then finished."""
    ready = {i: r for i, r in enumerate(group) if isinstance(r, TrainingRow)}
    seconds, failed = interleave({i: r.block for i, r in ready.items()}, rounds)
    out = []
    for i, r in enumerate(group):
        if not isinstance(r, TrainingRow):
            out.append(r)
            continue
        if i in failed:
            row = {"size": r.size, "variant": r.v.name, "method": r.method_name}
            out.append(
                {**row, "batch": r.batch, "status": error(r.size, r.v, r.method_name, failed[i])}
            )
        else:
            try:
                out.append(r.finish(seconds[i]))
            except Exception as e:  # noqa: BLE001 -- the row says why; the others keep theirs
                row = {"size": r.size, "variant": r.v.name, "method": r.method_name}
                out.append(
                    {**row, "batch": r.batch, "status": error(r.size, r.v, r.method_name, e)}
                )
        r.close()
    return out


def measure_training(cfg, size, v, method_name, batch, shape, device, ctx) -> dict:
    """One row alone: built, warmed up, timed in ``ctx['rounds']`` rounds (default 1), finished."""
    row = prepare_row(cfg, size, v, method_name, batch, shape, device, ctx)
    return measure_group([row], int(ctx.get("rounds", 1)), device)[0]


class SamplingRows:
    """Euler sampling (``Method.sample``: one network call per step) at each of a variant's budgets,
    from fixed noise, in the variant's precision; one timer per budget."""

    def __init__(self, cfg, size, v, batch, shape, device):
        self.size, self.v, self.batch, self.device = size, v, batch, device
        switch(device, v)
        self.net = build_net(cfg, size, v, shape).to(device).eval()
        accel.compile_model(self.net, v.compile, v.compile_backend)
        self.sampler = FlowMatching()  # the base Euler sampler at the flow-matching level
        self.x0 = random_batch(batch, shape, cfg.num_classes, device)
        for _ in range(2):  # warm-up: compilation, allocator, kernel selection
            self.sample(1)

    def sample(self, steps: int) -> None:
        with accel.autocast(self.device, self.v.precision), torch.no_grad():
            self.sampler.sample(self.net, self.x0.x1, steps, self.x0.y)

    @staticmethod
    def repeats(steps: int) -> int:
        return max(1, -(-SAMPLE_EVALS // steps))

    def timers(self) -> dict:
        def block(steps: int):
            def run(_round: int) -> float:
                switch(self.device, self.v)
                return timed(lambda i: self.sample(steps), self.repeats(steps), self.device)

            return run

        return {(self.size, self.v.name, s): block(s) for s in self.v.sample_steps}

    def finish(self, steps: int, seconds: list[float]) -> dict:
        per_round = [t / self.repeats(steps) * 1e3 for t in seconds]
        ms = summary(per_round)
        return {
            "size": self.size,
            "variant": self.v.name,
            "steps": steps,
            "batch": self.batch,
            "repeats": self.repeats(steps),
            "rounds": ms.n,
            "round_ms_per_batch": per_round,
            "ms_per_batch": ms.median,
            "spread": ms.spread,
            "img_per_s": self.batch / (ms.median / 1e3),
        }


def measure_sampling(cfg, size, vs, batch, shape, device, rounds, interleaved) -> list[dict]:
    """Every sampling budget of every variant at this size; interleaved: all in the same rounds."""
    groups = [vs] if interleaved else [[v] for v in vs]
    out = []
    for group in groups:
        samplers, timers = [], {}
        for v in group:
            if not v.sample_steps:
                continue
            try:
                s = SamplingRows(cfg, size, v, batch, shape, device)
            except torch.cuda.OutOfMemoryError:
                print(f"  {size} {v.name}: sampling ran out of memory", flush=True)
                continue
            samplers.append(s)
            timers.update(s.timers())
        seconds, failed = interleave(timers, rounds)
        for key in failed:
            print(f"  {key[0]} {key[1]} {key[2]} steps: sampling failed: {failed[key]}", flush=True)
        for s in samplers:
            for steps in s.v.sample_steps:
                key = (s.size, s.v.name, steps)
                if key not in failed:
                    out.append(s.finish(steps, seconds[key]))
        del samplers, timers
        free(device)
    return out


# -- the run ---------------------------------------------------------------------------------------
def run(cfg: DictConfig) -> dict:
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    d = DEFAULTS[device.type]
    val = lambda k: d[k] if cfg.get(k) is None else cfg[k]  # noqa: E731
    sizes, shape, batch = list(val("sizes")), list(val("shape")), int(val("batch"))
    warmup, iters, rounds = int(val("warmup")), int(val("iters")), int(val("rounds"))
    if iters < 1 or warmup < 0 or batch < 1 or rounds < 1:
        raise UserError(
            f"iters={iters}, warmup={warmup}, batch={batch}, rounds={rounds}: "
            "need >= 1, >= 0, >= 1, >= 1"
        )
    if cfg.interleave not in ("auto", True, False):
        raise UserError(f"interleave={cfg.interleave!r} is not allowed; choose auto, true or false")
    interleaved = device.type == "cpu" if cfg.interleave == "auto" else bool(cfg.interleave)
    max_spread = float(cfg.max_spread)
    methods = list(cfg.methods) if cfg.methods else options("method")
    for name in methods + list(cfg.profile or []):
        load("method", name)
    vs = variants(cfg, device, methods, warmup, iters)
    for size in sizes:  # bad sizes and shapes fail here, before anything is timed
        with torch.device("meta"):
            build_net(cfg, size, vs[0], shape)
    if any(v.iters < 1 or v.warmup < 0 for v in vs):
        raise UserError("every variant needs iters >= 1 and warmup >= 0")
    sample_batch = int(cfg.sample_batch or batch)
    out = Path(cfg.out)
    report = {
        "protocol": protocol(device, cfg, shape, batch, sample_batch, warmup, iters)
        | {"rounds": rounds, "interleaved": interleaved, "max_spread": max_spread},
        "variants": [asdict(v) for v in vs],
        "train": [],
        "sampling": [],
    }
    name, peak, stem = (
        report["protocol"]["device_name"],
        report["protocol"]["peak_bf16_tflops"],
        report["protocol"]["stem"],
    )

    def save() -> None:
        summarise(report)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
        md = markdown(report)
        (out / f"{stem}.md").write_text(md)
        if cfg.record:
            record(out / "RESULTS.md", device.type, md, stem)

    print(f"bench.perf on {name}: results in {out / stem}.json / .md", flush=True)
    print(
        f"  {rounds} rounds{', interleaved (A B C, A B C, ...)' if interleaved else ''}",
        flush=True,
    )
    for size in sizes:
        specs = [(vi, v, m) for vi, v in enumerate(vs) for m in v.methods]
        groups = [specs] if interleaved else [[s] for s in specs]
        for group in groups:
            prepared = []
            for vi, v, m in group:
                ctx = {"warmup": v.warmup, "iters": v.iters, "peak_tflops": peak}
                ctx["profile"] = vi == 0 and m in list(cfg.profile or [])
                prepared.append(prepare_row(cfg, size, v, m, batch, shape, device, ctx))
            rows = measure_group(prepared, rounds, device)
            del prepared
            free(device)
            for row in rows:
                report["train"].append(row)
                print(
                    f"  {size:>5} {row['variant']:>10} {row['method']:>26}: batch {row['batch']}, "
                    f"{fmt(row.get('ms_per_step'), '.1f')} ms/step "
                    f"(spread {fmt(row.get('spread'), '.1%')}), {row['status']}",
                    flush=True,
                )
            save()
        report["sampling"] += measure_sampling(
            cfg, size, vs, sample_batch, shape, device, rounds, interleaved
        )
        save()
    torch.use_deterministic_algorithms(False)
    save()
    print(markdown(report), flush=True)
    return report


@hydra.main(config_path=".", config_name="perf", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
