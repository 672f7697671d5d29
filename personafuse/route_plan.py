"""Gates prepared once per forward, and the PyTorch routed-LoRA paths that use them.

Every MoE layer of a model reads the same gates, so what can be derived from the gates alone (their
dtype copy, the per-r-block scales, which experts each sequence selected) is computed once, in a
``RoutePlan``, not once per layer and decode step. The plan lives until the next prefill sets new gates,
so inference also keeps per-layer weights there: for sequence-level top-k routing, the selected
experts' rows of A (already scaled by their gates) and columns of B, gathered at prefill and reused by
every decode step.

Paths (``routing.routed_lora`` picks one; ``path_counts`` in ``personafuse.routing`` counts them):

* ``dense``: two GEMMs over all ``K*r`` columns; the only path for per-token gates.
* ``sparse`` (per-sequence gates): only experts with a nonzero gate are computed. If the sequences
  share their experts (batch 1, broadcast fixed gates) or rows are few (decode), one GEMM pair runs
  over the union of the selected experts (``shared``); otherwise each sequence's own ``k*r`` rows of A
  and columns of B are gathered and the products batched (``per_sequence``). Gradients reach only the
  selected experts' weights (the others get exact zeros) and only the nonzero gates: a zero gate is
  treated as not routed, as top-k routers do, so its gradient is zero rather than ``d/dg`` of an
  expert that did not run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# A gathered weight row costs about this many activation rows of GEMM work (memory traffic and
# the gather itself); it decides between one shared GEMM pair and per-sequence batched GEMMs.
WEIGHT_ROW_COST = 16


class RoutePlan:
    """The gates of one forward (``[..., K]`` per sequence or ``[..., T, K]`` per token) and what derives from them."""

    def __init__(self, gates: torch.Tensor):
        self.gates = gates
        self._derived: dict = {}
        self._weights: dict = {}

    def _cached(self, key, build):
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    def gates_as(self, dtype: torch.dtype) -> torch.Tensor:
        return self.gates if self.gates.dtype == dtype else self._cached(("gates", dtype), lambda: self.gates.to(dtype))

    @property
    def num_experts(self) -> int:
        return self.gates.shape[-1]

    @property
    def max_selected(self) -> int:
        """The most nonzero gates any sequence has (one host sync per plan, not per layer)."""
        return self._cached("max_selected", lambda: int((self.gates != 0).sum(-1).max()) if self.gates.numel() else 0)

    def path(self, per_token: bool, requested: str) -> str:
        """``dense`` or ``sparse``: ``auto`` is sparse for per-sequence gates with at most half the experts nonzero."""
        if requested == "dense":
            return "dense"
        if requested == "sparse":
            if per_token:
                raise ValueError("the sparse routed-LoRA path needs per-sequence gates [..., K], got per-token gates")
            return "sparse"
        return "sparse" if not per_token and 2 * self.max_selected <= self.num_experts else "dense"

    def block_gates(self, r: int, scaling: float, dtype: torch.dtype, per_token: bool) -> torch.Tensor:
        """``scaling * g`` repeated over each expert's r columns, shaped to multiply the shrink output."""
        def build():
            blocks = (self.gates_as(dtype) * scaling).repeat_interleave(r, dim=-1)
            return blocks if per_token else blocks.unsqueeze(-2)
        return self._cached(("blocks", r, scaling, dtype, per_token), build)

    # sparse selection ---------------------------------------------------------------------------
    def selection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(``[N, k]`` experts each sequence selected; ``[u]`` their union), ``k = max_selected``.

        A sequence with fewer than k nonzero gates repeats one of its own experts in the spare slots
        (``slot_mask`` zeroes them), so no other expert's weights are read for it.
        """
        return self._cached("selection", self._select)[:2]

    def slot_mask(self) -> torch.Tensor:
        """``[N, k]``: 1 where a slot of ``selection()[0]`` holds a selected expert, 0 where it repeats one."""
        return self._cached("selection", self._select)[2]

    def _select(self):
        flat = self.gates.detach().reshape(-1, self.num_experts)
        k = max(self.max_selected, 1)
        chosen = torch.topk((flat != 0).to(torch.float32), k, dim=-1).indices.sort(-1).values
        valid = flat.gather(1, chosen) != 0
        first = chosen.gather(1, valid.to(torch.float32).argmax(1, keepdim=True))
        chosen = torch.where(valid, chosen, first)
        return chosen, torch.unique(chosen), valid

    def strategy(self, rows: int) -> str:
        """``shared`` (one GEMM pair over the union) or ``per_sequence`` (batched gathered GEMMs)."""
        chosen, union = self.selection()
        sequences, k = chosen.shape
        shared = union.numel() * (rows + WEIGHT_ROW_COST)
        return "shared" if shared <= k * (rows + sequences * WEIGHT_ROW_COST) else "per_sequence"

    def _experts(self, which: str) -> torch.Tensor:
        chosen, union = self.selection()
        return union if which == "union" else chosen

    def columns(self, which: str, r: int) -> torch.Tensor:
        """Columns of the stacked ``K*r`` axis of the ``union`` (``[u*r]``) or each sequence's ``chosen`` experts (``[N*k*r]``)."""
        def build():
            experts = self._experts(which)
            return (experts.unsqueeze(-1) * r + torch.arange(r, device=experts.device)).flatten()
        return self._cached(("columns", which, r), build)

    def selected_gates(self, which: str, dtype: torch.dtype, scaling: float, r: int) -> torch.Tensor:
        """``scaling * g`` of the ``union`` or ``chosen`` experts per sequence, repeated over r: ``[N, cols]``.
        Zero gates are masked so that they get no gradient."""
        def build():
            experts = self._experts(which)
            flat = self.gates_as(dtype).reshape(-1, self.num_experts)
            if which == "union":
                picked = flat[:, experts]
                picked = picked * (picked.detach() != 0)
            else:
                picked = flat.gather(1, experts) * self.slot_mask()
            return (picked * scaling).repeat_interleave(r, dim=-1)
        return self._cached(("selected", which, dtype, scaling, r), build)

    def rows_equal(self) -> bool:
        """Whether every sequence has the same gates (batch 1, or fixed gates broadcast to a batch)."""
        def build():
            flat = self.gates.reshape(-1, self.num_experts)
            return flat.shape[0] == 1 or flat.stride(0) == 0 or bool((flat == flat[:1]).all())
        return self._cached("rows_equal", build)

    def layer_weights(self, A: torch.Tensor, B: torch.Tensor, key: tuple, build):
        """Per-layer weights derived from the gates, kept while ``A`` and ``B`` are unchanged (inference only)."""
        slot = (id(A), id(B), *key)
        entry = self._weights.get(slot)
        if entry is None or entry[0] is not A or entry[1] is not B or entry[2] != (A._version, B._version):
            entry = (A, B, (A._version, B._version), build())
            self._weights[slot] = entry
        return entry[3]


def needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def dense_delta(x, A, B, plan: RoutePlan, r: int, per_token: bool, scaling: float) -> torch.Tensor:
    return F.linear(F.linear(x, A) * plan.block_gates(r, scaling, A.dtype, per_token), B)


def sparse_delta(x, A, B, plan: RoutePlan, r: int, scaling: float) -> torch.Tensor:
    """Only the selected experts' r-blocks; differentiable (training, or any call needing gradients)."""
    chosen, union = plan.selection()
    lead, d_in = x.shape[:-2], x.shape[-1]
    if plan.strategy(x.numel() // d_in) == "shared":
        blocks = plan.selected_gates("union", A.dtype, scaling, r)
        if union.numel() < plan.num_experts:
            cols = plan.columns("union", r)
            A, B = A.index_select(0, cols), B.index_select(1, cols)
        return F.linear(F.linear(x, A) * blocks.view(*lead, 1, -1), B)
    sequences = chosen.shape[0]
    cols = plan.columns("chosen", r)
    A_sel = A.index_select(0, cols).view(sequences, -1, d_in)
    Bt_sel = B.t().index_select(0, cols).view(sequences, -1, B.shape[0])
    x3 = x.reshape(sequences, -1, d_in)
    h = torch.bmm(x3, A_sel.transpose(1, 2)) * plan.selected_gates("chosen", A.dtype, scaling, r).unsqueeze(1)
    return torch.bmm(h, Bt_sel).view(*x.shape[:-1], B.shape[0])


def lean_add(x, A, B, plan: RoutePlan, r: int, per_token: bool, scaling: float, path: str, out: torch.Tensor) -> torch.Tensor:
    """``out += delta`` without autograd (decode, eval): gate-derived weights come from the plan, and
    the expand GEMM writes straight into ``out``; two or three kernels per layer."""
    d_in, d_out = x.shape[-1], B.shape[0]
    rows = x.numel() // d_in
    out2d = out.view(-1, d_out)
    if path == "dense":
        h = F.linear(x, A).mul_(plan.block_gates(r, scaling, A.dtype, per_token))
        return _addmm(out, out2d, h, B)
    chosen, union = plan.selection()
    if plan.strategy(rows) == "per_sequence":
        def gather():
            cols = plan.columns("chosen", r)
            scales = plan.selected_gates("chosen", A.dtype, scaling, r).reshape(-1, 1)
            return (A.index_select(0, cols) * scales).view(chosen.shape[0], -1, d_in), \
                B.t().index_select(0, cols).view(chosen.shape[0], -1, d_out)
        A_sel, Bt_sel = plan.layer_weights(A, B, ("per_sequence", scaling), gather)
        h = torch.bmm(x.reshape(chosen.shape[0], -1, d_in), A_sel.transpose(1, 2))
        out.view(chosen.shape[0], -1, d_out).baddbmm_(h, Bt_sel)
        return out
    blocks = plan.selected_gates("union", A.dtype, scaling, r)
    if plan.rows_equal():  # one set of gates for every row: fold them into A once
        def fold():
            cols = plan.columns("union", r)
            return A.index_select(0, cols) * blocks[0].unsqueeze(-1), B.index_select(1, cols)
        A_u, B_u = plan.layer_weights(A, B, ("shared_folded", scaling), fold)
        return _addmm(out, out2d, F.linear(x, A_u), B_u)
    if union.numel() < plan.num_experts:
        cols = plan.columns("union", r)
        A, B = plan.layer_weights(A, B, ("shared", scaling), lambda: (A.index_select(0, cols), B.index_select(1, cols)))
    lead = x.shape[:-2]
    h = F.linear(x, A).mul_(blocks.view(*lead, 1, -1))
    return _addmm(out, out2d, h, B)


def _addmm(out, out2d, h, B):
    out2d.addmm_(h.reshape(-1, h.shape[-1]), B.t())
    return out

