"""Fused router: logits -> temperature softmax -> optional top-k renormalisation -> gates, plus load.

Reference: ``personafuse.routing.compute_gates_torch``. One program owns a tile of rows (sequences
or tokens) and all K <= 64 experts, so the whole chain is one read of the logits and one write of
the gates; per-expert selection counts for the balance loss are summed per tile and added
atomically.

Backward is the softmax formula on the saved gates, ``dz = g * (dg - <g, dg>) / T``. It is exact
for top-k too: renormalised top-k gates are a softmax over the selected logits, and the formula
gives zero for the others because their gate is zero.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from personafuse.routing import compute_gates_torch

MAX_EXPERTS = 64
# Rows per program; a module attribute so tests can shrink it to exercise several tiles.
BLOCK_ROWS = 32


@triton.jit
def _router_kernel(
    LOGITS, GATES, COUNTS,
    n_rows, n_experts, temperature, stride_l, stride_g,
    TOP_K: tl.constexpr, DENSE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    col_ok = cols < n_experts
    ok = row_ok[:, None] & col_ok[None, :]

    # Padding rows load 0 (finite, then ignored); padding experts get -inf so their probability is 0.
    z = tl.load(LOGITS + rows64[:, None] * stride_l + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    z = tl.where(col_ok[None, :], z / temperature, float("-inf"))
    e = tl.exp(z - tl.max(z, 1)[:, None])
    probs = e / tl.sum(e, 1)[:, None]

    # Top-k by repeated arg-max (lowest index wins ties); dense routing counts its top-1 as load.
    chosen = tl.zeros((BLOCK_ROWS, BLOCK_K), dtype=tl.int1)
    remaining = tl.where(col_ok[None, :], probs, -1.0)
    for _ in tl.static_range(TOP_K):
        best = tl.max(remaining, 1)
        idx = tl.min(tl.where(remaining == best[:, None], cols[None, :], BLOCK_K), 1)
        hit = cols[None, :] == idx[:, None]
        chosen = chosen | hit
        remaining = tl.where(hit, -1.0, remaining)

    if DENSE:
        gates = probs
    else:
        kept = tl.where(chosen, probs, 0.0)
        gates = kept / tl.sum(kept, 1)[:, None]
    tl.store(GATES + rows64[:, None] * stride_g + cols[None, :], gates.to(GATES.dtype.element_ty), mask=ok)
    counts = tl.sum((chosen & row_ok[:, None]).to(tl.float32), 0)
    tl.atomic_add(COUNTS + cols, counts, mask=col_ok)


class ComputeGatesFunction(torch.autograd.Function):
    """Kernel forward; softmax-Jacobian backward in PyTorch (two small elementwise ops on [rows, K])."""

    @staticmethod
    def forward(ctx, logits2, temperature, top_k):
        n_rows, n_experts = logits2.shape
        gates = torch.empty_like(logits2)
        counts = torch.zeros(n_experts, device=logits2.device, dtype=torch.float32)
        grid = (triton.cdiv(n_rows, BLOCK_ROWS),)
        _router_kernel[grid](
            logits2, gates, counts,
            n_rows, n_experts, float(temperature), logits2.stride(0), gates.stride(0),
            TOP_K=top_k or 1, DENSE=top_k is None,
            BLOCK_ROWS=BLOCK_ROWS, BLOCK_K=max(16, triton.next_power_of_2(n_experts)),
        )
        load = counts / (n_rows * (top_k or 1))
        ctx.save_for_backward(gates)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(load)
        return gates, load

    @staticmethod
    def backward(ctx, dgates, _dload):
        (gates,) = ctx.saved_tensors
        g = gates.float()
        dg = dgates.float()
        dz = g * (dg - (g * dg).sum(-1, keepdim=True)) / ctx.temperature
        return dz.to(gates.dtype), None, None


def compute_gates(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``compute_gates``; same contract as ``personafuse.routing.compute_gates``.

    More than ``MAX_EXPERTS`` experts (one program holds a row's experts in registers) falls back to
    the PyTorch path rather than failing, as do empty inputs.
    """
    if not (logits.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise RuntimeError(
            f"the Triton router needs CUDA tensors (got {logits.device}); set TRITON_INTERPRET=1 to run it "
            "on the CPU for testing, or use personafuse.routing.compute_gates_torch"
        )
    if temperature <= 0:
        raise ValueError(f"router temperature must be > 0, got {temperature}")
    num_experts = logits.shape[-1]
    if top_k is not None and not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"router logits must be fp32, fp16 or bf16, got {logits.dtype}")
    if num_experts > MAX_EXPERTS or logits.numel() == 0:
        return compute_gates_torch(logits, temperature, top_k)
    logits2 = logits.reshape(-1, num_experts)
    if logits2.stride(1) != 1:
        logits2 = logits2.contiguous()
    gates, load = ComputeGatesFunction.apply(logits2, float(temperature), top_k)
    return gates.view(logits.shape), load
