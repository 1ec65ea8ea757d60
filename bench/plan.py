"""Know what a sweep costs before paying for it: per-job FLOPs, memory and wall-time estimates.

``python -m bench.run -m method=shortcut,reflow size=S,B,L,XL plan=true`` prints one line per job
(teachers that would be trained first get their own line, once however many jobs share them) and
a total, and trains nothing (``hydra_plugins.fewstep_bench.launchers.PlanLauncher``). Each line holds

* training FLOPs and forward-equivalents as the budget accounting counts them (``bench.budget``:
  ``steps x batch x Method.cost().per_sample + one_off``, the teacher's training included), from
  the network's own FLOP count (``DiT.gflops``, multiply-adds, x 2 for FLOPs);
* evaluation forwards: ``eval.num_samples x sum over eval.budgets of Method.nfe`` (CFG doubling
  included; sampling only, not the metrics' feature extractor);
* peak training memory: fp32 weights, gradients, AdamW's two moments, the EMA copy and a teacher
  (4 bytes x parameters each) plus activations (Korthikanti et al. 2022, "Reducing Activation
  Recomputation in Large Transformer Models": about 34 bytes per token and hidden unit per block in
  16 bits, i.e. 17 elements; SDPA stores no T x T attention matrix; gradient checkpointing keeps
  one block input per block plus one block's activations) -- an estimate, said so;
* wall time on ``planning.device``: from the newest ``bench.perf`` record of that device kind
  with this method, this network (same FLOPs per sample) and the same speed switches (the record
  and its row are named), scaled linearly by batch; otherwise peak FLOP/s x an assumed utilisation
  (said in the output). Never a silent guess;
* what already exists, by run identity (``bench.identity``): a finished run is reused (training
  costs nothing; evaluation counted in full, an upper bound: only missing budgets are evaluated).

``guard`` is the same estimate for the job about to start: on a CPU a job estimated over an hour
stops with one sentence unless ``allow_long_cpu=true``. ``slurm_request`` sizes a job's SLURM
request from its plan (the ``plan`` resolver in sweeps/hydra/launcher/slurm.yaml).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from bench.errors import UserError
from bench.identity import identity_hash, pin_precision, run_dir, short_name

CODE_ROOT = Path(__file__).resolve().parents[1]
CPU_LIMIT_S = 3600.0  # a CPU job estimated longer than this stops unless allow_long_cpu=true
#: fp32 peak of one x86 core with AVX2: 2 FMA units x 8 lanes x 2 FLOPs x ~3 GHz
CPU_GFLOPS_PER_CORE = 96.0
#: assumed share of the peak a training step reaches when no bench.perf record says otherwise
UTILISATION = {"cpu": 0.5, "cuda": 0.4}
#: dense bf16 peak TFLOP/s and memory GB of the cards the plan knows (NVIDIA data sheets)
CARDS = {"H100": (989.0, 80.0), "H200": (989.0, 141.0), "A100": (312.0, 80.0)}
ACTIVATION_ELEMENTS = 17  # per token x hidden unit x block (34 bytes in 16 bits, Korthikanti)


@dataclass(frozen=True)
class Device:
    name: str  # cpu | H100 | H200 | A100
    kind: str  # cpu | cuda (bench.perf records' device_kind)
    peak_tflops: float
    memory_gb: float | None  # per card; None on a CPU (host memory)


def device(name: str = "auto") -> Device:
    """The device the estimates are for: ``auto`` is this machine's (its card, else its CPU)."""
    name = str(name)
    if name == "auto":
        if not torch.cuda.is_available():
            name = "cpu"
        else:
            card = torch.cuda.get_device_name(0)
            name = next((k for k in CARDS if k in card), "")
            if not name:
                raise UserError(
                    f"planning.device=auto found {card!r}, whose peak the plan does not know; "
                    f"set planning.device to one of: cpu, {', '.join(CARDS)}"
                )
    if name == "cpu":
        return Device("cpu", "cpu", (os.cpu_count() or 1) * CPU_GFLOPS_PER_CORE / 1e3, None)
    if name in CARDS:
        return Device(name, "cuda", *CARDS[name])
    raise UserError(
        f"planning.device={name!r} is not known; choose one of: auto, cpu, {', '.join(CARDS)}"
    )


