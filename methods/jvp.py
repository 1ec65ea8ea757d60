"""The forward-mode JVP through the network, shared by every method that differentiates the network
along a direction (MeanFlow's ``du/dt``, sCM's ``dF/dt``).

``jvp(method, fn, primals, tangents) -> (fn(primals), J_fn(primals) . tangents)`` is
``torch.func.jvp`` with three things every such method needs, in one place:

* **fp32.** Autocast is switched off inside, so under ``train.precision=bf16`` the primal output
  and the tangent are computed in fp32, as the official PyTorch MeanFlow code and NVIDIA FastGen's
  sCM (``precision_amp_jvp = None``) do: the target is a derivative, and bf16 keeps ~3 digits.
* **A math-SDPA fallback.** Forward-mode AD has no rule for the flash and memory-efficient
  attention kernels, so the JVP runs with the math kernel (slower on a GPU, the same numbers).
* **Refusals in one sentence** where the tangent would silently be wrong or the call fails:
  activation checkpointing (recomputation drops the tangents) and a ``torch.compile``-d network
  (compiled code under ``torch.func.jvp`` is untested here).

``torch.func.jvp`` is looked up at call time (not imported by name), so a test can patch it.
Through ``torch.func`` the call bypasses a DDP wrapper's hooks: a method using this helper sets
``explicit_grad_sync = True`` and the trainer all-reduces the gradients itself. Cost: the tangent
pass counts one forward-equivalent per row (``bench/budget.py``), on top of the primal forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.errors import UserError


def check_jvp_able(net: nn.Module, method: str) -> None:
    """Refuse, in one sentence naming the option, a network whose JVP would be wrong or untested."""
    if getattr(net, "grad_checkpoint", False):  # recomputation would drop the tangents
        raise UserError(
            f"train.grad_checkpoint=true does not work with {method}: activation checkpointing "
            "cannot replay its JVP; use train.grad_checkpoint=false"
        )
    if any(getattr(m, "_compiled_call_impl", None) is not None for m in net.modules()):
        # Not that it is known to fail: that compiled code keeps forward-mode tangents right
        # has not been checked here, and a wrong tangent is a silently wrong target.
        raise UserError(
            f"train.compile does not work with {method} here: torch.compile under torch.func.jvp "
            "is untested in this harness; use train.compile=false"
        )


def jvp(
    net: nn.Module,
    method: str,
    fn: Callable[..., Tensor],
    primals: tuple[Tensor, ...],
    tangents: tuple[Tensor, ...],
) -> tuple[Tensor, Tensor]:
    """``(fn(*primals), d/de fn(*(primals + e tangents)) at e = 0)`` in fp32 with math attention.

    ``fn`` is a function of tensors that calls ``net`` (checked by ``check_jvp_able``; ``method``
    names the caller in the refusal). The primal output keeps its autograd graph (a method may
    train through it); the tangent is returned as computed -- detach it where it is a target.
    """
    check_jvp_able(net, method)
    device = primals[0].device.type
    with sdpa_kernel(SDPBackend.MATH), torch.autocast(device, enabled=False):
        return torch.func.jvp(fn, primals, tangents)
