"""The seed-group tag: runs that differ only in ``seed`` share ``group_hash``; anything else that
decides the weights separates them (``bench.identity.group_hash``, logged by ``bench.track``)."""

from bench.identity import group_hash, identity_hash
from bench.track import standard_tags


def test_runs_differing_only_in_seed_share_the_group_hash(compose):
    a, b = compose("seed=0"), compose("seed=1")
    assert identity_hash(a) != identity_hash(b)
    assert group_hash(a) == group_hash(b)
    assert group_hash(compose("seed=0", "train.lr=0.002")) != group_hash(a)
    assert group_hash(compose("seed=0", "method=flow_matching")) != group_hash(a)
    # logging intervals are not identity, so not a group either
    assert group_hash(compose("seed=0", "train.log_every=7")) == group_hash(a)


def test_every_run_is_tagged_with_its_group(compose):
    cfg = compose("seed=3")
    tags = standard_tags(cfg, identity_hash(cfg), "tiny/4", "cpu")
    assert tags["group_hash"] == group_hash(compose("seed=5"))
    assert tags["config_hash"] != tags["group_hash"]


def test_auto_precision_is_hashed_as_what_it_resolves_to_on_a_gpu(compose):
    """``train.precision=auto`` is fp32 on a CPU and bf16 on a GPU: other rounding, other weights.
    A GPU job of the same command must not find the CPU run finished and report its numbers as
    its own. ``auto`` that means fp32 keeps its hash (every CPU run recorded so far keeps its run
    directory); ``auto`` that means bf16 is hashed as bf16."""
    from bench.identity import pin_precision

    cpu, gpu = compose(), compose()
    before = identity_hash(cpu)
    pin_precision(cpu, "fp32")
    pin_precision(gpu, "bf16")
    assert identity_hash(cpu) == before
    assert identity_hash(gpu) != identity_hash(cpu)
    assert identity_hash(gpu) == identity_hash(compose("train.precision=bf16"))
    assert group_hash(gpu) != group_hash(cpu)  # nor one report cell
    explicit = compose("train.precision=fp32")
    pin_precision(explicit, "fp32")
    assert explicit.train.precision == "fp32"


def test_the_job_and_its_plan_pin_the_precision_of_their_device(compose, monkeypatch, tmp_path):
    """``bench.build.prepare`` pins the precision its device resolves ``auto`` to before any
    identity is taken; the plan for a GPU names the run the GPU job will find."""
    from bench import build, plan
    from bench.identity import run_dir

    cfg = compose(f"paths.root={tmp_path}", "size=tiny")
    cpu_name = run_dir(cfg).name
    monkeypatch.setattr(build.accel, "resolve_precision", lambda device, p: "bf16")
    build.prepare(cfg)
    assert cfg.train.precision == "bf16" and run_dir(cfg).name != cpu_name
    planned = plan.plan_job(compose(f"paths.root={tmp_path}", "size=tiny"), plan.device("H100"), {})
    assert planned[-1].run == run_dir(cfg).name


def test_a_teacher_is_pinned_like_the_job_that_trains_it(compose, tmp_path):
    """The teacher's run directory is taken with ``auto`` pinned as on the student's device,
    also when the teacher's own recipe sets ``precision: auto`` again; a job asking for cpu is
    planned as fp32 even when the plan is for a GPU."""
    from bench import plan
    from bench.identity import pin_precision, run_dir
    from bench.teacher import teacher_config

    cfg = compose(f"paths.root={tmp_path}", "size=tiny", "method=progressive_distillation",
                  "+method.teacher.train.precision=auto")  # fmt: skip
    on_gpu = teacher_config(cfg, "bf16")
    assert on_gpu.train.precision == "bf16"
    assert teacher_config(cfg).train.precision == "auto"  # fp32: the hash every CPU run has
    pin_precision(cfg, "bf16")
    planned = plan.plan_job(cfg, plan.device("H100"), {})
    assert planned[0].run == run_dir(on_gpu).name  # the teacher line names the GPU teacher
    cpu_job = compose(f"paths.root={tmp_path}", "size=tiny", "device=cpu")
    assert plan.plan_job(cpu_job, plan.device("H100"), {})[-1].run == run_dir(cpu_job).name
