"""What a sweep costs before it runs (bench/plan.py, ``plan=true``) and the CPU guard.

Estimates are checked against the FLOP table and against a hand-made bench.perf record, never
against a clock. The SLURM sizing on a real cluster is in tests/test_slurm.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run_cli
from test_dit import PAPER

from bench import plan
from bench.errors import UserError
from bench.identity import run_dir

QUICK = ["eval=smoke", "eval.num_samples=16"]


def no_records(tmp_path: Path) -> str:
    (tmp_path / "records").mkdir(exist_ok=True)
    return f"planning.records={tmp_path / 'records'}"


def test_a_mixed_sweep_names_the_shared_teacher_once_and_the_finished_runs(tmp_path):
    """Progressive distillation's flow-matching teacher (one per size) is also a job of the sweep:
    one run, listed once, before the job that trains it; reflow trains its own stage 1; the
    finished shortcut run at tiny is reused, by identity; nothing is trained."""
    from hydra import compose, initialize_config_dir

    from bench.build import CONFIG_DIR

    common = [f"paths.root={tmp_path}", no_records(tmp_path), "device=cpu"]  # a CPU run reused
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        done = run_dir(compose("config", overrides=["method=shortcut", *common]))
    done.mkdir(parents=True)
    (done / "state.json").write_text(json.dumps({"status": "finished"}))

    got = run_cli(
        "-m",
        "method=progressive_distillation,reflow,shortcut,flow_matching",
        "size=tiny,XL",
        "plan=true",
        *common,
        cwd=tmp_path,
    )
    assert got.returncode == 0, got.stderr[-3000:]
    lines = got.stdout.strip().splitlines()
    assert lines[0].startswith("plan: 8 job(s) on cpu")
    runs = [ln for ln in lines if ln.startswith("[")]
    assert len(runs) == 8 and lines[-1].startswith("total: ")  # the 2 teachers are 2 of the jobs
    teachers = [ln for ln in runs if "] teacher flow_matching" in ln]
    assert len(teachers) == 2 and not [ln for ln in runs if "] job     flow_matching" in ln]
    for size in ("tiny_4", "XL_2"):
        (t,) = [ln for ln in teachers if f"-{size}-" in ln]
        assert "also a job of this sweep (one run)" in t
        name = t.split("(")[1].split(")")[0]
        (user,) = [ln for ln in runs if f"teacher {name}" in ln]
        assert "progressive_distillation" in user and runs.index(t) < runs.index(user)
        assert sum(name in ln for ln in runs) == 2  # its own line and its student's
    (reused,) = [ln for ln in runs if f"({done.name})" in ln]
    assert "REUSE the finished run" in reused
    for ln in runs:
        assert "assumed: " in ln and "utilisation" in ln  # no record: says it is assumed
    assert "STOPS on a CPU" in next(ln for ln in runs if "shortcut XL/2" in ln)
    assert "STOPS" not in next(ln for ln in runs if "shortcut tiny/4" in ln)
    assert not list(tmp_path.glob("runs/*/checkpoint.pt"))  # nothing trained


@pytest.mark.parametrize("launcher", ["local", "submitit_local"])
def test_plan_works_under_the_local_launchers_and_starts_nothing(tmp_path, launcher):
    """plan=true replaces whichever launcher is chosen: the same plan lines, no job run, no
    submitit folder, no run directory (SLURM: tests/test_slurm.py)."""
    common = [f"paths.root={tmp_path}", no_records(tmp_path), f"hydra/launcher={launcher}"]
    got = run_cli("-m", "method=shortcut,flow_matching", "plan=true", *common, cwd=tmp_path)
    assert got.returncode == 0, got.stderr[-3000:]
    lines = got.stdout.strip().splitlines()
    assert lines[0].startswith("plan: 2 job(s) on cpu") and lines[-1].startswith("total: ")
    assert len([ln for ln in lines if ln.startswith("[")]) == 2
    assert "SLURM" not in got.stdout  # a local launcher asks no scheduler for anything
    assert not (tmp_path / "runs").exists() and not list(tmp_path.rglob(".submitit"))


def test_plan_of_a_single_run_without_dash_m(tmp_path):
    """plan=true on a plain command (no -m): the planned multirun parses (Hydra's argparse takes
    no flag after the overrides) and plans the one job."""
    common = [f"paths.root={tmp_path}", no_records(tmp_path)]
    got = run_cli("method=flow_matching", "plan=true", *common, cwd=tmp_path)
    assert got.returncode == 0, got.stderr[-3000:]
    lines = got.stdout.strip().splitlines()
    assert lines[0].startswith("plan: 1 job(s) on cpu") and lines[-1].startswith("total: ")
    assert not (tmp_path / "runs").exists()


def stub_data(shape=(4, 32, 32)):
    return SimpleNamespace(shape=shape, num_classes=0, train_x=None, test_x=None)


def test_estimates_scale_with_size_as_the_flop_table_says(compose, tmp_path):
    from bench.dit import dit

    dev = plan.device("H100")
    est = {}
    for size in ("S", "B", "L", "XL"):
        cfg = compose(
            f"size={size}", "method=flow_matching", "train=paper", f"paths.root={tmp_path}"
        )
        (p,) = plan.plan_job(cfg, dev, [], data=stub_data())
        est[size] = p
    net = {s: dit(s, (4, 32, 32)) for s in est}
    for size, p in est.items():
        ratio = net[size].gflops() / net["S"].gflops()
        assert p.train_flops / est["S"].train_flops == pytest.approx(ratio)
        assert p.train_s / est["S"].train_s == pytest.approx(ratio)
        assert p.eval_s / est["S"].eval_s == pytest.approx(ratio)
        # the DiT paper's table (Gflops on 32x32x4), within what DiT.gflops adds (the d embedder)
        assert ratio == pytest.approx(PAPER[size][1] / PAPER["S"][1], rel=0.01)
    # flow matching: 3 forward-equivalents per row; FLOPs = 2 x multiply-adds
    xl = est["XL"]
    assert xl.train_flops == pytest.approx(2 * net["XL"].gflops() * 1e9 * 3 * 410_000 * 64)
    assert xl.train_s == pytest.approx(xl.train_flops / (989e12 * 0.4))
    assert est["S"].peak_mem_gb < xl.peak_mem_gb < 80


def test_a_bench_perf_record_of_the_same_network_is_used_and_named(compose, tmp_path):
    from bench.build import network
    from bench.data import digits16

    cfg = compose("method=shortcut", f"paths.root={tmp_path}")
    data = digits16()
    with torch.device("meta"):
        net = network(cfg, data, False, {"d_embedding": "level", "t_scale": 1000.0})
    gflops = net.gflops()
    record = {
        "protocol": {"device_kind": "cpu", "device_name": "x", "started": "2026-01-01 00:00 UTC"},
        "variants": [{"name": "fast", "attention": "sdpa", "precision": "fp32", "compile": None,
                      "grad_checkpoint": False}],
        "train": [{"size": "tiny", "variant": "fast", "method": "shortcut", "status": "ok",
                   "batch": 64, "ms_per_step": 70.0, "dit_gflops_per_sample": gflops,
                   "forward_equivalents_per_sample": 3.5}],
        "sampling": [],
    }  # fmt: skip
    folder = tmp_path / "records"
    folder.mkdir()
    (folder / "cpu-20260101-000000.json").write_text(json.dumps(record))
    (p,) = plan.plan_job(cfg, plan.device("cpu"), plan.records(folder))
    assert p.source.startswith("measured: cpu-20260101-000000.json, tiny fast shortcut at batch 64")
    assert p.train_s == pytest.approx(1000 * 70e-3 * 128 / 64)  # 1000 steps, batch 128 vs 64
    record["train"][0]["noisy"] = True  # a row flagged too noisy is never used
    (folder / "cpu-20260101-000000.json").write_text(json.dumps(record))
    (p,) = plan.plan_job(cfg, plan.device("cpu"), plan.records(folder))
    assert p.source.startswith("assumed: ")


def test_the_cpu_guard_stops_xl_and_not_the_default(compose, tmp_path):
    cpu = torch.device("cpu")
    default = plan.guard(compose(f"paths.root={tmp_path}"), cpu)
    assert default is not None and default.wall_s < plan.CPU_LIMIT_S
    xl = compose("size=XL", f"paths.root={tmp_path}", no_records(tmp_path))
    with pytest.raises(UserError, match=r"over an hour: add allow_long_cpu=true to proceed"):
        plan.guard(xl, cpu)
    ok = compose("size=XL", "allow_long_cpu=true", f"paths.root={tmp_path}")
    assert plan.guard(ok, cpu).wall_s > plan.CPU_LIMIT_S
    assert plan.tags(default)["plan/est_wall_s"] == f"{default.wall_s:.1f}"


@pytest.mark.slow
def test_an_xl_job_on_the_cpu_stops_in_one_sentence_before_any_run_exists(tmp_path):
    got = run_cli(
        "size=XL", f"paths.root={tmp_path}", f"tracking.uri=sqlite:///{tmp_path}/m.db",
        no_records(tmp_path), *QUICK, cwd=tmp_path,
    )  # fmt: skip
    assert got.returncode == 2
    (line,) = got.stderr.strip().splitlines()
    assert line.startswith(
        "error: this job (shortcut XL/2 on digits16, 1000 steps) is estimated at"
    )
    assert line.endswith("add allow_long_cpu=true to proceed, or plan=true to see the plan")
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_plan_argv_turns_any_command_into_a_planned_multirun():
    assert plan.argv(["run", "size=XL"]) == ["run", "size=XL"]
    single = plan.argv(["run", "size=XL", "plan=true"])
    assert single[:4] == ["run", "-m", "size=XL", "plan=true"]  # the flag before the overrides
    assert "hydra.launcher._target_=hydra_plugins.fewstep_bench.launchers.PlanLauncher" in single
    assert plan.argv(["run", "-m", "size=S,B", "plan=true"]).count("-m") == 1


def test_the_slurm_request_is_sized_per_job(tmp_path):
    from hydra import compose, initialize_config_dir

    from bench.build import CONFIG_DIR

    def request(*overrides):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(
                "config",
                overrides=["hydra/launcher=slurm", f"paths.root={tmp_path}", *overrides],
                return_hydra_config=True,
            )
        return {k: cfg.hydra.launcher[k] for k in ("gpus_per_node", "timeout_min", "mem_gb")}

    cpu_tiny = request("size=tiny", "train.steps=4", *QUICK)
    assert cpu_tiny["gpus_per_node"] is None and cpu_tiny["timeout_min"] >= 10
    s = request("size=S", "train=paper", "planning.device=H100")
    xl = request("size=XL", "train=paper", "planning.device=H100")
    assert s["gpus_per_node"] == xl["gpus_per_node"] == 1
    assert xl["timeout_min"] > s["timeout_min"] and xl["mem_gb"] >= s["mem_gb"]
    assert xl["timeout_min"] <= 2880  # capped: a longer job is requeued from its checkpoint
    fixed = request("size=XL", "planning.slurm.size=false")
    assert fixed == {"gpus_per_node": None, "timeout_min": 240, "mem_gb": 4}


def test_the_time_limit_leaves_the_signal_lead_for_the_work(tmp_path):
    """SLURM sends the time-limit warning ``signal_delay_s`` before the limit: a limit shorter
    than that lead signals the job as it starts (it was killed by SIGUSR2 on exit, or would be
    requeued at once, again and again). The planned limit is the work plus the lead."""
    from hydra import compose, initialize_config_dir

    from bench.build import CONFIG_DIR

    def limit(*overrides):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(
                "config",
                overrides=["hydra/launcher=slurm", f"paths.root={tmp_path}", "size=tiny",
                           "train.steps=4", *QUICK, "planning.slurm.extra_min=0", *overrides],
                return_hydra_config=True,
            )  # fmt: skip
        return cfg.hydra.launcher.timeout_min, cfg.hydra.launcher.signal_delay_s

    # SLURM may send the warning up to 60 s before the lead it was asked for (sbatch(1))
    minutes, lead = limit()
    assert minutes * 60 > lead + 60, (minutes, lead)
    minutes, lead = limit("hydra.launcher.signal_delay_s=900")
    assert lead == 900 and minutes * 60 > 900 + 60, minutes


@pytest.mark.parametrize("planned", [False, True])
def test_a_time_limit_inside_the_signal_lead_is_refused_before_submission(tmp_path, planned):
    """``hydra.launcher.timeout_min=3`` with the warning 120 s before the limit (and SLURM free
    to send it 60 s earlier): the job would be told to stop as it starts. One sentence naming
    both values, exit 2, nothing submitted (no sbatch is needed to reach the check); the plan
    refuses the same request."""
    got = run_cli(
        "-m", "size=tiny", "train.steps=4", *QUICK, "hydra/launcher=slurm",
        "hydra.launcher.timeout_min=3", f"paths.root={tmp_path}", *(["plan=true"] if planned else []),
        cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert got.returncode == 2, got.stderr[-2000:]
    assert "hydra.launcher.timeout_min=3" in got.stderr and "signal_delay_s=120" in got.stderr
    assert not list(tmp_path.glob("hydra/multirun_*/.submitit/*"))
    assert "--time=" not in got.stdout  # no plan line offers the refused request


@pytest.mark.parametrize(
    "timeout_min, signal_delay_s, named",
    [(240, -5, "signal_delay_s=-5"), (240, 70000, "signal_delay_s=70000"),
     (240, 1.5, "signal_delay_s=1.5"), (0, 120, "timeout_min=0"), (-3, 0, "timeout_min=-3")],
)  # fmt: skip
def test_a_negative_or_out_of_range_slurm_request_is_one_sentence(timeout_min, signal_delay_s, named):
    """sbatch takes ``--signal=SIG@N`` with N a whole number of seconds from 0 to 65535 and a
    time limit of at least a minute; a negative lead was accepted and would have reached sbatch
    as ``--signal=USR2@-5``. The sentence names the value and what is allowed."""
    from hydra_plugins.fewstep_bench.launchers import check_time_limit

    with pytest.raises(UserError, match=re.escape(named)) as refused:
        check_time_limit(timeout_min, signal_delay_s)
    assert "allowed" in str(refused.value) or "whole" in str(refused.value)
    check_time_limit(240, 120)  # the preset's values pass
    check_time_limit(240, 0)  # no warning at all: no lead


def test_a_negative_signal_lead_is_refused_before_submission(tmp_path):
    """The same check on the command line: one sentence, exit 2, nothing submitted."""
    got = run_cli(
        "-m", "size=tiny", "train.steps=4", *QUICK, "hydra/launcher=slurm",
        "hydra.launcher.signal_delay_s=-5", f"paths.root={tmp_path}", cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert got.returncode == 2, got.stderr[-2000:]
    assert "hydra.launcher.signal_delay_s=-5" in got.stderr
    assert not list(tmp_path.glob("hydra/multirun_*/.submitit/*"))


def test_a_job_sized_to_several_gpus_is_planned_as_the_run_its_processes_train(compose, tmp_path):
    """A step that does not fit one card is planned on two, and the job then runs as two DDP
    processes: its identity holds grad_accum x processes (the run of one process with
    grad_accum=2), so the plan must name -- and find finished or not -- that run, not the run of
    one process. Its teacher is trained inside the job, by the same two processes."""
    import copy

    from omegaconf import open_dict

    from bench import teacher as teachers
    from bench.identity import identity_hash, pin_precision

    cfg = compose("size=B", "method=progressive_distillation", "train=paper", f"paths.root={tmp_path}")
    (*_, one) = plan.plan_job(cfg, plan.device("H100"), [], data=stub_data())
    assert one.gpus == 1
    # a card that holds less than the step: more cards, the batch split between them
    small = plan.Device("small", "cuda", 100.0, one.peak_mem_gb * 0.6 / 0.9)
    teacher, job = plan.plan_job(cfg, small, [], data=stub_data())
    n = job.gpus
    assert n > 1 and teacher.gpus == n

    pinned = copy.deepcopy(cfg)
    pin_precision(pinned, "bf16")  # auto on a GPU
    many = run_dir(pinned, world=n)
    assert job.run == many.name and job.identity == identity_hash(pinned, world=n)
    assert job.identity != identity_hash(pinned, world=1)
    accum = copy.deepcopy(pinned)  # what "n processes" means: the micro-batches of one step
    with open_dict(accum):
        accum.train.grad_accum = n * int(accum.train.grad_accum)
    assert identity_hash(accum, world=1) == job.identity
    tcfg = teachers.teacher_config(pinned, "bf16")
    assert teacher.run == run_dir(tcfg, world=n).name

    # the run of n processes, finished, is the one the plan reuses
    assert plan.plan_job(cfg, small, [], data=stub_data())[-1].status == "train"
    many.mkdir(parents=True)
    (many / "state.json").write_text(json.dumps({"status": "finished"}))
    assert plan.plan_job(cfg, small, [], data=stub_data())[-1].status == "reuse"
    # a SLURM request of 8 tasks is a run of 8 processes, whatever one step needs
    (*_, eight) = plan.plan_job(cfg, small, [], data=stub_data(), world=8)
    assert eight.gpus == 8 and eight.identity == identity_hash(pinned, world=8)


def test_the_plan_of_a_slurm_job_of_two_tasks_names_the_run_of_two_processes(compose, tmp_path):
    """``hydra.launcher.tasks_per_node=2``: SLURM starts two processes that train one run as DDP
    (gloo on a CPU), so its identity holds twice the micro-batches; the plan names that run."""
    got = run_cli(
        "-m", "size=tiny", "train.steps=4", *QUICK, "hydra/launcher=slurm",
        "hydra.launcher.tasks_per_node=2", f"paths.root={tmp_path}", "plan=true",
        cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr[-2000:]
    cfg = compose("size=tiny", "train.steps=4", *QUICK, f"paths.root={tmp_path}")
    assert run_dir(cfg, world=2).name in got.stdout, got.stdout
    assert run_dir(cfg, world=1).name not in got.stdout


def test_the_planning_devices_the_schema_allows_are_the_plans():
    import typing

    from bench import schema

    allowed = typing.get_args(typing.get_type_hints(schema.Planning)["device"])
    assert set(allowed) == {"auto", "cpu", *plan.CARDS}


@pytest.mark.parametrize("launch", ["plan=true", "submit"])
@pytest.mark.parametrize(
    "bad, named",
    [("planning.slurm.margin=-1", "planning.slurm.margin=-1 is not allowed: a number > 0"),
     ("planning.utilisation=0", "planning.utilisation=0 is not allowed"),
     ("planning.records=/etc/passwd", "planning.records='/etc/passwd' is not a folder")],
)  # fmt: skip
def test_a_bad_planning_key_is_one_sentence_before_anything_is_planned_or_submitted(
    tmp_path, bad, named, launch
):
    """The SLURM request is derived in each job's config by a resolver that falls back to the
    preset's values when the job cannot be planned: a bad planning key used to fall back without a
    word (a negative margin, a utilisation of 0 read as the default, a file for the records
    folder). Refused by the plan and by the launcher before sbatch, exit 2."""
    got = run_cli(
        "-m", "size=tiny", "train.steps=4", *QUICK, "hydra/launcher=slurm", bad,
        f"paths.root={tmp_path}", *(["plan=true"] if launch == "plan=true" else []),
        cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert got.returncode == 2, got.stderr[-2000:]
    assert named in got.stderr
    assert not list(tmp_path.glob("hydra/multirun_*/.submitit/*"))
