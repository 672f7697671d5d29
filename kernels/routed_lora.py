"""Fused routed LoRA: ``y = scaling * sum_k g_k * B_k A_k x`` in three Triton kernels.

Reference: ``personafuse.routing.routed_lora_torch`` (two GEMMs) and ``routed_lora_reference`` (a loop).

Every product in the forward and backward pass is one of three shapes, so three kernels cover all
six of them, each called with strided views instead of transposed copies:

* ``_shrink``: ``u = x @ W^T`` into a thin ``[M, K*r]`` tensor, one program per (row tile, expert);
  the gate scaling happens in the epilogue. Forward: ``hg = s*g*(x A^T)``; backward:
  ``dh = s*g*(dy B)`` plus ``dgates = s * rowsum(h * dy B)`` per expert.
* ``_expand``: ``y (+)= u @ W^T`` over the K experts' r-blocks. Forward: ``y = hg B^T``; backward:
  ``dx = dh A``.
* ``_wgrad``: ``out = V^T @ u`` reducing over rows. Backward: ``dB = dy^T hg`` and ``dA = dh^T x``.

An expert's r-block is skipped for a row tile whose gates for that expert are all zero (top-k
routing, per-sequence gates): its contribution is exactly zero. The two shrinks skip only when no
gate gradient is wanted, because ``d/dg_k`` is not zero where ``g_k`` is.

Accumulation is fp32; intermediates (``hg``, ``dh``) are stored in the input dtype, as the PyTorch
path does. fp32 inputs use IEEE dot products, matching torch's default of no TF32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from personafuse.routing import _check_gates

# Tile sizes. Module attributes, not constants inlined at the call sites, so tests can shrink them
# to exercise several tiles and ragged edges at the small shapes the interpreter can afford.
BLOCK_M = 64
BLOCK_N = 64
BLOCK_D = 64
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _any_nonzero(g):
    # `!= 0` rather than `abs(g) > 0` so NaN gates are not skipped and still poison the output.
    return tl.sum((g != 0).to(tl.int32), 0) > 0


@triton.jit
def _shrink_kernel(
    X, W, G, OUT, H_SAVE, H_IN, DG,
    M, D, R, rows_per_gate, scale,
    sxm, sxd, swr, swd, sgm, sgk, som, sor, shm, shr, sdm, sdk,
    SKIP_ZERO: tl.constexpr, SAVE_H: tl.constexpr, DGATES: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Expert is the fastest grid axis: the K programs that read the same x tile run together (L2 hits).
    k = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < R
    cols = k * R + ranks
    gate_rows = rows64 // rows_per_gate
    g = tl.load(G + gate_rows * sgm + k * sgk, mask=row_ok, other=0.0).to(tl.float32)

    n_chunks = tl.cdiv(D, BLOCK_D)
    if SKIP_ZERO:
        n_chunks = tl.where(_any_nonzero(g), n_chunks, 0)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for i in range(n_chunks):
        ds = i * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        xt = tl.load(X + rows64[:, None] * sxm + ds[None, :] * sxd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        wt = tl.load(W + cols[None, :] * swr + ds[:, None] * swd, mask=rank_ok[None, :] & d_ok[:, None], other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)

    tile_ok = row_ok[:, None] & rank_ok[None, :]
    if DGATES:
        h = tl.load(H_IN + rows64[:, None] * shm + cols[None, :] * shr, mask=tile_ok, other=0.0)
        tl.atomic_add(DG + gate_rows * sdm + k * sdk, tl.sum(acc * h.to(tl.float32), 1) * scale, mask=row_ok)
    if SAVE_H:
        tl.store(H_SAVE + rows64[:, None] * shm + cols[None, :] * shr, acc, mask=tile_ok)
    out = acc * (g * scale)[:, None]
    tl.store(OUT + rows64[:, None] * som + cols[None, :] * sor, out.to(OUT.dtype.element_ty), mask=tile_ok)


@triton.jit
def _expand_kernel(
    U, W, G, Y,
    M, N, R, num_experts, rows_per_gate,
    sum_, sur, swn, swr, sgm, sgk, sym, syn,
    ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < R
    gate_rows = rows64 // rows_per_gate

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(num_experts):
        g = tl.load(G + gate_rows * sgm + k * sgk, mask=row_ok, other=0.0)
        if _any_nonzero(g):
            j = k * R + ranks
            ut = tl.load(U + rows64[:, None] * sum_ + j[None, :] * sur, mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
            wt = tl.load(W + j[:, None] * swr + cols[None, :] * swn, mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(ut, wt, acc, input_precision=PRECISION)

    y_ptrs = Y + rows64[:, None] * sym + cols[None, :] * syn
    tile_ok = row_ok[:, None] & col_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(y_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=tile_ok)


@triton.jit
def _wgrad_kernel(
    V, U, G, OUT,
    M, N, R, rows_per_gate,
    svm, svn, sum_, sur, sgm, sgk, son, sor,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    k = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < R
    j = k * R + ranks

    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows64 = rows.to(tl.int64)
        g = tl.load(G + (rows64 // rows_per_gate) * sgm + k * sgk, mask=row_ok, other=0.0)
        if _any_nonzero(g):
            vt = tl.load(V + rows64[None, :] * svm + cols[:, None] * svn, mask=row_ok[None, :] & col_ok[:, None], other=0.0)
            ut = tl.load(U + rows64[:, None] * sum_ + j[None, :] * sur, mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
            acc = tl.dot(vt, ut, acc, input_precision=PRECISION)

    tl.store(OUT + cols[:, None] * son + j[None, :] * sor, acc.to(OUT.dtype.element_ty), mask=col_ok[:, None] & rank_ok[None, :])


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _shrink(x, w, gates, rows_per_gate, scale, out, *, skip_zero, h_save=None, h_in=None, dgates=None):
    """``out = scale * g * (x @ w^T)`` per r-block; optionally save the ungated product or add dgates."""
    m, d = x.shape
    num_experts = gates.shape[1]
    r = w.shape[0] // num_experts
    h = h_save if h_save is not None else h_in
    dg = dgates if dgates is not None else gates
    grid = (num_experts, triton.cdiv(m, BLOCK_M))
    _shrink_kernel[grid](
        x, w, gates, out, h_save, h_in, dgates,
        m, d, r, rows_per_gate, scale,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), gates.stride(0), gates.stride(1),
        out.stride(0), out.stride(1),
        h.stride(0) if h is not None else 0, h.stride(1) if h is not None else 0,
        dg.stride(0), dg.stride(1),
        SKIP_ZERO=skip_zero, SAVE_H=h_save is not None, DGATES=dgates is not None,
        PRECISION=_precision(x.dtype), BLOCK_M=BLOCK_M, BLOCK_R=_block_r(r), BLOCK_D=BLOCK_D,
    )


def _expand(u, w, gates, rows_per_gate, y, *, accumulate):
    """``y (+)= u @ w^T`` where ``u``'s r-blocks are already gated; zero-gate blocks are skipped."""
    m, n = y.shape
    num_experts = gates.shape[1]
    r = u.shape[1] // num_experts
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(m, BLOCK_M))
    _expand_kernel[grid](
        u, w, gates, y,
        m, n, r, num_experts, rows_per_gate,
        u.stride(0), u.stride(1), w.stride(0), w.stride(1), gates.stride(0), gates.stride(1),
        y.stride(0), y.stride(1),
        ACCUMULATE=accumulate, PRECISION=_precision(u.dtype),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=_block_r(r),
    )


