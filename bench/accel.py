"""Speed switches that depend on the device: TF32, bf16 autocast, torch.compile, checkpointing.

One place decides how the fast paths are turned on, so the trainer, the evaluator and
``bench.perf`` make the same choices from the same config keys (``sweeps/train/*.yaml``):

* ``precision`` -- ``auto`` (bf16 on CUDA, fp32 on CPU), ``bf16`` or ``fp32``. bf16 is autocast
  around the forwards only: weights, gradients, optimizer state and the EMA stay fp32 (master
  weights), so no loss scaling is needed (fp16 would need it and is not offered). A method's
  no-grad target or teacher forwards run inside the same context, hence in the same precision.
* ``tf32`` -- float32 matmuls and convolutions on CUDA may use TF32 (``configure``). Ignored on CPU.
* ``compile`` -- ``false`` or a ``torch.compile`` mode (``compile_model``).
* ``grad_checkpoint`` -- recompute each DiT block in the backward (``bench.dit.DiT``): less memory,
  about one extra forward of time; the values are unchanged.

On CPU every default is the plain fp32 path, so results there stay bitwise reproducible.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn

from bench.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _get(cfg, key: str, default):
    """``cfg.key`` for a DictConfig, a dict or None (the trainer's config may predate a key)."""
    if cfg is None:
        return default
    value = cfg.get(key, default)
    return default if value is None else value


def resolve_precision(device: torch.device, precision: str) -> str:
    """``auto`` -> ``bf16`` on CUDA cards that support it, ``fp32`` elsewhere."""
    if precision not in PRECISIONS:
        raise UserError(
            f"precision={precision!r} is not allowed; choose one of {', '.join(PRECISIONS)}"
        )
    cuda = torch.device(device).type == "cuda"
    if precision == "auto":
        return "bf16" if cuda and _cuda_bf16() else "fp32"
    if precision == "bf16" and cuda and not _cuda_bf16():
        raise UserError(f"precision=bf16 but {torch.cuda.get_device_name()} has no bf16; use fp32")
    return precision


@functools.cache
def _cuda_bf16() -> bool:  # asked once per process, not at every step
    return torch.cuda.is_bf16_supported()


def configure(device: torch.device, cfg=None) -> None:
    """Process-wide switches for ``device``: TF32 matmuls and convolutions on CUDA (``cfg.tf32``,
    default on). Call once before training; CPU needs nothing."""
    if torch.device(device).type != "cuda":
        return
    on = bool(_get(cfg, "tf32", True))
    # The long-standing switches, not torch >= 2.9's ``fp32_precision``: once that is set, reading
    # ``allow_tf32`` raises (a "mix of the legacy and new APIs"), and torch.compile still reads it.
    torch.set_float32_matmul_precision("high" if on else "highest")
    torch.backends.cudnn.allow_tf32 = on


@contextlib.contextmanager
def autocast(device: torch.device, precision: str = "auto") -> Iterator[None]:
    """``with autocast(device, precision):`` around forwards (the loss, sampling). The backward
    and the optimizer step stay outside it; parameters are never cast."""
    if resolve_precision(device, precision) == "fp32":
        yield
        return
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        yield


def compile_mode(value) -> str | None:
    """A config's ``compile`` value -> a torch.compile mode, or None for off."""
    if value in (None, False, "false", "none", "off"):
        return None
    if value is True or value == "true":
        return "default"
    if value not in COMPILE_MODES:
        raise UserError(
            f"compile={value!r} is not allowed; choose false or one of {', '.join(COMPILE_MODES)}"
        )
    return value


def compile_model(net: nn.Module, mode=None, backend: str = "inductor") -> nn.Module:
    """Compile ``net`` in place (``nn.Module.compile``) and return it; ``mode`` None or false does
    nothing. In place, so ``state_dict`` keys and checkpoints are unchanged; calling it twice is
    harmless. A network with a ``blocks`` ModuleList (the DiT) has each block compiled instead of
    the whole: identical blocks share one compiled graph per input shape, so compile time does not
    grow with depth (XL's 28 blocks compile once); embeddings and the final layer stay eager.

    Caveats: ``dynamic=False``, so each new input shape compiles once more (a shortcut step has
    two: the bootstrap rows and the full batch; an evaluation's last partial batch another) and
    after ``torch._dynamo.config.cache_size_limit`` shapes the forward falls back to eager. The
    first calls take seconds to minutes (bench.perf's warm-up absorbs them). ``copy.deepcopy``
    of a compiled module is not compiled (the EMA copy, teachers): compile those separately.
    ``reduce-overhead`` uses CUDA graphs, whose outputs are overwritten by the next call.
    On CPU it needs a C++ compiler and rarely pays for small models. ``backend`` other than
    inductor (``aot_eager``, ``eager``) only checks that the model traces (fast; for smoke runs)."""
    mode = compile_mode(mode)
    if mode is None:
        return net
    kw = {"mode": mode} if backend == "inductor" else {"backend": backend}
    blocks = getattr(net, "blocks", None)
    for m in list(blocks) if isinstance(blocks, nn.ModuleList) else [net]:
        if getattr(m, "_compiled_call_impl", None) is None:
            m.compile(dynamic=False, **kw)
    return net


def prepare_model(net: nn.Module, cfg) -> nn.Module:
    """Apply ``cfg.grad_checkpoint`` and ``cfg.compile`` (a train config) to a freshly built net."""
    if _get(cfg, "grad_checkpoint", False):
        if not hasattr(net, "grad_checkpoint"):
            raise UserError(
                f"train.grad_checkpoint=true needs a DiT size; {type(net).__name__} has no blocks "
                "to checkpoint"
            )
        net.grad_checkpoint = True
    return compile_model(net, _get(cfg, "compile", False))