# -- measured throughput: bench.perf records --------------------------------------------------------
def records_folder(folder: str | Path | None) -> Path:
    """``planning.records`` as a folder (default: this checkout's benchmarks/); one sentence when
    it is not one (a file, a typo), instead of planning with assumed rates without a word."""
    root = Path(folder).expanduser() if folder else CODE_ROOT / "benchmarks"
    if folder and not root.is_dir():
        raise UserError(
            f"planning.records={str(folder)!r} is not a folder: it should hold bench.perf's "
            "<device>-<time>.json records (null: this checkout's benchmarks/)"
        )
    return root


def records(folder: str | Path | None) -> list[tuple[Path, dict]]:
    """bench.perf's ``<device>-<time>.json`` in ``folder`` (default: this checkout's benchmarks/),
    newest first."""
    root = records_folder(folder)
    out = []
    for path in root.glob("*.json"):
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(report, dict) and "protocol" in report and "train" in report:
            out.append((path, report))
    return sorted(out, key=lambda r: str(r[1]["protocol"].get("started", "")), reverse=True)


@dataclass(frozen=True)
class Rate:
    """Seconds per forward-equivalent of one sample: in a training step, and in sampling."""

    train_s: float
    forward_s: float
    source: str


def measured_rate(found, dev: Device, method: str, gflops: float, switches: dict) -> Rate | None:
    for path, report in found:
        p = report["protocol"]
        if p.get("device_kind") != dev.kind or (
            dev.kind == "cuda" and dev.name not in p.get("device_name", "")
        ):
            continue
        variants = {v["name"]: v for v in report.get("variants", [])}
        for row in report["train"]:
            v = variants.get(row.get("variant"), {})
            if (
                row.get("status") != "ok"
                or row.get("noisy")
                or row.get("method") != method
                or not math.isclose(row.get("dit_gflops_per_sample", -1), gflops, rel_tol=1e-6)
                or v.get("attention") != "sdpa"
                or any((v.get(k) or False) != (switches[k] or False) for k in switches)
            ):
                continue
            train_s = (
                row["ms_per_step"] / 1e3 / (row["batch"] * row["forward_equivalents_per_sample"])
            )
            forward_s = train_s
            sampling = [
                s for s in report.get("sampling", [])
                if s["size"] == row["size"] and s["variant"] == row["variant"] and not s.get("noisy")
            ]  # fmt: skip
            if sampling:  # the longest budget: least per-call overhead, what evaluation is made of
                s = max(sampling, key=lambda s: s["steps"])
                forward_s = s["ms_per_batch"] / 1e3 / (s["steps"] * s["batch"])
            source = (
                f"measured: {path.name}, {row['size']} {row['variant']} {method} at batch "
                f"{row['batch']}, {row['ms_per_step']:.1f} ms/step"
            )
            return Rate(train_s, forward_s, source)
    return None


def assumed_rate(dev: Device, gflops: float, utilisation: float | None) -> Rate:
    u = utilisation or UTILISATION[dev.kind]
    s = 2 * gflops * 1e9 / (dev.peak_tflops * 1e12 * u)
    what = "fp32 AVX2 peak" if dev.kind == "cpu" else "dense bf16 peak"
    return Rate(s, s, f"assumed: {dev.peak_tflops:g} TFLOP/s {what} x {u:.0%} utilisation")


def resident_bytes(x) -> int:
    """Host memory a split holds for the whole run: a tensor all of it; memory-mapped rows
    (``bench.store.Rows``, a folder or store read per batch) none -- the OS caches the pages."""
    return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0


# -- one job ---------------------------------------------------------------------------------------
@dataclass
class JobPlan:
    run: str  # the run directory's name (method-size-data-identity)
    identity: str
    role: str  # job | teacher
    method: str
    size: str
    data: str
    steps: int
    batch: int
    train_flops: float  # this run's own training, one-off work included
    forward_equivalents: float  # as the budget counts them: the teacher's training included
    eval_forwards: int
    peak_mem_gb: float
    host_mem_gb: float
    gpus: int
    train_s: float
    eval_s: float
    source: str
    status: str  # train | reuse
    device: Device
    teacher: str | None = None  # the teacher's run name
    slurm: dict = field(default_factory=dict)
    also_job: bool = False  # a teacher that is also one of the sweep's jobs (same identity)

    @property
    def wall_s(self) -> float:
        """What running it costs now: a finished teacher is loaded, not run; a finished job still
        evaluates the budgets it lacks (counted in full: an upper bound)."""
        if self.status == "reuse":
            return 0.0 if self.role == "teacher" else self.eval_s
        return self.train_s + self.eval_s


