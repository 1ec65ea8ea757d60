"""What ``bench.perf`` writes: ratios between its rows, the Markdown tables, RESULTS.md sections.

Ratios are taken only between rows of the same size and batch, so a row whose batch shrank
after running out of memory is never compared with one that did not. ``RESULTS.md`` holds one
section per device kind between ``<!-- bench.perf:KIND -->`` markers; a run replaces its own kind's
section and leaves the others, so a GPU section stays "not yet measured" until a GPU run fills it.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.rounds import paired_ratio

FM = "flow_matching"
BASELINE = "baseline"  # the variant the speedup column compares with
#: dense (no sparsity) bf16 tensor-core peak in TFLOP/s, NVIDIA data sheets; the first entry whose
#: key is in ``torch.cuda.get_device_name()`` wins. Any other card: MFU is not reported.
PEAK_BF16_TFLOPS = (
    ("H100 80GB HBM3", 989.0),  # H100 SXM5
    ("H100 SXM", 989.0),
    ("H100 PCIe", 756.0),
    ("H200", 989.0),
    ("A100", 312.0),
)


SWITCHES = (
    "attention",
    "precision",
    "compile",
    "compile_backend",
    "tf32",
    "grad_checkpoint",
    "deterministic",
)


# -- summary ---------------------------------------------------------------------------------------
def paired(a: dict, b: dict, key: str, invert: bool = False) -> tuple[float, float] | None:
    """Median and spread of the per-round ratios a/b of ``key`` (rounds timed together: see
    bench/rounds.py); ``invert`` gives b/a. None when the rows have no paired rounds."""
    xs, ys = a.get(key), b.get(key)
    if not xs or not ys or len(xs) != len(ys):
        return None
    s = paired_ratio(ys, xs) if invert else paired_ratio(xs, ys)
    return s.median, s.spread


def summarise(report: dict) -> None:
    """Each method against flow matching in the same size, variant and batch (FLOPs and time);
    each variant's images/s against the ``baseline`` variant's for the same size and method (the
    baseline's batch may have shrunk on out-of-memory: both batches are shown); sampling speed
    against 128 steps. Every time ratio is the median of per-round ratios (paired rounds), with
    its spread; a row or ratio whose spread exceeds ``max_spread`` is flagged ``noisy``."""
    limit = report["protocol"].get("max_spread", float("inf"))
    rows = [r for r in report["train"] if r["status"] == "ok"]
    index = {(r["size"], r["variant"], r["method"], r["batch"]): r for r in rows}
    baseline = {(r["size"], r["method"]): r for r in rows if r["variant"] == BASELINE}
    for r in rows:
        fm = index.get((r["size"], r["variant"], FM, r["batch"]))
        base = baseline.get((r["size"], r["method"]))
        r["flop_ratio_vs_fm"] = fm and r["train_tflop_per_step"] / fm["train_tflop_per_step"]
        ratio = fm and paired(r, fm, "round_ms_per_step")
        r["time_ratio_vs_fm"], r["time_ratio_spread"] = ratio or (None, None)
        # images/s ratio per round: (batch_r / t_r) / (batch_b / t_b)
        up = base and paired(r, base, "round_ms_per_step", invert=True)
        scale = base and r["batch"] / base["batch"]
        r["speedup_vs_baseline"] = up and up[0] * scale
        r["speedup_spread"] = up and up[1]
        r["baseline_batch"] = base and base["batch"]
        r["noisy"] = any(
            x is not None and x > limit
            for x in (r.get("spread"), r["time_ratio_spread"], r["speedup_spread"])
        )
    at_128 = {(s["size"], s["variant"]): s for s in report["sampling"] if s["steps"] == 128}
    for r in report["sampling"]:
        ref = at_128.get((r["size"], r["variant"]))
        speed = ref and paired(r, ref, "round_ms_per_batch", invert=True)
        r["speed_vs_128_steps"], r["speed_spread"] = speed or (None, None)
        r["noisy"] = any(x is not None and x > limit for x in (r.get("spread"), r["speed_spread"]))


def fmt(x, spec: str = ".3g", none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def spread(x, limit: float) -> str:
    """A spread (IQR / median over rounds) as a percentage, flagged when too wide to trust."""
    if x is None:
        return "n/a"
    return f"{x:.1%}" + (" TOO NOISY" if x > limit else "")


def ratio(x, s, limit: float, spec: str = ".3f") -> str:
    return "n/a" if x is None else f"{x:{spec}} ({spread(s, limit)})"


def speedup(r: dict, limit: float) -> str:
    x = r.get("speedup_vs_baseline")
    if x is None:
        return "n/a"
    same = r["baseline_batch"] == r["batch"]
    return ratio(x, r.get("speedup_spread"), limit, ".2f").replace(" (", "x (", 1) + (
        "" if same else f" (baseline at batch {r['baseline_batch']})"
    )


def markdown(report: dict) -> str:
    p = report["protocol"]
    limit = p.get("max_spread", float("inf"))
    rounds = (
        f"{p['rounds']} rounds of {p['iters']} timed steps per row"
        + (
            ", rows interleaved (A B C, A B C, ...)"
            if p.get("interleaved")
            else ", one row at a time"
        )
        if "rounds" in p
        else f"{p['iters']} timed steps"
    )
    lines = [
        f"### {p['device_name']} ({p['device_kind']}) -- {p['started']}",
        "",
        f"Protocol: torch {p['torch']}{' CUDA ' + p['cuda'] if p['cuda'] else ''}, "
        f"{p['threads']} threads ({p['cpu_count']} CPUs), input {'x'.join(map(str, p['shape']))}, "
        f"batch {p['batch']}, {p['warmup']} warm-up steps + {rounds}, recipe "
        f"train={p['train']}, num_classes={p['num_classes']}, git {p['git']}; {p['timing']}; "
        f"data: {p['data']}. Command: `{p['command']}`.",
        f"MFU: {p['mfu']}. Peak memory: {p['memory']}.",
        "",
        "Training step (loss + backward + AdamW + EMA). ms/step = median over rounds; spread = "
        "interquartile range over rounds / median. FLOP ratio = DiT.gflops x Method.cost "
        "against flow matching at the same batch; time ratio = measured, same variant and batch, "
        "the median of the per-round ratios (its spread in brackets); img/s vs baseline = this "
        "row's images/s over the `baseline` variant's (naive attention, fp32) for the same size "
        f"and method, paired the same way. TOO NOISY: spread above {limit:.0%}, do not trust.",
        "",
        "| size | variant | method | batch | ms/step | spread | img/s | TFLOP/step "
        "| FLOP ratio vs FM | time ratio vs FM | img/s vs baseline | MFU | peak mem GiB "
        "| host syncs/step | status |",
        "|" + " --- |" * 15,
    ]
    for r in report["train"]:
        lines.append(
            f"| {r['size']} | {r['variant']} | {r['method']} | {r['batch']} "
            f"| {fmt(r.get('ms_per_step'), '.1f')} | {spread(r.get('spread'), limit)} "
            f"| {fmt(r.get('img_per_s'), '.1f')} "
            f"| {fmt(r.get('train_tflop_per_step'), '.4g')} | {fmt(r.get('flop_ratio_vs_fm'), '.3f')} "
            f"| {ratio(r.get('time_ratio_vs_fm'), r.get('time_ratio_spread'), limit)} "
            f"| {speedup(r, limit)} "
            f"| {fmt(r.get('mfu'), '.1%', 'not reported')} | {fmt(r.get('peak_mem_gib'), '.2f')} "
            f"| {fmt(r.get('host_syncs_per_step'), 'd')} | {r['status']} |"
        )
    lines += ["", "Variants (switches, bench/accel.py):", ""]
    for v in report["variants"]:
        switches = ", ".join(f"{k}={'off' if v[k] is None else v[k]}" for k in SWITCHES)
        lines.append(
            f"- `{v['name']}`: {switches}; {v['warmup']} warm-up + {v['iters']} timed steps; "
            f"methods {', '.join(v['methods'])}; sampling at {v['sample_steps'] or 'none'}"
        )
    lines += [
        "",
        "Sampling (Euler, methods.base.Method.sample, one network call per step, fixed noise):",
        "",
        "| size | variant | steps | batch | ms/batch | spread | img/s | speed vs 128 steps |",
        "|" + " --- |" * 8,
    ]
    for r in report["sampling"]:
        lines.append(
            f"| {r['size']} | {r['variant']} | {r['steps']} | {r['batch']} "
            f"| {fmt(r['ms_per_batch'], '.1f')} | {spread(r.get('spread'), limit)} "
            f"| {fmt(r['img_per_s'], '.1f')} "
            f"| {ratio(r.get('speed_vs_128_steps'), r.get('speed_spread'), limit, '.1f')} |"
        )
    noisy = [r for r in report["train"] + report["sampling"] if r.get("noisy")]
    if noisy:
        names = "; ".join(
            f"{r['size']} {r['variant']} {r.get('method') or str(r['steps']) + '-step sampling'}"
            for r in noisy
        )
        lines += [
            "",
            f"Too noisy to trust (a spread above {limit:.0%}; rerun on an idle machine): {names}.",
        ]
    profiled = [r for r in report["train"] if r.get("profile")]
    for r in profiled:
        lines += [
            "",
            f"Where the time goes: {r['size']} {r['variant']} {r['method']} "
            f"(profiler, self {'device' if p['device_kind'] == 'cuda' else 'CPU'} time, 3 steps):",
            "",
            "| operator | ms/step | share |",
            "| --- | --- | --- |",
        ]
        lines += [
            f"| `{o['op']}` | {o['ms_per_step']:.2f} | {o['share']:.1%} |" for o in r["profile"]
        ]
    return "\n".join(lines) + "\n"


RESULTS_HEAD = """# Performance results (`python -m bench.perf`)

Each section holds the latest `bench.perf` run with `record=true` on that kind of device; every run
also leaves `<device>-<time>.json` and `.md` in this folder. Only measured numbers appear here,
never estimates; a section no run has filled says so.
"""
SECTIONS = {
    "cpu": (
        "CPU",
        "Not yet measured: timings taken on a shared, loaded development machine are not "
        "recorded. Command, on an idle machine: `python -m bench.perf` (the embedded default's "
        "tiny DiT, 1x16x16, batch 128; 72 s with one thread on a shared 2-core machine).",
    ),
    "cuda": (
        "GPU",
        "Not yet measured (no GPU in this session). Command: `benchmarks/gpu_check.sh` "
        "(DiT-B/2 and DiT-XL/2, 32x32x4, batch 256, flow matching and shortcut, bf16 + SDPA with "
        "and without torch.compile, the naive-attention fp32 baseline). Targets (issue #9, H100): "
        "MFU >= 40% for DiT-XL/2 training; shortcut step within 1.2x the flow-matching step.",
    ),
}


def with_sections(text: str) -> str:
    """``text`` (RESULTS.md, or its head) with an unmeasured section for every kind it lacks."""
    for k, (title, empty) in SECTIONS.items():
        if f"<!-- bench.perf:{k} -->" not in text:
            text += f"\n## {title}\n\n<!-- bench.perf:{k} -->\n{empty}\n<!-- /bench.perf:{k} -->\n"
    return text


def record(path: Path, kind: str, md: str, stem: str) -> None:
    """Replace this device kind's section of RESULTS.md (created with every section if missing)."""
    text = with_sections(path.read_text() if path.exists() else RESULTS_HEAD)
    body = f"{md}\nFiles: `{stem}.json`, `{stem}.md`.\n"
    pattern = re.compile(rf"<!-- bench.perf:{kind} -->\n.*?<!-- /bench.perf:{kind} -->", re.S)
    text = pattern.sub(
        lambda _: f"<!-- bench.perf:{kind} -->\n{body}<!-- /bench.perf:{kind} -->", text
    )
    path.write_text(text)


# -- protocol --------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in name), None)


def git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + ("+uncommitted" if dirty else "")


def protocol(device, cfg, shape, batch, sample_batch, warmup, iters) -> dict:
    """Everything a reader needs beside the numbers: machine, software, shapes, iterations."""
    cuda, name, peak = device.type == "cuda", device_name(device), peak_tflops(device)
    started = datetime.now(timezone.utc)
    slug = re.sub(r"[^a-z0-9]+", "-", (name if cuda else "cpu").lower()).strip("-")
    return {
        "device_kind": device.type,
        "device_name": name,
        "stem": f"{slug}-{started:%Y%m%d-%H%M%S}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "started": f"{started:%Y-%m-%d %H:%M} UTC",
        "git": git_commit(),
        "command": "python -m bench.perf " + " ".join(sys.argv[1:]),
        "shape": list(shape),
        "batch": batch,
        "sample_batch": sample_batch,
        "warmup": warmup,
        "iters": iters,
        "train": cfg.train,
        "num_classes": int(cfg.num_classes),
        "data": "one fixed random batch already on the device (the loader is not timed)",
        "timing": f"{'CUDA events' if cuda else 'host clock'} around the timed steps",
        "peak_bf16_tflops": peak,
        "mfu": f"model FLOPs (DiT.gflops x 2 x forward-equivalents x batch) / time / {peak} "
        "TFLOP/s dense bf16"
        if peak
        else f"not reported ({f'no bf16 peak known for {name}' if cuda else 'CPU'})",
        "memory": "torch.cuda.max_memory_allocated during the row"
        if cuda
        else "the process's peak RSS so far (not per row)",
    }
