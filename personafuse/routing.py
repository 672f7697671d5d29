"""Where routing happens: router logits -> gates, and the gated sum of LoRA experts.

Both functions are the single entry points the rest of the library calls. The PyTorch path here is
the reference and the CPU implementation; fused Triton kernels (``personafuse.kernels``) register
themselves as a backend and are picked for CUDA tensors. ``PERSONAFUSE_BACKEND=torch|triton|auto``
(or ``set_backend``) forces a choice.
"""

from __future__ import annotations

import collections
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from personafuse.route_plan import RoutePlan, dense_delta, lean_add, needs_grad, sparse_delta

BACKEND_ENV = "PERSONAFUSE_BACKEND"
_BACKENDS = ("auto", "torch", "triton")
_forced_backend: str | None = None
PATH_ENV = "PERSONAFUSE_ROUTED_PATH"
_PATHS = ("auto", "dense", "sparse")
_forced_path: str | None = None
# Calls per path ("torch-dense", "torch-sparse", "triton"): which path ran is observable, not guessed.
path_counts: collections.Counter = collections.Counter()


@dataclass
class Kernels:
    """A backend's implementations; ``supports(tensor)`` says whether it can run on that tensor."""

    routed_lora: Callable[..., torch.Tensor]
    compute_gates: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    supports: Callable[[torch.Tensor], bool]


_registry: dict[str, Kernels] = {}


def register_backend(name: str, kernels: Kernels) -> None:
    _registry[name] = kernels


def set_backend(name: str | None) -> None:
    """Force a backend for this process (``None`` returns to the environment/auto choice)."""
    if name is not None and name not in _BACKENDS:
        raise ValueError(f"unknown routing backend {name!r}; choose one of {_BACKENDS}")
    global _forced_backend
    _forced_backend = name


def active_backend(tensor: torch.Tensor) -> str:
    """The backend that will run for ``tensor``: forced choice, else env, else triton on CUDA when available."""
    choice = _forced_backend or os.environ.get(BACKEND_ENV, "auto")
    if choice not in _BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={choice!r} is not one of {_BACKENDS}")
    if choice == "torch":
        return "torch"
    if "triton" not in _registry:
        _try_load_kernels()
    kernels = _registry.get("triton")
    usable = kernels is not None and kernels.supports(tensor)
    if choice == "triton" and not usable:
        raise RuntimeError(
            f"{BACKEND_ENV}=triton but the Triton kernels cannot run here "
            f"({'not installed' if kernels is None else f'unsupported tensor on {tensor.device}'})"
        )
    return "triton" if usable else "torch"


def set_routed_path(name: str | None) -> None:
    """Force the torch path's choice (``dense``/``sparse``; ``None`` returns to the environment/auto choice)."""
    if name is not None and name not in _PATHS:
        raise ValueError(f"unknown routed-LoRA path {name!r}; choose one of {_PATHS}")
    global _forced_path
    _forced_path = name


def routed_path() -> str:
    """The requested torch path: forced choice, else ``PERSONAFUSE_ROUTED_PATH``, else ``auto``."""
    choice = _forced_path or os.environ.get(PATH_ENV, "auto")
    if choice not in _PATHS:
        raise ValueError(f"{PATH_ENV}={choice!r} is not one of {_PATHS}")
    return choice


def _try_load_kernels() -> None:
    with contextlib.suppress(ImportError):
        import personafuse.kernels  # noqa: F401  (registers the "triton" backend on import)


def _check_gates(x: torch.Tensor, gates: torch.Tensor, num_rows: int) -> tuple[int, bool]:
    """Validate shapes; returns (rank per expert, per_token)."""
    num_experts = gates.shape[-1]
    if num_rows % num_experts:
        raise ValueError(f"lora_A has {num_rows} rows, not a multiple of the {num_experts} gates")
    per_token = gates.dim() == x.dim()
    lead = x.shape[:-1] if per_token else x.shape[:-2]
    if gates.shape[:-1] != lead:
        raise ValueError(
            f"gates of shape {tuple(gates.shape)} do not match input {tuple(x.shape)}: expected "
            f"{tuple(x.shape[:-2])} + (K,) per sequence or {tuple(x.shape[:-1])} + (K,) per token"
        )
    return num_rows // num_experts, per_token