def _wgrad(v, u, gates, rows_per_gate, out):
    """``out = v^T @ u`` (``[N, K*r]``), reducing over rows, skipping row tiles whose gate is zero."""
    m, n = v.shape
    num_experts = gates.shape[1]
    r = u.shape[1] // num_experts
    grid = (num_experts, triton.cdiv(n, BLOCK_N))
    _wgrad_kernel[grid](
        v, u, gates, out,
        m, n, r, rows_per_gate,
        v.stride(0), v.stride(1), u.stride(0), u.stride(1), gates.stride(0), gates.stride(1),
        out.stride(0), out.stride(1),
        PRECISION=_precision(v.dtype), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=_block_r(r),
    )


class RoutedLoRAFunction(torch.autograd.Function):
    """Autograd wrapper over the kernels on flattened 2-D operands (see ``routed_lora`` for shapes)."""

    @staticmethod
    def forward(ctx, out, x2, A, B, gates2, rows_per_gate, scaling, want_dgates):
        # ``out`` comes first: autograd's in-place bookkeeping for a dirtied view input (CopySlices)
        # assumes the modified tensor is the Function's first input.
        m = x2.shape[0]
        hg = torch.empty(m, A.shape[0], device=x2.device, dtype=x2.dtype)
        h = torch.empty(m, A.shape[0], device=x2.device, dtype=torch.float32) if want_dgates else None
        _shrink(x2, A, gates2, rows_per_gate, scaling, hg, skip_zero=not want_dgates, h_save=h)
        accumulate = out is not None
        if accumulate:
            ctx.mark_dirty(out)
            y2 = out.view(m, B.shape[0])
        else:
            y2 = out = torch.empty(m, B.shape[0], device=x2.device, dtype=x2.dtype)
        _expand(hg, B, gates2, rows_per_gate, y2, accumulate=accumulate)
        ctx.save_for_backward(x2, A, B, gates2, hg, h)
        ctx.rows_per_gate, ctx.scaling, ctx.accumulate = rows_per_gate, scaling, accumulate
        return out

    @staticmethod
    def backward(ctx, dy):
        x2, A, B, gates2, hg, h = ctx.saved_tensors
        need_dout, need_dx, need_dA, need_dB, need_dg = ctx.needs_input_grad[:5]
        rpg = ctx.rows_per_gate
        dout = dy if ctx.accumulate and need_dout else None
        dy = dy.reshape(x2.shape[0], B.shape[0]).to(x2.dtype)
        dx = dA = dB = dgates = None
        if need_dx or need_dA or need_dg:
            dh = torch.empty_like(hg)
            dg32 = torch.zeros(gates2.shape, device=dy.device, dtype=torch.float32) if need_dg else None
            _shrink(dy, B.t(), gates2, rpg, ctx.scaling, dh, skip_zero=not need_dg, h_in=h, dgates=dg32)
            if need_dx:
                dx = torch.empty_like(x2)
                _expand(dh, A.t(), gates2, rpg, dx, accumulate=False)
            if need_dA:
                dA = torch.empty_like(A)
                _wgrad(x2, dh, gates2, rpg, dA.t())
            if need_dg:
                dgates = dg32.to(gates2.dtype)
        if need_dB:
            dB = torch.empty_like(B)
            _wgrad(dy, hg, gates2, rpg, dB)
        return dout, dx, dA, dB, dgates, None, None, None


