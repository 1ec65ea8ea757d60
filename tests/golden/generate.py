"""Golden fixtures: the official training-target code run on an analytic stub network.

Not part of the test run (tests/test_golden.py needs only numpy and the ``.npz`` files here). This
script runs the official JAX code -- imported from checkouts given on the command line, never
copied into this repository -- and saves, for every case, the inputs, every random draw the
official code made (recorded by wrapping ``jax.random``), intermediate values where they help, and
its outputs, plus a ``provenance`` string (repository, commit, file, function, stub, versions).

    python tests/golden/generate.py --shortcut-repo PATH --meanflow-repo PATH [--out tests/golden]

(or ``SHORTCUT_REPO`` / ``MEANFLOW_REPO`` in the environment). It needs ``jax`` (and ``flax`` for
MeanFlow, whose module is a flax ``nn.Module``) in a scratch environment outside this project;
tests/golden/README.md says which versions made the files here.

The stub networks (the same functions are written in torch in tests/test_golden.py):

* shortcut repository (targets called with ``(x, t, level, y)``, ``level`` the integer step
  exponent k of ``d = 2^-k``):  ``v = a tanh(x + b) (1 + t) + 0.1 level + 0.01 y``.
  A network built with ``ignore_dt=True`` (every baseline but shortcut and live reflow,
  official train.py:140) zeroes ``level`` first, as the official DiT does (model.py:249-250).
* MeanFlow (paper time ``t'``, 1 = noise; net ``(z, t', h = t' - r', y)``): the project-time field
  ``S(z, t, d, y) = 1.5 tanh(z + 0.1) (1 + t) + 0.5 d cos(z) + 0.2 t d + 0.01 y`` seen in paper
  time, ``u'(z, t', h, y) = -S(z, 1 - t', h, y)``.

Everything runs with ``jax_enable_x64``, so the fixtures carry float64 numbers and a comparison
at 1e-6 is not blurred by float32 rounding: the shortcut code is dtype-agnostic (except that it
casts its times to float32, which it keeps), and MeanFlow's module takes its precision from its
``dtype`` class attribute, set to float64 here (the official default is float32).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

NUM_CLASSES = 10
#: (a, b) of the shortcut-repository stub for each network a target function may call
ONLINE, EMA = (2.5, 0.0), (2.4, 0.1)
TEACHER_ONLINE, TEACHER_EMA = (1.9, -0.3), (2.0, -0.2)
SHORTCUT_STUB = "v = a*tanh(x + b)*(1 + t) + 0.1*level + 0.01*y (level zeroed when ignore_dt)"
MEANFLOW_STUB = (
    "u'(z, t', h, y) = -S(z, 1 - t', h, y), "
    "S(z, t, d, y) = 1.5*tanh(z + 0.1)*(1 + t) + 0.5*d*cos(z) + 0.2*t*d + 0.01*y"
)
SHORTCUT_URL = "https://github.com/kvfrans/shortcut-models"
MEANFLOW_URL = "https://github.com/Gsunshine/meanflow"


# -- recording what the official code draws and computes -----------------------------------------
@contextlib.contextmanager
def spying(module, names: list[str], log: list):
    """Wrap ``module.<name>`` so every call appends ``(name, output, first argument)`` to ``log``."""
    originals = {n: getattr(module, n) for n in names}

    def wrap(name, f):
        def spy(*args, **kwargs):
            out = f(*args, **kwargs)
            log.append((name, out, args[0] if args else None))
            return out

        return spy

    for n, f in originals.items():
        setattr(module, n, wrap(n, f))
    try:
        yield log
    finally:
        for n, f in originals.items():
            setattr(module, n, f)


def draws(log: list, expected: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    """Name the recorded draws: ``expected`` is ``[(jax function, our name), ...]`` in call order."""
    got = [name for name, *_ in log]
    assert got == [f for f, _ in expected], f"the official code drew {got}, expected {expected}"
    pairs = zip(expected, log, strict=True)
    return {f"draw_{ours}": np.asarray(out) for (_, ours), (_, out, _) in pairs}


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def commit(repo: Path) -> str:
    out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True)
    return out.stdout.decode().strip() if out.returncode == 0 else "unknown"


def save(out: Path, case: str, arrays: dict, provenance: dict) -> None:
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    np.savez_compressed(out / f"{case}.npz", provenance=json.dumps(provenance), **arrays)
    print(f"{case}.npz: {', '.join(sorted(arrays))}")


# -- the shortcut repository: targets_shortcut.py and baselines/targets_*.py ---------------------
def shortcut_stub(params, x, t, level, y, ignore_dt: bool):
    a, b = params
    level = jnp.zeros_like(t) if ignore_dt else level
    col = (slice(None), None, None, None)
    return a * jnp.tanh(x + b) * (1 + t[col]) + 0.1 * level[col] + 0.01 * y[col]


class StubState:
    """What the official target functions use of a ``TrainStateEma``: ``call_model`` (online
    parameters), ``call_model_ema`` and ``step``."""

    def __init__(self, online, ema, ignore_dt: bool, step: int = 0):
        self.online, self.ema, self.ignore_dt, self.step = online, ema, ignore_dt, step

    def call_model(self, x, t, dt, y, train=False):
        return shortcut_stub(self.online, x, t, jnp.asarray(dt), y, self.ignore_dt)

    def call_model_ema(self, x, t, dt, y, train=False):
        return shortcut_stub(self.ema, x, t, jnp.asarray(dt), y, self.ignore_dt)


class Flags:
    def __init__(self, batch_size: int, max_steps: int = 700, **model):
        self.batch_size, self.max_steps, self.model = batch_size, max_steps, model
        self.dataset_name = "stub"


def inputs(seed: int, batch: int, scale: float):
    rng = np.random.RandomState(seed)
    images = rng.uniform(-scale, scale, (batch, 2, 2, 2))  # (B, H, W, C), as the official code
    labels = rng.randint(0, NUM_CLASSES, batch).astype(np.int32)
    return images, labels


def run_official(fn, flags, key_seed: int, states, images, labels, expected):
    """Call an official ``get_targets``; return its inputs, outputs and draws, and what went into
    its clips (``preclip_x_mid``: the midpoint ``x'``; ``preclip_target``: the bootstrap target)."""
    log, clips = [], []
    with (
        spying(jax.random, ["randint", "normal", "bernoulli"], log),
        spying(jnp, ["clip"], clips),
    ):
        x_t, v_t, t, dt_base, labels_out, _ = fn(
            flags, jax.random.PRNGKey(key_seed), *states, jnp.asarray(images), jnp.asarray(labels)
        )
    return {
        "images": images,
        "labels": labels,
        "key_seed": key_seed,
        "out_x_t": x_t,
        "out_v_t": v_t,
        "out_t": t,
        "out_dt_base": dt_base,
        "out_labels": labels_out,
        **{
            f"preclip_{w}": np.asarray(c[2])
            for w, c in zip(["x_mid", "target"], clips, strict=False)
        },
        **draws(log, expected),
    }


def provenance(repo: Path, file: str, function: str, flags: Flags | None, **extra) -> dict:
    return {
        "repo": SHORTCUT_URL,
        "commit": commit(repo),
        "file": file,
        "function": function,
        "stub": SHORTCUT_STUB,
        "stub_params": {
            "online": ONLINE,
            "ema": EMA,
            "teacher_online": TEACHER_ONLINE,
            "teacher_ema": TEACHER_EMA,
        },
        "flags": None if flags is None else {"batch_size": flags.batch_size, **flags.model},
        "ignore_dt": not file.endswith(("targets_shortcut.py", "targets_livereflow.py")),
        "generator": "tests/golden/generate.py",
        "jax": jax.__version__,
        "numpy": np.__version__,
        "jax_enable_x64": bool(jax.config.jax_enable_x64),
        "layout": "images and x arrays are (B, H, W, C) as in the official code",
        **extra,
    }


def shortcut_cases(repo: Path, out: Path) -> None:
    fn = load(repo / "targets_shortcut.py", "official_targets_shortcut").get_targets
    expected = [
        ("randint", "bootstrap_t_index"),
        ("normal", "bootstrap_noise"),
        ("bernoulli", "label_drop"),
        ("randint", "flow_t_index"),
        ("normal", "flow_noise"),
    ]
    for case, every, seed in [("shortcut_every8", 8, 1), ("shortcut_every4", 4, 2)]:
        flags = Flags(
            64,
            bootstrap_every=every,
            denoise_timesteps=128,
            bootstrap_dt_bias=0,
            bootstrap_ema=1,
            bootstrap_cfg=1,
            cfg_scale=1.5,
            num_classes=NUM_CLASSES,
            class_dropout_prob=0.1,
        )
        images, labels = inputs(seed, 64, 8.0)  # beyond the +-4 clip: both clips act
        arrays = run_official(
            fn, flags, seed, [StubState(ONLINE, EMA, False)], images, labels, expected
        )
        x_mid, target = (np.abs(arrays[f"preclip_{w}"]) > 4 for w in ("x_mid", "target"))
        only_mid = x_mid & ~target  # a clipped x' that the target's clip does not hide
        print(
            f"  {case}: {x_mid.sum()} x' and {target.sum()} target elements clipped, "
            f"{only_mid.sum()} with x' clipped and the target not"
        )
        assert only_mid.any(), "the case must exercise both clips, x' where the target is not"
        save(out, case, arrays, provenance(repo, "targets_shortcut.py", "get_targets", flags))


def consistency_cases(repo: Path, out: Path) -> None:
    ct = load(repo / "baselines/targets_consistency_training.py", "official_ct").get_targets
    cd = load(repo / "baselines/targets_consistency_distillation.py", "official_cd").get_targets
    expected = [("randint", "t_index"), ("normal", "noise")]
    model = {"denoise_timesteps": 128, "num_classes": NUM_CLASSES}
    for k in (0, 3, 6):  # curriculum level k = floor(step / (max_steps / 7))
        flags, step = Flags(32, max_steps=700, **model), 100 * k + 50
        images, labels = inputs(10 + k, 32, 1.5)
        state = StubState(ONLINE, EMA, ignore_dt=True, step=step)
        arrays = run_official(ct, flags, 10 + k, [state], images, labels, expected)
        arrays["step"] = step
        save(
            out,
            f"ct_k{k}",
            arrays,
            provenance(
                repo, "baselines/targets_consistency_training.py", "get_targets", flags, step=step
            ),
        )
    flags = Flags(64, **model)
    images, labels = inputs(20, 64, 6.0)  # the teacher step's clip at +-4 acts
    states = [StubState(ONLINE, EMA, True), StubState(TEACHER_ONLINE, TEACHER_EMA, True)]
    arrays = run_official(cd, flags, 20, states, images, labels, expected)
    assert (np.abs(arrays["preclip_x_mid"]) > 4).any(), "the case must exercise the clip"
    save(
        out,
        "cd",
        arrays,
        provenance(repo, "baselines/targets_consistency_distillation.py", "get_targets", flags),
    )


def progressive_cases(repo: Path, out: Path) -> None:
    fn = load(repo / "baselines/targets_progressive.py", "official_pd").get_targets
    expected = [("randint", "t_index"), ("normal", "noise")]
    # (case, round r, image scale, bootstrap_cfg); round r's student step is D = 2^-(6-r)
    for case, r, scale, cfg in [
        ("pd_round2", 2, 1.0, 0),  # no clip activity: the target as the project computes it
        ("pd_round2_clip", 2, 6.0, 0),  # the teacher step's clip at +-4 acts
        ("pd_round0_cfg", 0, 1.0, 1),  # round 0 with the guidance baked in (bootstrap_cfg)
    ]:
        step = 100 * r + 50  # max_steps 700: rounds of 100 steps
        flags = Flags(
            32,
            max_steps=700,
            denoise_timesteps=128,
            bootstrap_ema=1,
            bootstrap_cfg=cfg,
            cfg_scale=1.5,
            num_classes=NUM_CLASSES,
        )
        images, labels = inputs(30 + r + cfg, 32, scale)
        student = StubState(ONLINE, EMA, ignore_dt=True, step=step)
        teacher = StubState(TEACHER_ONLINE, TEACHER_EMA, ignore_dt=True, step=step)
        arrays = run_official(fn, flags, 30 + r, [student, teacher], images, labels, expected)
        arrays["step"], arrays["round"] = step, r
        if case == "pd_round2":
            assert (np.abs(arrays["preclip_x_mid"]) <= 4).all(), "the clip must stay idle"
        if case == "pd_round2_clip":
            assert (np.abs(arrays["preclip_x_mid"]) > 4).any(), "the clip must act"
        save(
            out,
            case,
            arrays,
            provenance(repo, "baselines/targets_progressive.py", "get_targets", flags, step=step),
        )


def live_reflow_case(repo: Path, out: Path) -> None:
    fn = load(repo / "baselines/targets_livereflow.py", "official_lr").get_targets
    expected = [
        ("bernoulli", "label_drop"),
        ("randint", "flow_t_index"),
        ("normal", "flow_noise"),
        ("normal", "reflow_noise"),
        ("randint", "reflow_t_index"),
    ]
    flags = Flags(
        64,
        bootstrap_every=8,
        denoise_timesteps=128,
        cfg_scale=1.5,
        num_classes=NUM_CLASSES,
        class_dropout_prob=0.1,
    )
    images, labels = inputs(40, 64, 2.0)
    # ignore_dt=False for live reflow (official train.py:140): the stub sees the levels.
    arrays = run_official(fn, flags, 40, [StubState(ONLINE, EMA, False)], images, labels, expected)
    save(
        out,
        "live_reflow",
        arrays,
        provenance(repo, "baselines/targets_livereflow.py", "get_targets", flags),
    )


# -- MeanFlow (Gsunshine/meanflow, JAX) -----------------------------------------------------------
def meanflow_cases(repo: Path, out: Path) -> None:
    import flax
    import flax.linen as nn

    def project_field(z, t, d, y):
        col = (slice(None), None, None, None)
        t, d, y = t[col], d[col], y.astype(z.dtype)[col]
        return 1.5 * jnp.tanh(z + 0.1) * (1 + t) + 0.5 * d * jnp.cos(z) + 0.2 * t * d + 0.01 * y

    class StubDiT(nn.Module):
        """Stands in for models_dit.<cls>: u'(z, t', h, y) = -S(z, 1 - t', h, y)."""

        class_dropout_prob: float = 0.0

        def __call__(self, x, t, h, y, train=False, key=None):
            return -project_field(x, 1 - t, h, y)

    # meanflow.py imports models.models_dit (the DiT and its layers): only the stub is needed.
    stub_models = types.ModuleType("models")
    stub_models.models_dit = types.SimpleNamespace(StubDiT=StubDiT)
    sys.modules["models"], sys.modules["models.models_dit"] = stub_models, stub_models.models_dit
    official = load(repo / "meanflow.py", "official_meanflow")

    record: dict = {}

    class Recording(official.MeanFlow):
        """The official module, recording what time sampling, guidance and label dropout return."""

        dtype = jnp.float64  # the module's precision setting (official: float32)

        def sample_tr(self, bz):
            t, r = super().sample_tr(bz)
            record.update(t=t, r=r)
            return t, r

        def guidance_fn(self, v_t, z_t, t, y, train=False):
            v_g = super().guidance_fn(v_t, z_t, t, y, train=train)
            record.update(z_t=z_t, v=v_t, v_g=v_g)
            return v_g

        def cond_drop(self, v_t, v_g, labels):
            y_inp, v_g = super().cond_drop(v_t, v_g, labels)
            record.update(y_inp=y_inp, v_g_dropped=v_g)
            return y_inp, v_g

    expected = [
        ("normal", "t_normal"),
        ("normal", "r_normal"),
        ("normal", "noise"),
        ("uniform", "label_drop_uniform"),
    ]
    for case, seed, omega, kappa, t_start, t_end in [
        ("meanflow_kappa", 50, 1.0, 0.5, 0.0, 1.0),  # the official defaults
        ("meanflow_interval", 52, 1.5, 0.0, 0.2, 0.7),  # kappa = 0 branch, a guidance interval
    ]:
        options = dict(
            model_str="StubDiT",
            model_config={},
            num_classes=NUM_CLASSES,
            noise_dist="logit_normal",
            P_mean=-0.4,
            P_std=1.0,
            data_proportion=0.75,
            guidance_eq="cfg",
            omega=omega,
            kappa=kappa,
            class_dropout_prob=0.1,
            t_start=t_start,
            t_end=t_end,
            norm_p=1.0,
            norm_eps=0.01,
        )
        model = Recording(**options)
        rng = np.random.RandomState(seed)
        images = rng.normal(0, 1.0, (32, 2, 2, 2))
        labels = rng.randint(0, NUM_CLASSES, 32).astype(np.int32)
        log, jvps, stops = [], [], []
        record.clear()
        with (
            spying(jax.random, ["normal", "uniform"], log),
            spying(jax, ["jvp"], jvps),
            spying(jax.lax, ["stop_gradient"], stops),
        ):
            loss, losses = model.apply(
                {},
                imgs=jnp.asarray(images),
                labels=jnp.asarray(labels),
                rngs={"gen": jax.random.PRNGKey(seed)},
                method=model.forward,
            )
        (u, du_dt), u_tgt, adaptive_weight = jvps[0][1], stops[0][1], stops[1][1]
        arrays = {
            "images": images,
            "labels": labels,
            "key_seed": seed,
            **draws(log, expected),
            **{f"official_{k}": np.asarray(v) for k, v in record.items()},
            "out_u": u,
            "out_du_dt": du_dt,
            "out_u_tgt": u_tgt,
            "out_adaptive_weight": adaptive_weight,
            "out_loss": loss,
            "data_size": int(32 * options["data_proportion"]),
        }
        num_drop = int(np.sum(arrays["draw_label_drop_uniform"] < 0.1))
        inside = (record["t"] >= t_start) & (record["t"] <= t_end)
        assert num_drop >= 2, f"seed {seed}: want some dropped labels, got {num_drop}"
        assert 0 < int(inside.sum()) < 32 or t_end - t_start == 1.0, "interval must split rows"
        prov = {
            "repo": MEANFLOW_URL,
            "commit": commit(repo),
            "file": "meanflow.py",
            "function": "MeanFlow.forward (sample_tr, guidance_fn, cond_drop, the JVP target)",
            "stub": MEANFLOW_STUB,
            "options": {k: v for k, v in options.items() if k != "model_config"},
            "jax": jax.__version__,
            "flax": flax.__version__,
            "numpy": np.__version__,
            "jax_enable_x64": bool(jax.config.jax_enable_x64),
            "dtype": "MeanFlow.dtype = float64 (official default float32)",
            "generator": "tests/golden/generate.py",
            "time": "paper time: t' = 1 is noise, z_t = (1 - t') x + t' e, v = e - x",
            "layout": "images and x arrays are (B, H, W, C) as in the official code",
        }
        save(out, case, arrays, prov)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shortcut-repo", default=os.environ.get("SHORTCUT_REPO"))
    parser.add_argument("--meanflow-repo", default=os.environ.get("MEANFLOW_REPO"))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent))
    args = parser.parse_args()
    if not (args.shortcut_repo and args.meanflow_repo):
        parser.error("give --shortcut-repo and --meanflow-repo (or SHORTCUT_REPO / MEANFLOW_REPO)")
    out = Path(args.out)
    jax.config.update("jax_enable_x64", True)
    meanflow_cases(Path(args.meanflow_repo), out)
    shortcut_repo = Path(args.shortcut_repo)
    shortcut_cases(shortcut_repo, out)
    consistency_cases(shortcut_repo, out)
    progressive_cases(shortcut_repo, out)
    live_reflow_case(shortcut_repo, out)


if __name__ == "__main__":
    main()
