"""Golden fixtures for IMM from the official code (lumalabs/imm), run on an analytic stub network.

Not part of the test run (tests/test_imm.py reads the ``imm_*.npz`` files with numpy and torch).
The official repository releases the network wrapper and the samplers but no training code, so
the fixtures cover what it releases:

* ``training/preconds.py`` ``IMMPrecond``: the flow map ``f_{s,t}`` (``forward``, Euler-FM, stride
  embedding), the interpolants (``add_noise``, ``ddim``), the log-SNR and ``eta`` helpers
  (``get_logsnr``, ``get_log_nt``, ``nt_to_t``);
* ``generate_images.py``: ``pushforward_generator_fn`` (uniform and EDM grids, with and without
  CFG) and ``restart_generator_fn`` (its re-noising draws recorded).

    python tests/golden/generate_imm.py --imm-repo PATH [--out tests/golden]

(or ``IMM_REPO`` in the environment), with torch and numpy in a scratch environment outside this
project. The official modules are imported from the checkout, never copied; the imports they make
that the computation does not use (the DiT and U-Net files, ``dnnlib``, Hydra, torchvision) are
replaced by empty stand-ins, and the network itself by the stub

    G(z, c_t, c_s, labels) = 1.3 tanh(z + 0.2) (1 + c_t / 1000) + 0.4 cos(z) c_s / 1000 + 0.05 c

on the wrapper's inputs ``z = c_in x``, ``c_t = 1000 t``, ``c_s = 1000 (t - s)``, with ``c`` the
label's index plus one for a one-hot label and 0 for the official null label (a zero row).
The wrapper casts to float32 before calling its network; for the fixtures its module sees float64
in that place (as the MeanFlow fixtures run the official module at float64), so float32 rounding
does not blur a 1e-6 comparison.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch

URL = "https://github.com/lumalabs/imm"
STUB = (
    "G(z, c_t, c_s, labels) = 1.3*tanh(z + 0.2)*(1 + c_t/1000) + 0.4*cos(z)*c_s/1000 + 0.05*c, "
    "z = c_in x, c_t = 1000 t, c_s = 1000 (t - s), c = label index + 1 (0 for the null label)"
)
NUM_CLASSES = 10
SIGMA_D = 0.5  # the official default (preconds.py:29) and the ImageNet config's value


class StubG(torch.nn.Module):
    """The official wrapper builds ``globals()[model_type](...)``; this is that model."""

    def __init__(self, label_dim: int = 0, **_):
        super().__init__()
        self.label_dim = label_dim

    def forward(self, z, c_t, c_s, class_labels=None, **_):
        col = (slice(None), None, None, None)
        g = 1.3 * torch.tanh(z + 0.2) * (1 + c_t[col] / 1000) + 0.4 * torch.cos(z) * c_s[col] / 1000
        if class_labels is not None:
            index = torch.arange(1, class_labels.shape[1] + 1, dtype=class_labels.dtype)
            c = (class_labels * index).sum(1).to(g.dtype)
            g = g + 0.05 * c.expand(g.shape[0])[col]
        return g


class Float64Torch(types.ModuleType):
    """``torch`` as the official modules see it here: ``torch.float32`` is float64."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return torch.float64 if name == "float32" else getattr(torch, name)


def stand_ins() -> None:
    """Empty modules for the official imports the computation does not use."""

    def module(name: str, **attrs) -> None:
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m

    module("torch_utils")
    module("torch_utils.persistence", persistent_class=lambda cls: cls)
    module("torch_utils.misc")
    module("training")
    module("training.unets", StubG=StubG)
    module("training.dit")
    module("dnnlib")
    module("hydra", main=lambda **_: lambda f: f)
    module("omegaconf", OmegaConf=None)
    module("torchvision")
    module("torchvision.utils")


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.torch = Float64Torch()
    return mod


def commit(repo: Path) -> str:
    out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True)
    return out.stdout.decode().strip() if out.returncode == 0 else "unknown"


def save(out: Path, case: str, arrays: dict, provenance: dict) -> None:
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    np.savez_compressed(out / f"{case}.npz", provenance=json.dumps(provenance), **arrays)
    print(f"{case}.npz: {', '.join(sorted(arrays))}")


