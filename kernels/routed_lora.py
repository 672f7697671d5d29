"""Fused routed LoRA: ``y (+)= scaling * sum_k g_k * B_k A_k x``.

Reference: ``personafuse.routing.routed_lora_torch`` (two GEMMs) and ``routed_lora_reference`` (a loop).

Forward, by size (all paths equal to the float64 reference in the interpreter tests):

* ``_row_tile_kernel`` (K*r <= ``MAX_FUSED_COLS``): a program per row tile reads its ``x`` rows once,
  keeps all K*r shrink columns on chip, applies the gates there and expands straight into ``y``, adding
  into it when ``out=`` is given (the base layer's output: the residual add costs no extra pass).
  Only experts some row of the tile selected are loaded, packed to the front of the tile; a tile with at
  most ``COMPACT_EXPERTS`` of them (sequence-level top-k) uses a narrow tile, so it spends only their
  FLOPs. The output columns may be split over several consecutive programs (grouped ordering: they
  share the ``x`` tile through L2); tile sizes, splits, warps and stages are tuned per token-count
  bucket on CUDA (``Tuner``).
* ``_decode_shrink_kernel`` + ``_decode_expand_kernel`` (up to ``DECODE_MAX_ROWS`` rows): split-K over
  d_in into an fp32 buffer, then an expand parallel over output columns, so decode fills the GPU.
* Wider stacks: ``_shrink`` then ``_expand`` (below), one program per (row tile, expert).

Backward:

* ``dx = (s g (dy B)) A`` has the forward's shape, so the row-tile kernel computes it too (reading
  ``dy`` once for every selected expert), saving ``dh = s g (dy B)`` for ``dA`` and, for router
  training, reducing ``s * <h_k, dy B_k>`` per (row, expert) on chip; the host sums a sequence's rows
  into dgates (deterministic; no contended atomics). Wider stacks use ``_shrink`` + ``_expand``.
* ``_wgrad``: ``dB = dy^T hg`` and ``dA = dh^T x``, each expert reducing over only the gate rows
  (sequences or tokens) that selected it (``expert_selection``), so an expert nobody selected costs
  nothing and gets exactly zero.

When the gates need a gradient every expert's product is computed in the forward and in the backward's
``dy B``, because ``d/dg_k`` is not zero where ``g_k`` is; the weight gradients still skip zero gates.

Accumulation is fp32; intermediates (``hg``, ``dh``) are stored in the input dtype, as the PyTorch
path does. fp32 inputs use IEEE dot products, matching torch's default of no TF32. Tile sizes are
module attributes (tests shrink them; the interpreter runs the row-tile kernel with them).
"""

from __future__ import annotations

import dataclasses
import functools
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
# The fused forward holds a row tile's K*r columns on chip; wider stacks take the shrink + expand path.
MAX_FUSED_COLS = 256
# Width of the narrow forward tile, in experts: a tile with at most this many selected experts
# (sequence-level top-2, one-hot) computes only their columns. 0 turns the narrow tile off.
COMPACT_EXPERTS = 2
# Up to this many rows the forward takes the decode path: split-K shrink over d_in slices of SPLIT_D,
# then an expand parallel over output columns.
DECODE_MAX_ROWS = 16
SPLIT_D = 256
# Row tiles the expand kernel sweeps together (grouped ordering: their weight tiles stay in L2).
GROUP_M = 8
# The row-tile kernel's launch: None tunes it per token-count bucket on CUDA (the interpreter takes the
# tile sizes above with COLUMN_SPLITS programs per row tile); a TileConfig forces one everywhere.
ROW_TILE_CONFIG = None
COLUMN_SPLITS = 1
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _any_nonzero(g):
    # `!= 0` rather than `abs(g) > 0` so NaN gates are not skipped and still poison the output.
    return tl.sum((g != 0).to(tl.int32), 0) > 0


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """``tl.dot`` with fp32 accumulation. ``PRECISION == "emulate_bf16"`` (the CPU interpreter, whose bf16
    arithmetic is wrong) multiplies the bf16 tiles as fp32: bf16 products are exact in fp32 and a GPU's bf16
    MMA accumulates in fp32, so only the summation order differs."""
    if PRECISION == "emulate_bf16":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _store_rows(Y, o, rows64, cols, row_ok, col_ok, sym, syn, ACCUMULATE: tl.constexpr):
    """Write an fp32 output tile into ``Y`` (adding the values already there with ``ACCUMULATE``, the fused ``out=``)."""
    y_ptrs = Y + rows64[:, None] * sym + cols[None, :] * syn
    y_ok = row_ok[:, None] & col_ok[None, :]
    if ACCUMULATE:
        o += tl.load(y_ptrs, mask=y_ok, other=0.0).to(tl.float32)
    tl.store(y_ptrs, o.to(Y.dtype.element_ty), mask=y_ok)


