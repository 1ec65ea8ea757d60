"""The fast path (bench/accel.py, DiT checkpointing) and the benchmark (python -m bench.perf).

No test asserts a timing: timings depend on the machine. They check what is written, that the
switches keep the numbers they must keep, and hand-computed FLOP ratios. The ``gpu`` tests need
CUDA (benchmarks/gpu_check.sh runs them on a GPU machine) and skip, saying so, elsewhere.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import accel
from bench.dit import DiT
from bench.errors import UserError
from bench.mlp import VelocityMLP

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device (benchmarks/gpu_check.sh runs these on a GPU machine)",
)
#: a perf run that takes seconds: the tiny DiT on 8x8 inputs, one timed step per row
TINY = [
    "device=cpu",
    "sizes=[tiny]",
    "shape=[1,8,8]",
    "batch=8",
    "warmup=1",
    "iters=1",
    "rounds=2",
    "sample_steps=[1,4]",
    "profile=[flow_matching]",
]


def perf_config(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "bench"), version_base="1.3"):
        return compose(config_name="perf", overrides=list(overrides))


def opened(**kw) -> DiT:
    """A small DiT whose residual branches and output are open (adaLN-Zero starts them at 0)."""
    torch.manual_seed(0)
    net = DiT((1, 8, 8), hidden=32, depth=3, heads=2, patch=2, **kw)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return net


def inputs(n: int = 4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g), torch.rand(n, generator=g), torch.rand(n)


# -- the switches ------------------------------------------------------------------------------
def test_grad_checkpointing_gives_identical_outputs_and_gradients():
    plain, ckpt = opened(), opened(grad_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, d = inputs()
    outs, grads = [], []
    for net in (plain, ckpt):
        v = net(x, t, d)
        v.square().mean().backward()
        outs.append(v.detach())
        grads.append([p.grad for p in net.parameters()])
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():  # no recomputation without a backward: the plain path
        assert torch.equal(ckpt(x, t, d), outs[0])


def test_autocast_auto_is_fp32_on_cpu_and_bf16_when_asked():
    cpu = torch.device("cpu")
    assert accel.resolve_precision(cpu, "auto") == "fp32"
    a = torch.randn(4, 4)
    with accel.autocast(cpu, "auto"):
        assert not torch.is_autocast_enabled("cpu")
        assert (a @ a).dtype == torch.float32
    with accel.autocast(cpu, "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    lin = torch.nn.Linear(4, 4)
    with accel.autocast(cpu, "bf16"):
        lin(a).float().sum().backward()
    assert lin.weight.dtype == lin.weight.grad.dtype == torch.float32  # fp32 master weights
    with pytest.raises(UserError, match="fp16"):
        accel.resolve_precision(cpu, "fp16")


def test_configure_sets_tf32_through_the_switches_compile_reads():
    cuda = torch.device("cuda")  # only flags are set: no CUDA device needed
    try:
        accel.configure(cuda, {"tf32": False})
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        accel.configure(cuda, None)  # default: on
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = True  # torch's defaults


def test_compile_model_is_in_place_per_block_and_numerically_the_same():
    net = opened()
    keys = list(net.state_dict())
    x, t, d = inputs()
    eager = net(x, t, d)
    assert accel.compile_model(net, False) is net and net.blocks[0]._compiled_call_impl is None
    accel.compile_model(net, "default", backend="eager")  # traces; no code generation
    assert all(b._compiled_call_impl is not None for b in net.blocks)
    assert list(net.state_dict()) == keys  # checkpoints unchanged
    torch.testing.assert_close(net(x, t, d), eager)
    assert copy.deepcopy(net).blocks[0]._compiled_call_impl is None  # the EMA copy needs its own
    with pytest.raises(UserError, match="compile="):
        accel.compile_mode("fastest")


def test_train_configs_carry_the_switches_and_build_applies_them(compose):
    from bench.build import build

    for recipe in ("cpu", "paper"):
        t = compose(f"train={recipe}").train
        assert (t.precision, t.compile, t.grad_checkpoint, t.tf32) == ("auto", False, False, True)
    _, net, _, _ = build(compose("train.grad_checkpoint=true"))
    assert net.grad_checkpoint is True
    with pytest.raises(UserError, match="grad_checkpoint"):
        accel.prepare_model(VelocityMLP((2,)), {"grad_checkpoint": True})


# -- rounds: the statistics on a noisy machine, with a fake clock ----------------------------------
class FakeClock:
    """Each row's block costs a fixed time, times ``burst`` while the fake time is in ``window``:
    a burst of load from another process, in wall-clock time, as on a shared machine."""

    def __init__(self, costs: dict, window=(None, None), burst=10.0):
        self.now, self.costs, self.window, self.burst = 0.0, costs, window, burst
        self.calls: list[str] = []

    def timer(self, name):
        def block(_round: int) -> float:
            lo, hi = self.window
            slow = lo is not None and lo <= self.now < hi
            took = self.costs[name] * (self.burst if slow else 1.0)
            self.now += took
            self.calls.append(name)
            return took

        return block

    def timers(self):
        return {name: self.timer(name) for name in self.costs}


def test_rounds_interleave_rows_a_b_c_a_b_c():
    from bench.rounds import interleave

    clock = FakeClock({"A": 1.0, "B": 2.0, "C": 3.0})
    seconds, failed = interleave(clock.timers(), 3)
    assert clock.calls == ["A", "B", "C"] * 3 and not failed
    assert seconds == {"A": [1.0] * 3, "B": [2.0] * 3, "C": [3.0] * 3}


def test_a_burst_in_one_round_moves_neither_the_median_nor_the_paired_ratio():
    from bench.rounds import interleave, paired_ratio, summary

    # fm 1 s and shortcut 1.17 s per block; a 10x burst from t = 4.34 (round 2 starts) covers both
    # rows of round 2 (slowed, it ends at 4.34 + 10 + 11.7) and nothing after
    clock = FakeClock({"fm": 1.0, "sc": 1.17}, window=(2 * 2.17, 2 * 2.17 + 10.5))
    seconds, _ = interleave(clock.timers(), 5)
    assert seconds["fm"][2] == 10.0 and seconds["sc"][2] == pytest.approx(11.7)  # the burst hit
    assert summary(seconds["fm"]).median == 1.0
    assert paired_ratio(seconds["sc"], seconds["fm"]).median == pytest.approx(1.17)
    # a burst that lands on one row of one round only (sc in round 1): the mean of the per-row
    # times would move the ratio to (4 x 1.17 + 11.7) / 5 = 3.28; the median of the pairs does not
    clock = FakeClock({"fm": 1.0, "sc": 1.17}, window=(3.17, 3.18))
    seconds, _ = interleave(clock.timers(), 5)
    assert seconds["sc"][1] == pytest.approx(11.7) and seconds["fm"][1] == 1.0
    r = paired_ratio(seconds["sc"], seconds["fm"])
    assert r.median == pytest.approx(1.17) and r.spread == 0.0


def test_a_row_whose_rounds_spread_widely_is_flagged_and_a_steady_one_is_not():
    from bench.rounds import quantile, summary

    steady, wide = summary([1.0, 1.01, 0.99, 1.0, 1.02]), summary([1.0, 1.5, 0.7, 1.3, 0.9])
    assert not steady.noisy(0.1) and wide.noisy(0.1)
    assert wide.median == 1.0 and wide.spread == pytest.approx(1.3 - 0.9)  # IQR / median
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.25) == 1.75  # numpy's 'linear' quantile
    assert summary([2.0]).spread == 0.0


def test_a_failing_row_is_dropped_from_later_rounds_and_the_others_keep_theirs():
    from bench.rounds import interleave

    def broken(r):
        if r == 1:
            raise RuntimeError("out of memory")
        return 1.0

    seconds, failed = interleave({"A": lambda r: 2.0, "B": broken}, 3)
    assert seconds == {"A": [2.0, 2.0, 2.0], "B": [1.0]} and "out of memory" in str(failed["B"])


def fake_report(fm, sc, base_fm, sampling=None) -> dict:
    from bench.rounds import summary

    row = lambda v, m, ms: {  # noqa: E731
        "size": "tiny", "variant": v, "method": m, "batch": 8, "status": "ok",
        "round_ms_per_step": ms, "ms_per_step": sorted(ms)[len(ms) // 2],
        "spread": summary(ms).spread,
        "train_tflop_per_step": {"flow_matching": 3.0, "shortcut": 3.5}[m],
        "img_per_s": 8 / sorted(ms)[len(ms) // 2] * 1e3,
    }  # fmt: skip
    return {
        "protocol": {"max_spread": 0.1},
        "train": [row("fast", "flow_matching", fm), row("fast", "shortcut", sc),
                  row("baseline", "flow_matching", base_fm)],
        "sampling": sampling or [],
    }  # fmt: skip


def test_summarise_takes_ratios_from_paired_rounds_and_flags_noisy_rows():
    from bench.perf_report import summarise

    fm = [100.0, 100.0, 1000.0, 100.0, 100.0]  # a burst in round 2 on both rows ...
    sc = [128.0, 128.0, 1280.0, 128.0, 128.0]
    base = [200.0, 260.0, 150.0, 210.0, 300.0]  # ... and a baseline all over the place
    report = fake_report(fm, sc, base)
    summarise(report)
    f, s, b = report["train"]
    assert s["time_ratio_vs_fm"] == pytest.approx(1.28) and s["time_ratio_spread"] == 0.0
    assert s["flop_ratio_vs_fm"] == pytest.approx(3.5 / 3)
    assert f["speedup_vs_baseline"] == pytest.approx(2.1)  # median of 2, 2.6, 0.15, 2.1, 3
    assert b["noisy"] and f["noisy"]  # the baseline spreads, so does the ratio against it
    assert not s["noisy"]


def test_markdown_marks_a_noisy_row_too_noisy(tmp_path):
    from bench.perf_report import markdown, summarise

    report = fake_report([100.0] * 5, [128.0] * 5, [200.0, 260.0, 150.0, 210.0, 300.0])
    report["protocol"] |= {
        "device_name": "test", "device_kind": "cpu", "started": "now", "torch": "x", "cuda": None,
        "threads": 1, "cpu_count": 2, "shape": [1, 8, 8], "batch": 8, "warmup": 1, "iters": 2,
        "rounds": 5, "interleaved": True, "train": "paper", "num_classes": 0, "git": "x",
        "timing": "host clock", "data": "random", "command": "c", "mfu": "n/a", "memory": "rss",
    }  # fmt: skip
    report["variants"] = []
    summarise(report)
    md = markdown(report)
    base_line = next(ln for ln in md.splitlines() if "| baseline | flow_matching |" in ln)
    sc_line = next(ln for ln in md.splitlines() if "| fast | shortcut |" in ln)
    assert "TOO NOISY" in base_line and "TOO NOISY" not in sc_line
    assert "| 1.280 (0.0%) |" in sc_line
    assert "Too noisy to trust" in md and "tiny baseline flow_matching" in md
    assert "5 rounds of 2 timed steps per row, rows interleaved" in md


# -- the benchmark -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict, Path]:
    """One in-process run at the tiny size with every method and the baseline."""
    from bench.perf import run

    out = tmp_path_factory.mktemp("perf")
    torch.manual_seed(0)
    return run(perf_config(*TINY, f"out={out}")), out


def test_every_method_runs_and_the_report_has_its_keys(report):
    from bench.perf import options

    r, out = report
    rows = {(row["variant"], row["method"]): row for row in r["train"]}
    assert {m for v, m in rows if v == "fast"} == set(options("method"))
    assert {m for v, m in rows if v == "baseline"} == {"flow_matching", "shortcut"}
    for row in r["train"]:
        assert row["status"] == "ok", row
        assert row["ms_per_step"] > 0 and row["img_per_s"] > 0
        assert row["mfu"] is None and row["host_syncs_per_step"] is None  # CPU: not reported
    pd = rows[("fast", "progressive_distillation")]
    assert pd["teacher"] == "fresh (timing only)"
    assert rows[("fast", "flow_matching")]["profile"][0]["ms_per_step"] > 0
    fast, base = rows[("fast", "shortcut")], rows[("baseline", "shortcut")]
    assert len(fast["round_ms_per_step"]) == len(base["round_ms_per_step"]) == 2  # rounds=2
    pairs = zip(fast["round_ms_per_step"], base["round_ms_per_step"], strict=True)
    per_round = [b / f for f, b in pairs]
    assert fast["speedup_vs_baseline"] == pytest.approx(sum(per_round) / 2)  # paired: the median
    assert [s["steps"] for s in r["sampling"] if s["variant"] == "fast"] == [1, 4]
    (json_file,) = out.glob("cpu-*.json")
    assert json.loads(json_file.read_text())["protocol"]["batch"] == 8
    for key in ("device_name", "torch", "threads", "shape", "warmup", "iters", "git"):
        assert key in r["protocol"]


def test_flop_ratio_of_shortcut_to_flow_matching_is_the_hand_count(report):
    # k_ratio = 1/4: every row one fwd+bwd (3), a quarter of rows two no-grad forwards (2 x 1/4).
    rows = {(row["variant"], row["method"]): row for row in report[0]["train"]}
    assert rows[("fast", "shortcut")]["flop_ratio_vs_fm"] == pytest.approx((3 + 2 / 4) / 3)
    fm = rows[("fast", "flow_matching")]
    assert fm["flop_ratio_vs_fm"] == 1.0
    # the step's FLOPs: DiT multiply-adds x 2 x 3 forward-equivalents x batch
    net = DiT((1, 8, 8), hidden=128, depth=4, heads=4, patch=4)
    assert fm["train_tflop_per_step"] == pytest.approx(2 * net.gflops() * 1e9 * 3 * 8 / 1e12)


def test_results_md_gets_this_run_and_keeps_the_gpu_section_unmeasured(report):
    r, out = report
    text = (out / "RESULTS.md").read_text()
    cpu = text.split("<!-- bench.perf:cpu -->")[1].split("<!-- /bench.perf:cpu -->")[0]
    gpu = text.split("<!-- bench.perf:cuda -->")[1].split("<!-- /bench.perf:cuda -->")[0]
    assert "| tiny | fast | shortcut | 8 |" in cpu and r["protocol"]["stem"] in cpu
    assert "Protocol: torch" in cpu and "img/s vs baseline" in cpu
    assert "not yet measured" in gpu.lower()


@pytest.mark.slow
def test_the_cli_runs_and_bad_input_is_one_sentence(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "bench.perf", *TINY, f"out={tmp_path}"]
    fast = ["methods=[flow_matching]", "~variants.baseline", "profile=[]", "record=false"]
    done = subprocess.run(cmd + fast, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "| tiny | fast | flow_matching | 8 |" in done.stdout
    assert len(list(tmp_path.glob("cpu-*.md"))) == 1 and not (tmp_path / "RESULTS.md").exists()
    bad = subprocess.run(cmd + ["methods=[nope]"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: unknown method 'nope'; choose one of: flow_matching")


@pytest.mark.slow
def test_gpu_check_script_dry_run_on_cpu(tmp_path):
    """SMOKE=1: the GPU script's exact invocation, shrunk, on the CPU; writes only under $OUT."""
    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (result,) = (tmp_path / "benchmarks").glob("cpu-*.json")
    rows = json.loads(result.read_text())["train"]
    got = {(r["variant"], r["method"]) for r in rows if r["status"] == "ok"}
    assert got == {
        ("fast", "flow_matching"),
        ("fast", "shortcut"),
        ("baseline", "flow_matching"),
        ("baseline", "shortcut"),
        ("compiled", "flow_matching"),
        ("compiled", "shortcut"),
        ("checkpointed", "flow_matching"),
        ("deterministic", "flow_matching"),
    }