def hms(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


@lru_cache(maxsize=16)
def _dataset(node: str):
    from bench.build import make

    return make(OmegaConf.create(json.loads(node)))


def dataset(cfg: DictConfig):
    """The job's data (built once per distinct data config: the shape and labels decide the
    network)."""
    return _dataset(json.dumps(OmegaConf.to_container(cfg.data, resolve=True), sort_keys=True))


def memory_gb(
    net, batch: int, gpus: int, precision: str, checkpointing: bool, models: int
) -> float:
    """Peak training memory per device (module docstring): ``models`` fp32 copies of the weights
    (weights, gradients, two AdamW moments, EMA, teacher) plus the activations of a micro-batch."""
    params = sum(p.numel() for p in net.parameters())
    state = 4 * params * models
    elem = 2 if precision == "bf16" else 4
    micro = math.ceil(batch / gpus)
    if hasattr(net, "blocks"):  # a DiT: tokens x hidden per block
        tokens, hidden, depth = net.grid[0] * net.grid[1], net.hidden, net.depth
        block = ACTIVATION_ELEMENTS * tokens * hidden
        kept = depth * tokens * hidden + block if checkpointing else depth * block
    else:  # an MLP: a few activations of hidden units per layer
        kept = 4 * net.hidden * net.depth
    return (state + micro * kept * elem) / 1e9


def job_method(cfg: DictConfig):
    from bench.build import make_method

    method = make_method(cfg)
    if cfg.method.get("teacher"):  # a teacher's forwards are part of the per-sample cost (CD)
        method.attach_teacher(torch.nn.Identity())
    return method


def plan_job(
    cfg: DictConfig,
    dev: Device,
    found,
    planning=None,
    role: str = "job",
    data=None,
    world: int | None = None,
) -> list[JobPlan]:
    """The job of ``cfg`` (its steps as ``compute_budget`` derives them) and, first, the teacher
    it names (own line, status train or reuse). ``data``: the job's dataset when already built.

    ``world``: the processes the job will run as (a SLURM request's tasks); None sizes it, on a
    GPU, as the cards one training step needs (what the planned request asks for). A run's
    identity holds the micro-batches of a step over all processes (``bench.identity``), so the
    run named, and found finished or not, is the one of that many processes; a teacher is
    trained inside the job that needs it, so it is planned at the job's processes too."""
    from bench import teacher as teachers
    from bench.build import apply_compute_budget, network
    from bench.record import read_state

    planning = planning or {}
    node = OmegaConf.to_container(cfg, resolve=False)  # a copy: apply_compute_budget writes to it
    node.pop("hydra", None)  # the job's own keys (a launcher's node may refer back to them)
    cfg = OmegaConf.create(node)
    apply_compute_budget(cfg)
    # The run the job will find on its device (bench.identity.pin_precision), its teacher's too:
    # the job's own ``device`` when set, else the device planned for.
    own = str(cfg.get("device") or "auto")
    auto_means = "bf16" if own == "cuda" or (own == "auto" and dev.kind == "cuda") else "fp32"
    pin_precision(cfg, auto_means)
    tcfg = teachers.teacher_config(cfg, auto_means)

    method = job_method(cfg)
    data = data if data is not None else dataset(cfg)
    conditional = bool(cfg.data.get("conditional", False))
    embedding = {"d_embedding": method.d_embedding, "t_scale": float(method.t_scale)}
    with torch.device("meta"):
        net = network(cfg, data, conditional, embedding)
    gflops = float(net.gflops())
    t = cfg.train
    steps, batch = int(t.steps), int(t.batch_size)
    cost = method.cost()
    own_fe = steps * batch * cost.per_sample + cost.one_off
    nfe = sum(method.nfe(int(b), conditional) for b in cfg.eval.budgets)
    eval_forwards = int(cfg.eval.num_samples) * nfe

    # pinned above: ``auto`` left in the config means fp32 on the job's device
    precision = str(t.get("precision") or "auto").replace("auto", "fp32")
    switches = {
        "precision": precision,
        "compile": t.get("compile") or None,
        "grad_checkpoint": bool(t.get("grad_checkpoint")),
    }
    models = 5 + (1 if tcfg is not None or method.needs_teacher == "required" else 0)
    ckpt = bool(t.get("grad_checkpoint"))
    gpus = 1
    if dev.memory_gb:  # more cards (DDP) when one cannot hold the step; the batch is split
        while (
            memory_gb(net, batch, gpus, precision, ckpt, models) > 0.9 * dev.memory_gb and gpus < 8
        ):
            gpus *= 2
    if tcfg is not None and world is None and dev.kind == "cuda":
        # the job runs on as many cards as it or its teacher needs
        gpus = max(gpus, plan_job(tcfg, dev, found, planning, "teacher", data)[-1].gpus)
    if world is not None:
        gpus = int(world)
    processes = max(1, gpus) if dev.kind == "cuda" else (int(world) if world else None)
    lines = (
        plan_job(tcfg, dev, found, planning, "teacher", data, processes)
        if tcfg is not None
        else []
    )
    teacher = lines[-1] if lines else None
    fe = own_fe + (teacher.forward_equivalents if teacher else 0.0)
    peak = memory_gb(net, batch, gpus, precision, ckpt, models)
    data_gb = (
        sum(
            resident_bytes(x)
            for x in (getattr(data, "train_x", None), getattr(data, "test_x", None))
            if x is not None
        )
        / 1e9
    )
    host = (
        data_gb
        + (peak if dev.kind == "cpu" else 3 * 4 * sum(p.numel() for p in net.parameters()) / 1e9)
        + 2.0
    )

    rate = measured_rate(
        found, dev, short_name(cfg.method._target_), gflops, switches
    ) or assumed_rate(dev, gflops, planning.get("utilisation"))
    train_s = (
        steps * batch * cost.per_sample * rate.train_s + cost.one_off * rate.forward_s
    ) / gpus
    eval_s = eval_forwards * rate.forward_s  # rank 0 evaluates alone
    rd = run_dir(cfg, processes)
    status = "reuse" if read_state(rd).get("status") == "finished" else "train"
    size = str(net.name)
    lines.append(
        JobPlan(
            run=rd.name,
            identity=identity_hash(cfg, processes),
            role=role,
            method=short_name(cfg.method._target_),
            size=size,
            data=short_name(cfg.data._target_),
            steps=steps,
            batch=batch,
            train_flops=2 * gflops * 1e9 * own_fe,
            forward_equivalents=fe,
            eval_forwards=eval_forwards,
            peak_mem_gb=peak,
            host_mem_gb=host,
            gpus=gpus if dev.kind == "cuda" else 0,
            train_s=train_s,
            eval_s=eval_s,
            source=rate.source,
            status=status,
            device=dev,
            teacher=teacher.run if teacher else None,
        )
    )
    return lines


# -- SLURM requests --------------------------------------------------------------------------------
def warning_lead(signal_delay_s: float) -> float:
    """Seconds before the time limit the warning can come: ``--signal=...@N`` is sent up to 60 s
    earlier than N (SLURM handles such events once a minute; sbatch(1))."""
    return float(signal_delay_s) + 60 if signal_delay_s else 0.0


def slurm_request(lines: list[JobPlan], slurm: dict, signal_delay_s: float = 0) -> dict:
    """What to ask SLURM for the job that ``lines`` plan (its teacher first: a teacher is trained
    inside the first job that needs it, so the time covers it): GPUs (one task per GPU, DDP), a
    time limit with a margin (capped: a longer job is requeued from its checkpoint, up to
    max_num_timeout times), memory.

    The limit also holds ``signal_delay_s``, the lead of the time-limit warning (``--signal``):
    the warning is a stop request, so the work has to fit before it; a limit shorter than the
    lead would signal the job as it starts and requeue it for ever."""
    p, wall = lines[-1], sum(q.wall_s for q in lines)
    margin, extra = float(slurm.get("margin", 1.5)), float(slurm.get("extra_min", 10))
    minutes = math.ceil((wall * margin + warning_lead(signal_delay_s)) / 60 + extra)
    host = max(q.host_mem_gb for q in lines)
    return {
        "gpus_per_node": p.gpus or None,
        "tasks_per_node": max(1, p.gpus),
        "timeout_min": min(minutes, int(slurm.get("max_timeout_min", 2880))),
        "mem_gb": max(
            int(slurm.get("min_mem_gb", 4)), math.ceil(host * float(slurm.get("mem_margin", 1.5)))
        ),
    }


def planning_of(cfg: DictConfig) -> dict:
    """The job's ``planning`` group, checked (bench.schema): one sentence for a bad key."""
    from bench.schema import check_planning

    node = cfg.get("planning")
    if node is None:
        return {}
    values = OmegaConf.to_container(node, resolve=True)
    check_planning(values)
    records_folder(values.get("records"))
    return values


def resolve_request(key: str, default, _root_: DictConfig):
    """The ``plan`` resolver: ``${plan:timeout_min,240}`` in a launcher preset is this job's
    planned value, or ``default`` when the job cannot be planned here (or ``planning.slurm.size``
    is false)."""
    try:
        planning = planning_of(_root_)
        if not planning.get("slurm", {}).get("size", True):
            return default
        dev = device(planning.get("device", "auto"))
        lines = plan_job(_root_, dev, records(planning.get("records")), planning)
        lead = OmegaConf.select(_root_, "hydra.launcher.signal_delay_s", default=0) or 0
        return slurm_request(lines, planning.get("slurm", {}), lead)[key]
    except Exception:  # noqa: BLE001 -- the preset's own value, never a failed submission
        return default


if not OmegaConf.has_resolver("plan"):
    OmegaConf.register_new_resolver("plan", resolve_request)


# -- a sweep ---------------------------------------------------------------------------------------
def plan_sweep(cfgs: list[DictConfig], requests: list[dict] | None = None) -> list[JobPlan]:
    """Every job of a sweep, each run once (by identity), a teacher before the first job that
    trains it; ``requests``: each job's SLURM request, shown on its line."""
    planning = planning_of(cfgs[0])
    dev = device(planning.get("device", "auto"))
    found = records(planning.get("records"))
    seen: dict[str, JobPlan] = {}
    out = []
    for i, cfg in enumerate(cfgs):
        # a SLURM job runs as its tasks (one process each); the plan names the run they train
        world = (
            int(requests[i].get("tasks_per_node") or 1)
            * int(OmegaConf.select(cfg, "hydra.launcher.nodes", default=1) or 1)
            if requests is not None
            else None
        )
        lines = plan_job(cfg, dev, found, planning, world=world)
        if requests is not None:
            lines[-1].slurm = requests[i]
        for p in lines:
            if p.identity not in seen:
                seen[p.identity] = p
                out.append(p)
            elif p.role == "job":  # the teacher of an earlier job: one run, listed once
                seen[p.identity].also_job = True
                if requests is not None:
                    seen[p.identity].slurm = p.slurm
    return out


def render(plans: list[JobPlan], jobs: int, launcher: str, allow_long_cpu: bool) -> str:
    dev = plans[0].device
    what = f"{dev.name} ({dev.peak_tflops:g} TFLOP/s peak{f', {dev.memory_gb:g} GB' if dev.memory_gb else ''})"
    teachers = sum(p.role == "teacher" for p in plans)
    lines = [
        f"plan: {jobs} job(s) on {what}, launcher {launcher}; nothing is trained "
        f"({len(plans)} run(s) below: teachers trained first listed once, runs reused by identity)",
    ]
    for i, p in enumerate(plans, 1):
        flop = f"{p.train_flops:.3g} FLOP"
        head = f"[{i}] {p.role:7} {p.method} {p.size} {p.data} ({p.run}):"
        status = (
            "REUSE the finished run (no training; evaluation at most)"
            if p.status == "reuse"
            else "train"
            + (" first (the teacher of the jobs below that name it)" if p.role == "teacher" else "")
        ) + ("; also a job of this sweep (one run)" if p.also_job else "")
        body = (
            f"{p.steps} steps x {p.batch}, train {flop}, {p.forward_equivalents:.4g} forward-equivalents"
            f"{' (teacher included)' if p.teacher else ''}, eval {p.eval_forwards:.4g} forwards, "
            f"peak mem ~{p.peak_mem_gb:.2g} GB{f' per GPU x {p.gpus}' if p.gpus > 1 else ''}, "
            f"wall ~{hms(p.wall_s)} (train {hms(p.train_s)}, eval {hms(p.eval_s)}; {p.source}) -- {status}"
        )
        if p.teacher:
            body += f"; teacher {p.teacher}"
        if (
            dev.kind == "cpu"
            and p.status != "reuse"
            and p.wall_s > CPU_LIMIT_S
            and not allow_long_cpu
        ):
            body += "; STOPS on a CPU (over an hour) unless allow_long_cpu=true"
        if p.slurm:
            s = p.slurm
            body += (
                f"; SLURM: --gpus-per-node={s['gpus_per_node'] or 0} --ntasks-per-node={s['tasks_per_node']} "
                f"--time={s['timeout_min']} --mem={s['mem_gb']}G"
            )
        lines.append(f"{head} {body}")
    total = sum(p.wall_s for p in plans)
    unit = "GPU-hours" if dev.kind == "cuda" else "CPU-hours (one process each)"
    device_hours = sum(p.wall_s * max(1, p.gpus) for p in plans) / 3600
    lines.append(
        f"total: {device_hours:.3g} {unit}; {hms(total)} if run one after another"
        f"{f'; {teachers} teacher run(s) included' if teachers else ''}. Estimates: training and "
        "sampling only (startup, data loading and metrics not counted)."
    )
    return "\n".join(lines)


# -- a job about to start --------------------------------------------------------------------------
def guard(cfg: DictConfig, on: torch.device, data=None) -> JobPlan | None:
    """The plan of the job about to run on ``on`` (None when it cannot be planned). On a CPU a job
    (with the teacher it would train first) estimated over an hour stops unless
    ``allow_long_cpu=true``."""
    planning = planning_of(cfg)
    try:
        dev = device("cpu") if on.type == "cpu" else device(planning.get("device", "auto"))
        lines = plan_job(cfg, dev, records(planning.get("records")), planning, data=data)
    except UserError:
        if on.type == "cpu":
            raise
        return None
    wall = sum(p.wall_s for p in lines)
    if on.type == "cpu" and wall > CPU_LIMIT_S and not cfg.get("allow_long_cpu", False):
        p = lines[-1]
        raise UserError(
            f"this job ({p.method} {p.size} on {p.data}, {p.steps} steps"
            f"{' plus its teacher' if len(lines) > 1 and lines[0].status == 'train' else ''}) is "
            f"estimated at {hms(wall)} on this CPU ({p.source}), over an hour: add "
            "allow_long_cpu=true to proceed, or plan=true to see the plan"
        )
    return lines[-1]


def tags(p: JobPlan | None) -> dict[str, str]:
    """What the run records of its estimate, so reports can set it beside the measured time."""
    if p is None:
        return {}
    return {
        "plan/est_wall_s": f"{p.wall_s:.1f}",
        # The whole training and every budget, whatever this start reuses: what the run's
        # measured train_wall_s / eval_wall_s (summed over its starts) compare with.
        "plan/est_train_s": f"{p.train_s:.6g}",
        "plan/est_eval_s": f"{p.eval_s:.6g}",
        "plan/source": p.source[:250],
    }


# -- the command line ------------------------------------------------------------------------------
def argv(args: list[str]) -> list[str]:
    """``plan=true`` on the command line: the same command as a multirun through
    ``hydra_plugins.fewstep_bench.launchers.PlanLauncher`` in place of the chosen launcher (whose settings it keeps),
    with Hydra's sweep folder in a temporary directory. Hydra's sweeper then expands the jobs
    exactly as for a real launch. Any other command is returned as it is."""
    import re
    import tempfile

    if not any(re.fullmatch(r"\+{0,2}plan=(true|True|yes|1)", a) for a in args[1:]):
        return args
    multirun = any(a in ("-m", "--multirun") for a in args[1:])
    # The flag goes first: Hydra's argparse takes no flag after the overrides.
    return [
        args[0],
        *([] if multirun else ["-m"]),
        *args[1:],
        "hydra.launcher._target_=hydra_plugins.fewstep_bench.launchers.PlanLauncher",
        f"hydra.sweep.dir={tempfile.mkdtemp(prefix='fewstep-plan-')}",
    ]