def routed_lora(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gates: torch.Tensor | RoutePlan, scaling: float,
    out: torch.Tensor | None = None, path: str | None = None,
) -> torch.Tensor:
    """``scaling * sum_k g_k * B_k A_k x`` for K experts stored stacked.

    Args:
        x: ``[..., T, d_in]`` activations.
        A: ``[K*r, d_in]`` stacked down-projections (expert k owns rows ``k*r:(k+1)*r``).
        B: ``[d_out, K*r]`` stacked up-projections.
        gates: ``[..., K]`` per sequence (one dim fewer than ``x``) or ``[..., T, K]`` per token, or a
            ``RoutePlan`` of them (what a model's layers share, so gate preparation happens once).
        scaling: LoRA ``alpha / r``.
        out: optional ``[..., T, d_out]`` tensor (the base layer's output) the delta is added into in
            place and which is returned; the Triton kernels fuse that add into their last write.
        path: torch path, ``"auto"`` (default, see ``set_routed_path``), ``"dense"`` or ``"sparse"``.
    """
    plan = gates if isinstance(gates, RoutePlan) else RoutePlan(gates)
    if active_backend(x) == "triton":
        path_counts["triton"] += 1
        return _registry["triton"].routed_lora(x, A, B, plan.gates_as(A.dtype), scaling, out=out)
    return routed_lora_torch(x, A, B, plan, scaling, out=out, path=path)


def routed_lora_torch(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gates: torch.Tensor | RoutePlan, scaling: float,
                      out: torch.Tensor | None = None, path: str | None = None) -> torch.Tensor:
    """The PyTorch path: dense two GEMMs over all experts, or only the selected experts' r-blocks."""
    plan = gates if isinstance(gates, RoutePlan) else RoutePlan(gates)
    r, per_token = _check_gates(x, plan.gates, A.shape[0])
    chosen = plan.path(per_token, path or routed_path())
    path_counts[f"torch-{chosen}"] += 1
    if out is not None and out.is_contiguous() and not needs_grad(x, A, B, plan.gates, out):
        return lean_add(x, A, B, plan, r, per_token, scaling, chosen, out)
    if chosen == "dense":
        delta = dense_delta(x, A, B, plan, r, per_token, scaling)
    else:
        delta = sparse_delta(x, A, B, plan, r, scaling)
    return delta if out is None else out.add_(delta)


def routed_lora_reference(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gates: torch.Tensor | RoutePlan,
                          scaling: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """A loop over experts: slow and obviously right; tests and benchmarks compare against it."""
    gates = gates.gates_as(A.dtype) if isinstance(gates, RoutePlan) else gates
    r, per_token = _check_gates(x, gates, A.shape[0])
    total = torch.zeros(*x.shape[:-1], B.shape[0], dtype=x.dtype, device=x.device)
    for k in range(gates.shape[-1]):
        g = gates[..., k].unsqueeze(-1)
        if not per_token:
            g = g.unsqueeze(-1)
        total = total + g * (x @ A[k * r : (k + 1) * r].T @ B[:, k * r : (k + 1) * r].T)
    delta = total * scaling
    return delta if out is None else out.add_(delta)  # same contract as routed_lora


def compute_gates(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits ``[..., K]`` -> (gates, per-expert load).

    Gates are a temperature softmax; with ``top_k`` only the k largest survive, renormalised to sum
    to 1. ``load[k]`` is the fraction of rows whose top-k (top-1 when dense) includes expert k, the
    ``f_k`` of the Switch load-balancing loss.
    """
    if temperature <= 0:
        raise ValueError(f"router temperature must be > 0, got {temperature}")
    if active_backend(logits) == "triton":
        return _registry["triton"].compute_gates(logits, temperature, top_k)
    return compute_gates_torch(logits, temperature, top_k)


def compute_gates_torch(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    num_experts = logits.shape[-1]
    if top_k is not None and not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    chosen = torch.topk(probs, top_k or 1, dim=-1).indices
    mask = torch.zeros_like(probs).scatter_(-1, chosen, 1.0)
    load = mask.reshape(-1, num_experts).mean(0) / (top_k or 1)
    if top_k is None:
        return probs.to(logits.dtype), load
    kept = probs * mask
    return (kept / kept.sum(-1, keepdim=True)).to(logits.dtype), load
