"""The mixture-of-LoRA-experts layer that wraps a frozen base projection."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from personafuse.route_plan import RoutePlan
from personafuse.routing import routed_lora


class RoutingState:
    """Gates of the current forward, shared by every MoE layer of one model.

    A plain object (not a module) so that ``copy.deepcopy`` of the model gives the copy its own state
    while all of the copy's layers still share it.
    """

    def __init__(self) -> None:
        self.plan: RoutePlan | None = None
        self.adapters_enabled = True

    @property
    def gates(self) -> torch.Tensor | None:
        return None if self.plan is None else self.plan.gates

    @gates.setter
    def gates(self, gates: torch.Tensor | None) -> None:
        # A new plan per assignment (each prefill): what derives from the gates is computed once for
        # all layers and kept through the decode steps that reuse these gates.
        self.plan = None if gates is None else RoutePlan(gates)

    def require_plan(self) -> RoutePlan:
        if self.plan is None:
            raise RuntimeError(
                "a PersonaFuse layer ran without gates: call the model through PersonaFuseModel "
                "(forward/generate) or inside `fixed_gates(...)`"
            )
        return self.plan


def linear_features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, GPT-2 Conv1D or a bitsandbytes linear."""
    if isinstance(base, Conv1D):
        return base.weight.shape[0], base.weight.shape[1]
    if hasattr(base, "in_features") and hasattr(base, "out_features"):
        return base.in_features, base.out_features
    raise TypeError(f"cannot wrap {type(base).__name__}: expected nn.Linear, Conv1D or a bitsandbytes Linear")


def compute_dtype(device: torch.device, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype the routed delta runs in: autocast's (bf16/fp16 MMA, master weights stay fp32) when it is on
    for ``device``, else the LoRA weights' own. Casting explicitly also reaches the Triton path, which
    autocast does not see."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weight_dtype


class MoELoraLinear(nn.Module):
    """``y = base(x) + scaling * sum_k g_k B_k A_k dropout(x)`` with the K experts stored stacked.

    ``lora_A`` is ``[K*r, in]`` and ``lora_B`` is ``[out, K*r]``: one GEMM each over all experts.
    ``B`` starts at zero (standard LoRA), so a fresh stack leaves the base model unchanged.
    """

    def __init__(self, base: nn.Module, num_experts: int, r: int, alpha: float, dropout: float, state: RoutingState):
        super().__init__()
        if r <= 0 or num_experts <= 0:
            raise ValueError(f"rank and number of experts must be positive, got r={r}, K={num_experts}")
        self.base_layer = base
        self.in_features, self.out_features = linear_features(base)
        self.num_experts, self.r, self.alpha = num_experts, r, alpha
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.state = state
        weight_device = next(base.parameters()).device
        self.lora_A = nn.Parameter(torch.empty(num_experts * r, self.in_features, device=weight_device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, num_experts * r, device=weight_device))
        for k in range(num_experts):
            nn.init.kaiming_uniform_(self.lora_A.data[k * r : (k + 1) * r], a=math.sqrt(5))
        self._cast: tuple | None = None  # (key, A, B) in the autocast dtype, see weights_in

    def expert_weights(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of expert k's ``A [r, in]`` and ``B [out, r]``."""
        rows = slice(k * self.r, (k + 1) * self.r)
        return self.lora_A[rows], self.lora_B[:, rows]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if not self.state.adapters_enabled:
            return result
        plan = self.state.require_plan()
        dtype = compute_dtype(x.device, self.lora_A.dtype)
        A, B = self.weights_in(dtype)
        if x.dtype != dtype:
            x = x.to(dtype)
        if self.training:  # dropout is the identity in eval: not even a module call per decode step
            x = self.dropout(x)
        if result.dtype == dtype and result.is_contiguous():  # add into the base output in place: one pass less
            return routed_lora(x, A, B, plan, self.scaling, out=result)
        delta = routed_lora(x, A, B, plan, self.scaling)
        return result + delta.to(result.dtype)

    def weights_in(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``lora_A``, ``lora_B`` in ``dtype``. A differentiable cast while they train (the fp32 masters get the
        gradient); otherwise one cached copy until the weights change, so decode steps reuse it (and the
        route plan's per-layer caches, keyed by tensor identity, keep hitting)."""
        A, B = self.lora_A, self.lora_B
        if A.dtype == dtype and B.dtype == dtype:
            return A, B
        if torch.is_grad_enabled() and (A.requires_grad or B.requires_grad):
            return A.to(dtype), B.to(dtype)
        key = (dtype, A.device, A._version, B._version)
        if self._cast is None or self._cast[0] != key:
            self._cast = (key, A.detach().to(dtype), B.detach().to(dtype))
        return self._cast[1], self._cast[2]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, r={self.r}, alpha={self.alpha}"
