"""Fused routed LoRA vs the float64 per-expert loop: outputs and all four gradients."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")

import personafuse.kernels.routed_lora as rl  # noqa: E402

from personafuse.routing import compute_gates_torch, routed_lora_reference  # noqa: E402

from .conftest import INTERPRET  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """16-wide tiles so the small shapes span several tiles with ragged edges in every dimension."""
    for name in ("BLOCK_M", "BLOCK_N", "BLOCK_D"):
        monkeypatch.setattr(rl, name, 16)


def make_case(seed, per_token, top_k, dtype, device, dims=None):
    rng = random.Random(seed)
    n, t = rng.randint(1, 3), rng.randint(5, 24)
    d_in, d_out, k, r = rng.randint(17, 48), rng.randint(9, 48), rng.randint(max(2, top_k or 2), 6), rng.randint(1, 4)
    if dims is not None:
        n, t, d_in, d_out, k, r = dims
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, d_in, generator=gen)
    a = torch.randn(k * r, d_in, generator=gen) / d_in**0.5
    b = torch.randn(d_out, k * r, generator=gen)
    logits = torch.randn(n, t, k, generator=gen) if per_token else torch.randn(n, k, generator=gen)
    gates, _ = compute_gates_torch(logits, 1.0, top_k)
    return [v.to(device=device, dtype=dtype) for v in (x, a, b, gates)]


def rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("top_k", [None, 2], ids=["dense", "top2"])
@pytest.mark.parametrize("per_token", [False, True], ids=["per_seq", "per_token"])
def test_matches_float64_reference(per_token, top_k, dtype, device, poison_empty):
    seed = hash((per_token, top_k, str(dtype))) % 1000
    inputs = [v.requires_grad_() for v in make_case(seed, per_token, top_k, dtype, device)]
    y = rl.routed_lora(*inputs, 0.5)
    ref_inputs = [v.detach().double().requires_grad_() for v in inputs]
    ref = routed_lora_reference(*ref_inputs, 0.5)
    assert y.dtype == dtype and y.shape == ref.shape
    assert rel_err(y, ref) < TOL[dtype]

    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)
    grads = torch.autograd.grad(y, inputs, dy)
    ref_grads = torch.autograd.grad(ref, ref_inputs, dy.double())
    for name, got, want in zip(("dx", "dA", "dB", "dgates"), grads, ref_grads, strict=True):
        assert got.dtype == dtype and got.shape == want.shape, name
        assert rel_err(got, want) < TOL[dtype], name


@pytest.mark.parametrize(("per_token", "top_k"), [(False, 2), (True, 1)], ids=["per_seq_top2", "per_token_top1"])
def test_skips_zero_gate_blocks_when_gates_are_constant(per_token, top_k, device, poison_empty):
    """Without a gate gradient the shrinks skip zero-gate blocks too; results must not change."""
    x, a, b, gates = make_case(11, per_token, top_k, torch.float32, device)
    inputs = [v.requires_grad_() for v in (x, a, b)]
    y = rl.routed_lora(*inputs, gates, 0.5)
    ref_inputs = [v.detach().double().requires_grad_() for v in inputs]
    ref = routed_lora_reference(*ref_inputs, gates.double(), 0.5)
    assert rel_err(y, ref) < TOL[torch.float32]
    for got, want in zip(torch.autograd.grad(y.sum(), inputs), torch.autograd.grad(ref.sum(), ref_inputs), strict=True):
        assert rel_err(got, want) < TOL[torch.float32]


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")
def test_gradcheck(device):
    """Finite differences through the whole autograd Function, with a zero (top-k dropped) gate."""
    x, a, b, gates = make_case(7, True, 1, torch.float32, device)
    x, a, b, gates = x[:1, :4, :18], a[:, :18], b[:10], gates[:1, :4]
    inputs = [v.detach().clone().requires_grad_() for v in (x, a, b, gates)]
    assert torch.autograd.gradcheck(
        lambda *v: rl.routed_lora(*v, 0.5), inputs, eps=1e-2, atol=5e-3, rtol=5e-3, fast_mode=True
    )


def test_out_accumulates_in_place(device, poison_empty):
    x, a, b, gates = make_case(3, False, 2, torch.float32, device)
    w = torch.randn(b.shape[0], x.shape[-1], device=device, requires_grad=True)
    base = x @ w.T
    before = base.detach().clone()
    got = rl.routed_lora(x, a, b, gates, 2.0, out=base)
    assert got is base
    want = before.double() + routed_lora_reference(x.double(), a.double(), b.double(), gates.double(), 2.0)
    assert rel_err(got, want) < TOL[torch.float32]
    (dw,) = torch.autograd.grad(got.sum(), w)
    assert torch.allclose(dw, torch.ones_like(before).flatten(0, -2).T @ x.flatten(0, -2))


def test_rejects_bad_inputs(device):
    x, a, b, gates = make_case(1, False, None, torch.float32, device)
    with pytest.raises(ValueError, match="gates of shape"):
        rl.routed_lora(x, a, b, gates[None], 1.0)
    with pytest.raises(ValueError, match="expected A"):
        rl.routed_lora(x, a[:, :-1], b, gates, 1.0)
    with pytest.raises(TypeError, match="share one dtype"):
        rl.routed_lora(x, a.half(), b, gates, 1.0)
    with pytest.raises(ValueError, match="out must be"):
        rl.routed_lora(x, a, b, gates, 1.0, out=torch.zeros(1, device=device))


def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, a, b, gates = make_case(1, False, None, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        rl.routed_lora(x, a, b, gates, 1.0)


PATHS = {  # name: (module settings, the forward path they select, a host function that must run)
    "row_tile": ({"DECODE_MAX_ROWS": 0}, "row_tile", "_row_tile_pass"),
    "row_tile_wide": ({"DECODE_MAX_ROWS": 0, "COMPACT_EXPERTS": 0}, "row_tile", "_row_tile_pass"),
    "row_tile_column_splits": ({"DECODE_MAX_ROWS": 0, "COLUMN_SPLITS": 2, "BLOCK_N": 8}, "row_tile", "_row_tile_pass"),
    "decode_split_k": ({"DECODE_MAX_ROWS": 10**9, "SPLIT_D": 16}, "decode", "_decode_forward"),
    "shrink_expand": ({"MAX_FUSED_COLS": 0, "GROUP_M": 2}, "shrink_expand", "_expand"),
}


@pytest.fixture(params=list(PATHS))
def forward_path(request, monkeypatch):
    """Force one forward path: fused row tile (narrow, wide, column splits), split-K decode, or the two-kernel fallback."""
    settings, path, entry = PATHS[request.param]
    for name, value in settings.items():
        monkeypatch.setattr(rl, name, value)
    calls = []
    real = getattr(rl, entry)
    monkeypatch.setattr(rl, entry, lambda *a, **k: calls.append(entry) or real(*a, **k))
    yield path
    assert calls, f"{entry} never ran: the {request.param} path was not taken"


@pytest.mark.parametrize(("per_token", "top_k", "grad_gates"), [(False, 2, True), (False, 1, False), (True, None, False), (True, 2, True)],
                         ids=["seq_top2_dg", "seq_onehot", "token_dense", "token_top2_dg"])
def test_every_forward_path_matches_float64(forward_path, per_token, top_k, grad_gates, device, poison_empty):
    # K*r = 24 pads to 32 columns, so the narrow 2-expert tile (16 wide) is a different kernel path.
    x, a, b, gates = make_case(20 + 3 * per_token + (top_k or 0), per_token, top_k, torch.float32, device, dims=(3, 13, 37, 29, 6, 4))
    inputs = [v.requires_grad_(i < 3 or grad_gates) for i, v in enumerate((x, a, b, gates))]
    assert rl.forward_path(x.shape[0] * x.shape[1], gates.shape[-1], a.shape[0] // gates.shape[-1]) == forward_path
    y = rl.routed_lora(*inputs, 0.5)
    ref_inputs = [v.detach().double().requires_grad_(v.requires_grad) for v in inputs]
    ref = routed_lora_reference(*ref_inputs, 0.5)
    assert rel_err(y, ref) < TOL[torch.float32]
    wanted = [i for i, v in enumerate(inputs) if v.requires_grad]
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(device)
    grads = torch.autograd.grad(y, [inputs[i] for i in wanted], dy)
    ref_grads = torch.autograd.grad(ref, [ref_inputs[i] for i in wanted], dy.double())
    for i, got, want in zip(wanted, grads, ref_grads, strict=True):
        assert rel_err(got, want) < TOL[torch.float32], ("dx", "dA", "dB", "dgates")[i]
    base = torch.randn(y.shape, generator=torch.Generator().manual_seed(6)).to(device)
    want_out = base.double() + ref.detach()
    assert rel_err(rl.routed_lora(*(v.detach() for v in inputs), 0.5, out=base), want_out) < TOL[torch.float32]


def test_unselected_experts_are_never_read(forward_path, device, poison_empty):
    """NaN weights of an expert no sequence selected must not reach y or any gradient (0 * NaN is NaN)."""
    x, a, b, _ = make_case(4, False, 2, torch.float32, device)
    k, r = 4, a.shape[0] // 4
    a, b = a[: k * r].clone(), b[:, : k * r].clone()
    gates = torch.tensor([[0.7, 0.0, 0.3, 0.0], [0.0, 0.0, 0.4, 0.6]], device=device)[: x.shape[0]]
    clean_a, clean_b = a.clone(), b.clone()
    a[r : 2 * r] = float("nan")
    b[:, r : 2 * r] = float("nan")
    inputs = [v.requires_grad_() for v in (x, a, b)]
    y = rl.routed_lora(*inputs, gates, 0.5)
    ref_inputs = [v.detach().double().requires_grad_() for v in (x, clean_a, clean_b)]
    ref = routed_lora_reference(*ref_inputs, gates.double(), 0.5)
    assert rel_err(y, ref) < TOL[torch.float32]
    for got, want in zip(torch.autograd.grad(y.sum(), inputs), torch.autograd.grad(ref.sum(), ref_inputs), strict=True):
        assert torch.isfinite(got).all()
        keep = torch.ones_like(want, dtype=torch.bool)
        if got.shape == a.shape:
            keep[r : 2 * r] = False
        elif got.shape == b.shape:
            keep[:, r : 2 * r] = False
        assert rel_err(got[keep], want[keep]) < TOL[torch.float32]
        assert not got[~keep].any(), "an unselected expert's weight gradient must be exactly zero"


def test_unselected_experts_get_exact_zero_weight_grads_with_gate_grad(forward_path, device, poison_empty):
    """Router training reads every expert (d/dg_k of a zero gate is not zero), yet an expert no sequence
    selected gets dA = dB = 0 exactly, and dgates still match the reference."""
    x, a, b, _ = make_case(9, False, 2, torch.float32, device, dims=(2, 11, 21, 19, 5, 3))
    gates = torch.tensor([[0.0, 0.6, 0.0, 0.4, 0.0], [0.0, 0.3, 0.0, 0.0, 0.7]], device=device)
    inputs = [v.requires_grad_() for v in (x, a, b, gates)]
    dy = torch.randn(2, 11, 19, generator=torch.Generator().manual_seed(2)).to(device)
    grads = torch.autograd.grad(rl.routed_lora(*inputs, 0.5), inputs, dy)
    ref_inputs = [v.detach().double().requires_grad_() for v in inputs]
    ref_grads = torch.autograd.grad(routed_lora_reference(*ref_inputs, 0.5), ref_inputs, dy.double())
    for name, got, want in zip(("dx", "dA", "dB", "dgates"), grads, ref_grads, strict=True):
        assert rel_err(got, want) < TOL[torch.float32], name
    da, db = grads[1].view(5, 3, 21), grads[2].view(19, 5, 3)
    for k in (0, 2):
        assert not da[k].any() and not db[:, k].any(), k
    assert da[1].abs().min() > 0 and db[:, 4].abs().max() > 0


def test_expert_selection_lists_the_gate_rows_of_each_expert():
    gates = torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.0, 1.0], [float("nan"), 0.0, 0.2], [0.9, 0.0, 0.0]])
    rows, count = rl.expert_selection(gates)
    assert rows.dtype == count.dtype == torch.int32 and rows.shape == (3, 4)
    assert count.tolist() == [3, 0, 3]
    assert rows[0, :3].tolist() == [0, 2, 3] and rows[2, :3].tolist() == [0, 1, 2]


def test_tuner_times_each_config_once_per_bucket_and_never_adds_twice(monkeypatch, device, poison_empty):
    """The GPU autotuner, run through the interpreter: every candidate is timed on a scratch copy of
    ``out``, the fastest is cached per token-count bucket, a config that fails is skipped."""
    configs = [rl.TileConfig(16, 16, 16, 1), rl.TileConfig(32, 16, 16, 2), rl.TileConfig(16, 16, 16, 1, num_warps=8)]
    outcomes = [2.0, 1.0, RuntimeError("out of resources")]  # candidates are timed in order
    timed = []

    def bench(fn):
        fn()
        outcome = outcomes[len(timed)]
        timed.append(outcome)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(rl, "TUNER", rl.Tuner())
    monkeypatch.setattr(rl, "_row_tile_candidates", lambda *args: configs)
    monkeypatch.setattr(rl, "_bench", bench)
    monkeypatch.setattr(rl, "DECODE_MAX_ROWS", 0)
    x, a, b, gates = make_case(12, False, 2, torch.float32, device, dims=(2, 20, 23, 21, 4, 3))
    base = torch.randn(2, 20, 21, generator=torch.Generator().manual_seed(1)).to(device)
    want = base.double() + routed_lora_reference(x.double(), a.double(), b.double(), gates.double(), 0.5)
    assert rel_err(rl.routed_lora(x, a, b, gates, 0.5, out=base), want) < TOL[torch.float32]
    assert timed == outcomes
    ((key, best),) = rl.TUNER.best.items()
    assert best == configs[1] and key[1] == rl.token_bucket(40) == 64
    assert [c for c, _ in rl.TUNER.failed[key]] == [configs[2]]
    rl.routed_lora(x[:, :17], a, b, gates, 0.5)  # 34 rows, the same bucket: no timing again
    assert len(timed) == 3


def test_dgates_are_deterministic(device):
    """Per-row partials and a segment sum, not atomics: two backward passes give identical bits."""
    x, a, b, gates = make_case(8, False, None, torch.float32, device)
    gates.requires_grad_()
    first, second = (torch.autograd.grad(rl.routed_lora(x, a, b, gates, 0.5).square().sum(), gates)[0] for _ in range(2))
    assert torch.equal(first, second)


@pytest.mark.parametrize("grad_gates", [False, True], ids=["frozen_gates", "gate_grad"])
def test_frozen_input_skips_dx_expand(grad_gates, monkeypatch, device, poison_empty):
    """A layer over frozen embeddings: x needs no grad, so the backward row tile saves dh (and dgates
    partials) without expanding into dx; dA, dB and dgates still match float64."""
    monkeypatch.setattr(rl, "DECODE_MAX_ROWS", 0)
    x, a, b, gates = make_case(13, False, 2, torch.float32, device, dims=(2, 9, 19, 17, 4, 3))
    inputs = [a.requires_grad_(), b.requires_grad_(), gates.requires_grad_(grad_gates)]
    y = rl.routed_lora(x, *inputs[:2], gates, 0.5)
    ref_inputs = [v.detach().double().requires_grad_(v.requires_grad) for v in inputs]
    ref = routed_lora_reference(x.double(), *ref_inputs[:2], ref_inputs[2], 0.5)
    wanted = [v for v in inputs if v.requires_grad]
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(device)
    grads = torch.autograd.grad(y, wanted, dy)
    ref_grads = torch.autograd.grad(ref, [v for v in ref_inputs if v.requires_grad], dy.double())
    assert len(grads) == 2 + grad_gates
    for got, want in zip(grads, ref_grads, strict=True):
        assert rel_err(got, want) < TOL[torch.float32]