def routed_lora(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    gates: torch.Tensor,
    scaling: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused ``scaling * sum_k g_k * B_k A_k x``; same contract as ``personafuse.routing.routed_lora``.

    With ``out`` (the base layer's output, ``[..., T, d_out]``) the delta is added into it in place
    and ``out`` is returned, saving a full read and write of the output compared with ``out + delta``.
    """
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise RuntimeError(
            f"the Triton routed LoRA needs CUDA tensors (got {x.device}); set TRITON_INTERPRET=1 to run "
            "it on the CPU for testing, or use personafuse.routing.routed_lora_torch"
        )
    if x.dim() < 2:
        raise ValueError(f"x must be [..., T, d_in], got shape {tuple(x.shape)}")
    if not (x.dtype == A.dtype == B.dtype) or x.dtype not in _DTYPES:
        raise TypeError(f"x, A, B must share one dtype of {_DTYPES}; got {x.dtype}, {A.dtype}, {B.dtype}")
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != x.shape[-1] or B.shape[1] != A.shape[0]:
        raise ValueError(
            f"expected A [K*r, {x.shape[-1]}] and B [d_out, K*r]; got A {tuple(A.shape)}, B {tuple(B.shape)}"
        )
    _, per_token = _check_gates(x, gates, A.shape[0])
    tokens, d_out = x.shape[-2], B.shape[0]
    out_shape = (*x.shape[:-1], d_out)
    if out is not None:
        if tuple(out.shape) != out_shape or out.device != x.device:
            raise ValueError(f"out must be a {out_shape} tensor on {x.device}, got {tuple(out.shape)} on {out.device}")
        try:
            out.view(-1, d_out)
        except RuntimeError as err:
            raise ValueError("out must be viewable as [-1, d_out] so it can be updated in place") from err
    if x.numel() == 0 or gates.numel() == 0:
        return out if out is not None else x.new_zeros(out_shape)

    x2 = x.reshape(-1, x.shape[-1])
    gates2 = gates.reshape(-1, gates.shape[-1])
    rows_per_gate = 1 if per_token else tokens
    want_dgates = torch.is_grad_enabled() and gates.requires_grad
    y = RoutedLoRAFunction.apply(out, x2, A, B, gates2, rows_per_gate, float(scaling), want_dgates)
    return y if out is not None else y.view(out_shape)