# -- on a GPU ----------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_cuda
def test_gpu_bf16_autocast_keeps_fp32_master_weights_and_matches_fp32():
    cuda = torch.device("cuda")
    accel.configure(cuda, {"tf32": False})
    assert accel.resolve_precision(cuda, "auto") == "bf16"
    net = opened().to(cuda)
    x, t, d = (a.to(cuda) for a in inputs(8))
    ref = net(x, t, d)
    with accel.autocast(cuda, "auto"):
        v = net(x, t, d)
    v.float().square().mean().backward()
    assert v.dtype == torch.bfloat16
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in net.parameters())
    torch.testing.assert_close(v.float(), ref, rtol=0.05, atol=0.05)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method", ["flow_matching", "shortcut", "consistency"])
def test_gpu_training_step_has_no_host_sync(method):
    from bench.perf import measure_training, variants

    cfg = perf_config("device=cuda", "shape=[4,16,16]", "batch=16", f"methods=[{method}]")
    cuda = torch.device("cuda")
    (v, *_) = variants(cfg, cuda, [method], 1, 2)
    ctx = {"warmup": 1, "iters": 2, "peak_tflops": None, "profile": False}
    row = measure_training(cfg, "S", v, method, 16, [4, 16, 16], cuda, ctx)
    assert row["status"] == "ok" and row["host_syncs_per_step"] == 0


@pytest.mark.gpu
@needs_cuda
def test_gpu_compiled_and_checkpointed_dit_match_eager():
    cuda = torch.device("cuda")
    net = opened().to(cuda)
    x, t, d = (a.to(cuda) for a in inputs(8))
    with accel.autocast(cuda, "bf16"):
        eager = net(x, t, d).float()
        ckpt = copy.deepcopy(net)
        ckpt.grad_checkpoint = True
        torch.testing.assert_close(ckpt(x, t, d).float(), eager)
        compiled = accel.compile_model(copy.deepcopy(net), "default")
        torch.testing.assert_close(compiled(x, t, d).float(), eager, rtol=0.05, atol=0.05)