def one_hot(labels: np.ndarray) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.from_numpy(labels), NUM_CLASSES).to(torch.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imm-repo", type=Path, default=os.environ.get("IMM_REPO"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    repo = args.imm_repo.resolve()
    stand_ins()
    preconds = load(repo / "training" / "preconds.py", "official_imm_preconds")
    generate = load(repo / "generate_images.py", "official_imm_generate_images")

    def wrapper(label_dim: int, T: float, eps: float):
        return preconds.IMMPrecond(
            img_resolution=2,
            img_channels=2,
            label_dim=label_dim,
            noise_schedule="fm",
            model_type="StubG",
            sigma_data=SIGMA_D,
            f_type="euler_fm",
            T=T,
            eps=eps,
            temb_type="stride",
            time_scale=1000.0,
        )

    def provenance(file: str, function: str, **extra) -> dict:
        return {
            "repo": URL,
            "commit": commit(repo),
            "file": file,
            "function": function,
            "stub": STUB,
            "sigma_data": SIGMA_D,
            "f_type": "euler_fm",
            "temb_type": "stride",
            "time_scale": 1000.0,
            "generator": "tests/golden/generate_imm.py",
            "torch": torch.__version__,
            "numpy": np.__version__,
            "precision": "float64 (the wrapper's float32 casts run as float64)",
            "layout": "(B, C, H, W), as the official code and this project",
            **extra,
        }

    rng = np.random.RandomState(0)
    B = 16

    # -- the flow map f_{s,t} and the helpers of the training path ----------------------------------
    net = wrapper(NUM_CLASSES, 0.994, 0.0)
    x = rng.randn(B, 2, 2, 2) * 0.8
    t = rng.uniform(0.02, 0.994, B)
    s = t * rng.uniform(0, 1, B)
    s[:3] = t[:3]  # f_{t,t} = identity rows
    labels = rng.randint(0, NUM_CLASSES, B)
    col = (slice(None), None, None, None)  # the official training code passes (B, 1, 1, 1) times
    with torch.no_grad():
        f = net(
            torch.from_numpy(x),
            torch.from_numpy(t)[col],
            torch.from_numpy(s)[col],
            one_hot(labels),
        )
    save(
        args.out,
        "imm_flow_map",
        {"x": x, "t": t, "s": s, "labels": labels, "out_f": f.numpy()},
        provenance("training/preconds.py", "IMMPrecond.forward"),
    )

    data = rng.randn(B, 2, 2, 2) * SIGMA_D
    noise = rng.randn(B, 2, 2, 2) * SIGMA_D
    r = t - rng.uniform(0, 1, B) * (t - s)
    h = 1e-6
    tt, rr, dd, nn = (torch.from_numpy(v) for v in (t, r, data, noise))
    x_t, _ = net.add_noise(dd, tt[col], noise=nn)
    x_r_shared = net.ddim(x_t, dd, tt[col], rr[col], noise=nn)
    x_r_ddim = net.ddim(x_t, dd, tt[col], rr[col])
    save(
        args.out,
        "imm_paths",
        {
            "data": data,
            "noise": noise,
            "t": t,
            "r": r,
            "out_x_t": x_t.numpy(),
            "out_x_r_shared_noise": x_r_shared.numpy(),
            "out_x_r_ddim": x_r_ddim.numpy(),
            "out_logsnr": net.get_logsnr(tt).numpy(),
            "out_logsnr_plus_h": net.get_logsnr(tt + h).numpy(),
            "out_logsnr_minus_h": net.get_logsnr(tt - h).numpy(),
            "h": h,
            "out_eta": net.get_log_nt(tt).exp().numpy(),
            "out_nt_to_t_of_eta": net.nt_to_t(net.get_log_nt(tt).exp()).numpy(),
            "nt_low": net.nt_low,
            "nt_high": net.nt_high,
        },
        provenance(
            "training/preconds.py",
            "IMMPrecond.add_noise, ddim, get_logsnr, get_log_nt, nt_to_t, nt_low, nt_high",
        ),
    )

    # -- the samplers -------------------------------------------------------------------------------
    cases = {
        "imm_pushforward_uniform": dict(fn="pushforward_generator_fn", disc="uniform", cfg=None),
        "imm_pushforward_edm_cfg": dict(fn="pushforward_generator_fn", disc="edm", cfg=1.5),
        "imm_restart_uniform": dict(fn="restart_generator_fn", disc="uniform", cfg=None),
    }
    for case, spec in cases.items():
        arrays = {}
        for T, eps in ((0.994, 0.0), (0.994, 0.006)):
            for steps in (1, 2, 4, 8):
                key = f"T{T}_eps{eps}_N{steps}"
                guided = spec["cfg"] is not None
                net = wrapper(NUM_CLASSES if guided else 0, T, eps)
                latents = torch.from_numpy(rng.randn(B, 2, 2, 2)) * SIGMA_D
                lab = rng.randint(0, NUM_CLASSES, B)
                calls, draws = [], []
                forward = net.cfg_forward

                def spy_forward(x_, t_, s_, *a, _forward=forward, _calls=calls, **kw):
                    _calls.append((float(t_), float(s_)))
                    return _forward(x_, t_, s_, *a, **kw)

                add_noise = net.add_noise

                def spy_noise(y_, t_, noise=None, _add=add_noise, _draws=draws):
                    out, drawn = _add(y_, t_, noise)
                    _draws.append(drawn.numpy())
                    return out, drawn

                net.cfg_forward, net.add_noise = spy_forward, spy_noise
                torch.manual_seed(steps)  # restart's re-noising draws from the global RNG
                with torch.no_grad():
                    out = getattr(generate, spec["fn"])(
                        net,
                        latents,
                        class_labels=one_hot(lab) if guided else None,
                        discretization=spec["disc"],
                        num_steps=steps,
                        cfg_scale=spec["cfg"],
                    )
                arrays[f"{key}_latents"] = latents.numpy()
                arrays[f"{key}_labels"] = lab
                arrays[f"{key}_out"] = out.numpy()
                arrays[f"{key}_calls"] = np.array(calls)  # (t_cur, t_next) of every call
                if draws:
                    arrays[f"{key}_renoise"] = np.stack(draws)
        save(
            args.out,
            case,
            arrays,
            provenance(
                "generate_images.py",
                spec["fn"],
                discretization=spec["disc"],
                cfg_scale=spec["cfg"],
                cases="T, eps in (0.994, 0), (0.994, 0.006); num_steps 1, 2, 4, 8",
            ),
        )


if __name__ == "__main__":
    main()