@triton.jit
def _shrink_kernel(
    X, W, G, OUT, H_SAVE, H_IN, DG,
    M, D, K, R, rows_per_gate, scale,
    sxm, sxd, swr, swd, sgm, sgk, som, sor, shm, shr, sdm, sdk,
    SKIP_ZERO: tl.constexpr, SAVE_H: tl.constexpr, DGATES: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One grid axis (rows never hit the 65535 limit of axes 1-2), expert fastest: the K programs that
    # read the same x tile run together (L2 hits).
    pid = tl.program_id(0)
    k = pid % K
    rows = (pid // K) * BLOCK_M + tl.arange(0, BLOCK_M)
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
        acc = _dot(xt, wt, acc, PRECISION)

    tile_ok = row_ok[:, None] & rank_ok[None, :]
    if DGATES:
        h = tl.load(H_IN + rows64[:, None] * shm + cols[None, :] * shr, mask=tile_ok, other=0.0)
        # One partial per (row, expert), each written by exactly one program; the host sums a sequence's
        # rows. Atomics on the gate row instead would serialise every tile of a sequence.
        tl.store(DG + rows64 * sdm + k * sdk, tl.sum(acc * h.to(tl.float32), 1) * scale, mask=row_ok)
    if SAVE_H:
        tl.store(H_SAVE + rows64[:, None] * shm + cols[None, :] * shr, acc, mask=tile_ok)
    out = acc * (g * scale)[:, None]
    tl.store(OUT + rows64[:, None] * som + cols[None, :] * sor, out.to(OUT.dtype.element_ty), mask=tile_ok)


@triton.jit
def _row_tile(
    X, A, B, G, Y, HG_SAVE, H_SAVE, H_IN, DG, rows64, row_ok, gate_rows, active, n_active, n_lo, n_hi, save_row,
    D, R, scale, sxm, sxd, sar, sad, sbn, sbr, sgm, sgk, sym, syn, shm, shr, sdm, sdk,
    EXPAND: tl.constexpr, ACCUMULATE: tl.constexpr, SAVE_HG: tl.constexpr, SAVE_H: tl.constexpr, DGATES: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Column c of this tile is rank c % R of the (c // R)-th active expert: the active experts' r-blocks
    # packed to the front, so a tile needs only as many columns as it has selected experts.
    experts = tl.arange(0, BLOCK_K)
    slot_of_expert = tl.cumsum(active.to(tl.int32), 0) - 1
    c = tl.arange(0, BLOCK_C)
    slot = c // R
    expert = tl.sum(tl.where(active[None, :] & (slot_of_expert[None, :] == slot[:, None]), experts[None, :], 0), 1)
    col_ok = slot < n_active
    acol = expert * R + c % R

    n_chunks = tl.where(n_active > 0, tl.cdiv(D, BLOCK_D), 0)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for i in range(n_chunks):
        ds = i * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        xt = tl.load(X + rows64[:, None] * sxm + ds[None, :] * sxd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        at = tl.load(A + acol[None, :] * sar + ds[:, None] * sad, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        acc = _dot(xt, at, acc, PRECISION)

    tile_ok = row_ok[:, None] & col_ok[None, :]
    save_ok = save_row[:, None] & col_ok[None, :]
    g = tl.load(G + gate_rows[:, None] * sgm + expert[None, :] * sgk, mask=tile_ok, other=0.0).to(tl.float32)
    hg = (acc * g * scale).to(X.dtype.element_ty)
    if SAVE_H:
        tl.store(H_SAVE + rows64[:, None] * shm + acol[None, :] * shr, acc, mask=save_ok)
    if SAVE_HG:
        tl.store(HG_SAVE + rows64[:, None] * shm + acol[None, :] * shr, hg, mask=save_ok)
    if DGATES:
        # d/dg_k = s * <h_k, dy B_k> per row, reduced over the expert's r columns here (acc is dy B), one
        # partial per (row, expert) written by one program; the host sums a sequence's rows.
        h = tl.load(H_IN + rows64[:, None] * shm + acol[None, :] * shr, mask=tile_ok, other=0.0)
        prod = acc * h.to(tl.float32)
        for s in range(BLOCK_K):
            partial = tl.sum(tl.where((slot == s)[None, :], prod, 0.0), 1) * scale
            k = tl.sum(tl.where(active & (slot_of_expert == s), experts, 0), 0)
            tl.store(DG + rows64 * sdm + k * sdk, partial, mask=save_row & (gate_rows * 0 + s < n_active))  # a block, not a scalar, for the interpreter
    if EXPAND:
        for n0 in range(n_lo, n_hi, BLOCK_N):
            ns = n0 + tl.arange(0, BLOCK_N)
            n_ok = ns < n_hi
            bt = tl.load(B + acol[:, None] * sbr + ns[None, :] * sbn, mask=col_ok[:, None] & n_ok[None, :], other=0.0)
            o = _dot(hg, bt, None, PRECISION)
            _store_rows(Y, o, rows64, ns, row_ok, n_ok, sym, syn, ACCUMULATE)


@triton.jit
def _row_tile_kernel(
    X, A, B, G, Y, HG_SAVE, H_SAVE, H_IN, DG,
    M, D, N, K, R, rows_per_gate, scale, splits, cols_per_split,
    sxm, sxd, sar, sad, sbn, sbr, sgm, sgk, sym, syn, shm, shr, sdm, sdk,
    ALL_EXPERTS: tl.constexpr, EXPAND: tl.constexpr, ACCUMULATE: tl.constexpr, SAVE_HG: tl.constexpr,
    SAVE_H: tl.constexpr, DGATES: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_C_SMALL: tl.constexpr,
):
    # Rows on grid axis 0, grouped: the `splits` programs of one row tile are consecutive, so they run
    # together and all but the first read their x tile from L2. Each recomputes the (thin) shrink and
    # expands its own slice of the output columns; with splits = 1 a program covers every column.
    pid = tl.program_id(0)
    part = pid % splits
    rows = (pid // splits) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    gate_rows = rows64 // rows_per_gate
    n_lo = part * cols_per_split
    n_hi = tl.minimum(n_lo + cols_per_split, N)
    # With column splits every program of a row tile holds the same shrink; the first one saves it.
    save_row = rows < tl.where(part == 0, M, 0)
    experts = tl.arange(0, BLOCK_K)
    expert_ok = experts < K
    if ALL_EXPERTS:  # the gate gradient needs every expert's product, zero gate or not
        active = expert_ok
    else:
        g = tl.load(G + gate_rows[:, None] * sgm + experts[None, :] * sgk, mask=row_ok[:, None] & expert_ok[None, :], other=0.0)
        active = (tl.sum((g != 0).to(tl.int32), 0) > 0) & expert_ok  # `!= 0` keeps NaN gates, which must poison y
    n_active = tl.sum(active.to(tl.int32), 0)
    if BLOCK_C_SMALL < BLOCK_C and n_active * R <= BLOCK_C_SMALL:
        # Few selected experts (sequence-level top-k): a narrow tile, so only their FLOPs are spent.
        _row_tile(X, A, B, G, Y, HG_SAVE, H_SAVE, H_IN, DG, rows64, row_ok, gate_rows, active, n_active, n_lo, n_hi, save_row,
                  D, R, scale, sxm, sxd, sar, sad, sbn, sbr, sgm, sgk, sym, syn, shm, shr, sdm, sdk,
                  EXPAND, ACCUMULATE, SAVE_HG, SAVE_H, DGATES, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_C_SMALL, BLOCK_K)
    else:
        _row_tile(X, A, B, G, Y, HG_SAVE, H_SAVE, H_IN, DG, rows64, row_ok, gate_rows, active, n_active, n_lo, n_hi, save_row,
                  D, R, scale, sxm, sxd, sar, sad, sbn, sbr, sgm, sgk, sym, syn, shm, shr, sdm, sdk,
                  EXPAND, ACCUMULATE, SAVE_HG, SAVE_H, DGATES, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_C, BLOCK_K)


@triton.jit
def _decode_columns(G, gate_rows, row_ok, sgm, sgk, K, R, ALL_EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Columns of the stack, and which of them belong to an expert some row of the tile selected."""
    cols = tl.arange(0, BLOCK_C)
    expert = cols // R
    col_ok = expert < K
    if not ALL_EXPERTS:
        g = tl.load(G + gate_rows[:, None] * sgm + expert[None, :] * sgk, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        col_ok = col_ok & (tl.sum((g != 0).to(tl.int32), 0) > 0)
    return cols, expert, col_ok


@triton.jit
def _decode_shrink_kernel(
    X, A, G, H,
    M, D, K, R, rows_per_gate, split_d,
    sxm, sxd, sar, sad, sgm, sgk, shm, shr,
    ALL_EXPERTS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Split-K over d_in: with a handful of rows the row tiles alone would give one program, so each
    # program reduces one slice of d_in for every row and column and adds its partial into fp32 H.
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    cols, expert, col_ok = _decode_columns(G, rows64 // rows_per_gate, row_ok, sgm, sgk, K, R, ALL_EXPERTS, BLOCK_M, BLOCK_C)
    start = tl.program_id(0) * split_d
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for d0 in range(start, tl.minimum(start + split_d, D), BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = (ds < D) & (ds < start + split_d)
        xt = tl.load(X + rows64[:, None] * sxm + ds[None, :] * sxd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        at = tl.load(A + cols[None, :] * sar + ds[:, None] * sad, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        acc = _dot(xt, at, acc, PRECISION)
    tl.atomic_add(H + rows64[:, None] * shm + cols[None, :] * shr, acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _decode_expand_kernel(
    H, B, G, Y, HG_SAVE,
    M, N, K, R, rows_per_gate, scale,
    shm, shr, sbn, sbr, sgm, sgk, sym, syn, sgsm, sgsr,
    ACCUMULATE: tl.constexpr, SAVE_HG: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Every program gates the (small) shrink result on chip and expands one tile of output columns.
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    gate_rows = rows64 // rows_per_gate
    cols = tl.arange(0, BLOCK_C)
    expert = cols // R
    col_ok = expert < K
    tile_ok = row_ok[:, None] & col_ok[None, :]
    h = tl.load(H + rows64[:, None] * shm + cols[None, :] * shr, mask=tile_ok, other=0.0)
    g = tl.load(G + gate_rows[:, None] * sgm + expert[None, :] * sgk, mask=tile_ok, other=0.0).to(tl.float32)
    hg = (h * g * scale).to(Y.dtype.element_ty)
    if SAVE_HG:  # noqa: SIM102  (a constexpr and a runtime test cannot share one Triton `if`)
        if tl.program_id(0) == 0:  # every program holds the same hg; the first one saves it
            tl.store(HG_SAVE + rows64[:, None] * sgsm + cols[None, :] * sgsr, hg, mask=tile_ok)
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    # Columns of unselected experts hold exact zeros in H; masking B there saves reading their rows.
    active = tl.sum((g != 0).to(tl.int32), 0) > 0
    bt = tl.load(B + cols[:, None] * sbr + ns[None, :] * sbn, mask=(col_ok & active)[:, None] & n_ok[None, :], other=0.0)
    o = _dot(hg, bt, None, PRECISION)
    _store_rows(Y, o, rows64, ns, row_ok, n_ok, sym, syn, ACCUMULATE)


@triton.jit
def _expand_kernel(
    U, W, G, Y,
    M, N, R, num_experts, rows_per_gate,
    sum_, sur, swn, swr, sgm, sgk, sym, syn,
    ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped ordering on one grid axis: GROUP_M row tiles sweep the column tiles together, so the
    # weight tiles they share stay in L2 and rows are never limited to 65535 tiles.
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_m
    pid_n = (pid % (GROUP_M * tiles_n)) // group_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
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
            acc = _dot(ut, wt, acc, PRECISION)

    _store_rows(Y, acc, rows64, cols, row_ok, col_ok, sym, syn, ACCUMULATE)


@triton.jit
def _wgrad_kernel(
    V, U, SEL, COUNT, OUT,
    N, R, num_gate_rows, rows_per_gate,
    svm, svn, sum_, sur, son, sor,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Expert k reduces over only the rows whose gate selected it: SEL[k, :COUNT[k]] lists those gate
    # rows (sequences, or tokens), each covering rows_per_gate consecutive rows. An expert nobody
    # selected loops zero times and writes exact zeros.
    k = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < R
    j = k * R + ranks
    n_rows = tl.load(COUNT + k) * rows_per_gate

    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for m0 in range(0, n_rows, BLOCK_M):
        i = m0 + tl.arange(0, BLOCK_M)
        row_ok = i < n_rows
        gate_row = tl.load(SEL + k * num_gate_rows + i // rows_per_gate, mask=row_ok, other=0)
        rows64 = gate_row.to(tl.int64) * rows_per_gate + i % rows_per_gate
        vt = tl.load(V + rows64[None, :] * svm + cols[:, None] * svn, mask=row_ok[None, :] & col_ok[:, None], other=0.0)
        ut = tl.load(U + rows64[:, None] * sum_ + j[None, :] * sur, mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        acc = _dot(vt, ut, acc, PRECISION)

    tl.store(OUT + cols[:, None] * son + j[None, :] * sor, acc.to(OUT.dtype.element_ty), mask=col_ok[:, None] & rank_ok[None, :])


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return "emulate_bf16"
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def forward_path(rows: int, num_experts: int, r: int) -> str:
    """Which forward runs: ``"decode"`` (split-K), ``"row_tile"`` (fused) or ``"shrink_expand"``."""
    if num_experts * r > MAX_FUSED_COLS:
        return "shrink_expand"
    return "decode" if rows <= DECODE_MAX_ROWS else "row_tile"


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """One launch of the row-tile kernel: tile sizes, column splits per row tile, warps and pipeline stages."""

    block_m: int
    block_n: int
    block_d: int
    splits: int
    num_warps: int = 4
    num_stages: int = 3


def token_bucket(rows: int) -> int:
    """Row counts that share a tuned config: powers of two, from 32 up to 65536."""
    return min(65536, max(32, triton.next_power_of_2(rows)))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def row_tile_configs(rows: int, n: int, block_c: int, sms: int) -> list[TileConfig]:
    """Candidates for the GPU, the first a sensible default: enough column splits to give every SM two
    programs, or none; 128-row tiles only where the K*r columns are narrow enough for the registers."""
    configs = []
    for block_m in (64, 128) if block_c <= 64 else (64,):
        for block_n in (64, 128):
            fill = max(1, min(triton.cdiv(n, block_n), triton.cdiv(2 * sms, triton.cdiv(rows, block_m))))
            warps = 4 if block_m * block_c <= 64 * 64 else 8
            configs += [TileConfig(block_m, block_n, 64, s, warps) for s in dict.fromkeys((fill, 1))]
    return configs


class Tuner:
    """Launch configs per key (token-count bucket and shape), timed once per key on the first call.

    Candidates that fail to compile (e.g. out of shared memory) are skipped and remembered in ``failed``.
    A stream being captured into a CUDA graph cannot be timed: an untuned key then takes the default.
    """

    def __init__(self):
        self.best: dict = {}
        self.failed: dict = {}

    def pick(self, key, candidates: list[TileConfig], run, bench) -> TileConfig:
        if len(candidates) == 1:
            return candidates[0]
        if key in self.best:
            return self.best[key]
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return candidates[0]
        times = {}
        for config in candidates:
            try:
                times[config] = bench(lambda config=config: run(config))
            except Exception as err:  # noqa: BLE001  (a config the device cannot run is not an error)
                self.failed.setdefault(key, []).append((config, f"{type(err).__name__}: {err}"[:300]))
        if not times:
            raise RuntimeError(f"no row-tile config ran for {key}: {self.failed[key]}")
        self.best[key] = min(times, key=times.get)
        return self.best[key]


TUNER = Tuner()


def _bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")


def _row_tile_candidates(x: torch.Tensor, n: int, block_c: int) -> list[TileConfig]:
    if ROW_TILE_CONFIG is not None:
        return [ROW_TILE_CONFIG]
    if not x.is_cuda:  # the interpreter: one config, from the module's tile sizes
        return [TileConfig(BLOCK_M, BLOCK_N, BLOCK_D, COLUMN_SPLITS, num_stages=1)]
    return row_tile_configs(x.shape[0], n, block_c, _sm_count(x.device.index or 0))


def _row_tile_pass(x, a, b, gates, rows_per_gate, scale, y, *, accumulate=False, hg=None, h=None, h_in=None, dg=None,
                   all_experts=False):
    """``y (+)= scale * sum_k g_k (x a_k^T) b_k^T`` reading ``x`` once; optionally saves ``hg`` (gated, input
    dtype) and ``h`` (fp32), and with ``h_in`` writes per-row gate-gradient partials ``dg``. ``y=None``
    skips the expand (a backward that needs no ``dx``)."""
    m, d = x.shape
    n = b.shape[0]
    num_experts = gates.shape[1]
    r = a.shape[0] // num_experts
    block_c = max(16, triton.next_power_of_2(num_experts * r))
    block_c_small = min(block_c, max(16, triton.next_power_of_2(COMPACT_EXPERTS * r))) if COMPACT_EXPERTS else block_c
    saved = next((t for t in (hg, h, h_in) if t is not None), None)

    def run(config: TileConfig, y) -> None:
        cols = max(1, triton.cdiv(triton.cdiv(n, config.block_n), config.splits)) * config.block_n
        splits = triton.cdiv(n, cols) if y is not None else 1
        _row_tile_kernel[(triton.cdiv(m, config.block_m) * splits,)](
            x, a, b, gates, y, hg, h, h_in, dg,
            m, d, n, num_experts, r, rows_per_gate, scale, splits, cols,
            x.stride(0), x.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1), gates.stride(0), gates.stride(1),
            *(y.stride() if y is not None else (0, 0)), *(saved.stride() if saved is not None else (0, 0)),
            *(dg.stride() if dg is not None else (0, 0)),
            ALL_EXPERTS=all_experts, EXPAND=y is not None, ACCUMULATE=accumulate, SAVE_HG=hg is not None,
            SAVE_H=h is not None, DGATES=dg is not None, PRECISION=_precision(x.dtype),
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=config.block_d,
            BLOCK_K=max(2, triton.next_power_of_2(num_experts)), BLOCK_C=block_c, BLOCK_C_SMALL=block_c_small,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )

    scratch = []

    def timed_run(config: TileConfig) -> None:  # timing a config must not add into the real output
        if accumulate and not scratch:
            scratch.append(y.clone())
        run(config, scratch[0] if accumulate else y)

    key = ("row_tile", token_bucket(m), d, n, block_c, block_c_small, x.dtype, x.device)
    run(TUNER.pick(key, _row_tile_candidates(x, n, block_c), timed_run, _bench), y)


def _decode_forward(x, a, b, gates, rows_per_gate, scale, y, *, accumulate, hg=None, all_experts=False):
    """The forward for a few rows; returns the fp32 ungated shrink ``h`` (backward's input for dgates)."""
    m, d = x.shape
    n = y.shape[1]
    num_experts = gates.shape[1]
    r = a.shape[0] // num_experts
    block_m, block_c = max(16, triton.next_power_of_2(m)), max(16, triton.next_power_of_2(num_experts * r))
    h = torch.zeros(m, a.shape[0], device=x.device, dtype=torch.float32)
    _decode_shrink_kernel[(triton.cdiv(d, SPLIT_D),)](
        x, a, gates, h,
        m, d, num_experts, r, rows_per_gate, SPLIT_D,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), gates.stride(0), gates.stride(1), h.stride(0), h.stride(1),
        ALL_EXPERTS=all_experts, PRECISION=_precision(x.dtype), BLOCK_M=block_m, BLOCK_D=min(BLOCK_D, SPLIT_D), BLOCK_C=block_c,
    )
    _decode_expand_kernel[(triton.cdiv(n, BLOCK_N),)](
        h, b, gates, y, hg,
        m, n, num_experts, r, rows_per_gate, scale,
        h.stride(0), h.stride(1), b.stride(0), b.stride(1), gates.stride(0), gates.stride(1), y.stride(0), y.stride(1),
        hg.stride(0) if hg is not None else 0, hg.stride(1) if hg is not None else 0,
        ACCUMULATE=accumulate, SAVE_HG=hg is not None, PRECISION=_precision(x.dtype),
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_C=block_c,
    )
    return h


def _shrink(x, w, gates, rows_per_gate, scale, out, *, skip_zero, h_save=None, h_in=None, dgates=None):
    """``out = scale * g * (x @ w^T)`` per r-block; optionally save the ungated product or write per-row dgates."""
    m, d = x.shape
    num_experts = gates.shape[1]
    r = w.shape[0] // num_experts
    h = h_save if h_save is not None else h_in
    dg = dgates if dgates is not None else gates
    _shrink_kernel[(num_experts * triton.cdiv(m, BLOCK_M),)](
        x, w, gates, out, h_save, h_in, dgates,
        m, d, num_experts, r, rows_per_gate, scale,
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
    _expand_kernel[(triton.cdiv(m, BLOCK_M) * triton.cdiv(n, BLOCK_N),)](
        u, w, gates, y,
        m, n, r, num_experts, rows_per_gate,
        u.stride(0), u.stride(1), w.stride(0), w.stride(1), gates.stride(0), gates.stride(1),
        y.stride(0), y.stride(1),
        ACCUMULATE=accumulate, PRECISION=_precision(u.dtype),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=_block_r(r), GROUP_M=GROUP_M,
    )


def expert_selection(gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each expert, the gate rows (sequences, or tokens) that selected it, ascending, and how many.

    ``[K, rows]`` int32 (the unselected rows after the count, in any order) and ``[K]`` int32. Built on the
    device without a host sync; a NaN gate counts as selected so it still reaches the gradients.
    """
    chosen = (gates != 0).t()
    order = torch.argsort((~chosen).to(torch.int8), dim=1, stable=True)
    return order.to(torch.int32).contiguous(), chosen.sum(1, dtype=torch.int32)


def _wgrad(v, u, selection, rows_per_gate, out):
    """``out = v^T @ u`` (``[N, K*r]``), each expert's r-block reduced over the rows that selected it."""
    sel, count = selection
    n = v.shape[1]
    num_experts = sel.shape[0]
    r = u.shape[1] // num_experts
    _wgrad_kernel[(num_experts, triton.cdiv(n, BLOCK_N))](
        v, u, sel, count, out,
        n, r, sel.shape[1], rows_per_gate,
        v.stride(0), v.stride(1), u.stride(0), u.stride(1), out.stride(0), out.stride(1),
        PRECISION=_precision(v.dtype), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=_block_r(r),
    )


class RoutedLoRAFunction(torch.autograd.Function):
    """Autograd wrapper over the kernels on flattened 2-D operands (see ``routed_lora`` for shapes)."""

    @staticmethod
    def forward(ctx, out, x2, A, B, gates2, rows_per_gate, scaling, want_dgates):
        # ``out`` comes first: autograd's in-place bookkeeping for a dirtied view input (CopySlices)
        # assumes the modified tensor is the Function's first input.
        m = x2.shape[0]
        accumulate = out is not None
        if accumulate:
            ctx.mark_dirty(out)
            y2 = out.view(m, B.shape[0])
        else:
            y2 = out = torch.empty(m, B.shape[0], device=x2.device, dtype=x2.dtype)
        save = any(ctx.needs_input_grad)
        path = forward_path(m, gates2.shape[1], A.shape[0] // gates2.shape[1])
        if path == "decode":
            hg = torch.empty(m, A.shape[0], device=x2.device, dtype=x2.dtype) if save else None
            h = _decode_forward(x2, A, B, gates2, rows_per_gate, scaling, y2, accumulate=accumulate, hg=hg, all_experts=want_dgates)
        elif path == "row_tile":
            # A tile writes only the columns of experts it selected; the weight gradients read no others.
            hg = torch.empty(m, A.shape[0], device=x2.device, dtype=x2.dtype) if save else None
            h = torch.empty(m, A.shape[0], device=x2.device, dtype=torch.float32) if save and want_dgates else None
            _row_tile_pass(x2, A, B, gates2, rows_per_gate, scaling, y2, accumulate=accumulate, hg=hg, h=h,
                           all_experts=want_dgates)
        else:
            hg = torch.empty(m, A.shape[0], device=x2.device, dtype=x2.dtype)
            h = torch.empty(m, A.shape[0], device=x2.device, dtype=torch.float32) if want_dgates else None
            _shrink(x2, A, gates2, rows_per_gate, scaling, hg, skip_zero=not want_dgates, h_save=h)
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
        m, num_experts = x2.shape[0], gates2.shape[1]
        selection = expert_selection(gates2) if need_dA or need_dB else None
        if need_dx or need_dA or need_dg:
            dh = torch.empty_like(hg)
            dg_rows = torch.empty(m, num_experts, device=dy.device, dtype=torch.float32) if need_dg else None
            dx = torch.empty_like(x2) if need_dx else None
            if forward_path(m, num_experts, A.shape[0] // num_experts) == "shrink_expand":
                _shrink(dy, B.t(), gates2, rpg, ctx.scaling, dh, skip_zero=not need_dg, h_in=h, dgates=dg_rows)
                if need_dx:
                    _expand(dh, A.t(), gates2, rpg, dx, accumulate=False)
            else:
                # dx = (s g (dy B)) A has the forward's shape, so the row-tile kernel reads dy once for every
                # selected expert, saves dh for dA and reduces the dgates partials on chip.
                _row_tile_pass(dy, B.t(), A.t(), gates2, rpg, ctx.scaling, dx, hg=dh, h_in=h if need_dg else None,
                               dg=dg_rows, all_experts=need_dg)
            if need_dA:
                dA = torch.empty_like(A)
                _wgrad(x2, dh, selection, rpg, dA.t())
            if need_dg:
                dgates = dg_rows.view(-1, rpg, num_experts).sum(1).to(gates2.dtype)
        if need_dB:
            dB = torch.empty_like(B)
            _wgrad(dy, hg, selection, rpg, dB)
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
