"""Fused Triton kernels for routing; importing this package registers the ``"triton"`` backend.

The import is cheap and never fails: Triton and the kernel modules load on the first call, so a
machine without Triton or a GPU still imports ``personafuse.kernels`` and simply reports, through
``supports``, that the backend cannot run there. Loading lazily also lets the test suite set
``TRITON_INTERPRET=1`` before Triton is imported.
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch


def _find_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: a blocked or half-initialised ``triton`` module
        return False


TRITON_AVAILABLE = _find_triton()


# Private names: the public ``routed_lora``/``router`` attributes are the submodules, and importing a
# submodule would overwrite a package attribute of the same name.
def device_guard(device: torch.device):
    """Triton launches on the *current* CUDA device; a layer on ``cuda:1`` (``device_map="auto"``) must
    launch there, not on ``cuda:0``. Backward needs no guard: autograd runs it on the device's own thread."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _routed_lora(x, A, B, gates, scaling, out=None):
    """See ``personafuse.kernels.routed_lora.routed_lora``."""
    from .routed_lora import routed_lora as fused

    with device_guard(x.device):
        return fused(x, A, B, gates, scaling, out=out)


def _compute_gates(logits, temperature=1.0, top_k=None):
    """See ``personafuse.kernels.router.compute_gates``."""
    from .router import compute_gates as fused

    with device_guard(logits.device):
        return fused(logits, temperature, top_k)


VERIFIED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def supports(tensor: torch.Tensor) -> bool:
    """CUDA tensors of a dtype the kernels are tested in, bf16 only where the GPU has bf16 MMA (sm80+), with
    Triton installed. CPU tensors never: the interpreter is for tests only."""
    if not (TRITON_AVAILABLE and tensor.is_cuda and tensor.dtype in VERIFIED_DTYPES):
        return False
    return tensor.dtype != torch.bfloat16 or torch.cuda.get_device_capability(tensor.device) >= (8, 0)


# From the repo root this folder is also importable as a top-level ``kernels`` (transformers probes for
# Hugging Face's package of that name); only the installed ``personafuse.kernels`` registers itself.
if __name__ == "personafuse.kernels":
    from personafuse.routing import Kernels, register_backend

    register_backend("triton", Kernels(routed_lora=_routed_lora, compute_gates=_compute_gates, supports=supports))

__all__ = ["TRITON_AVAILABLE", "supports"]
