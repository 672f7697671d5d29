"""Fused router vs ``compute_gates_torch``: gates, load, and the logits gradient."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import personafuse.kernels.router as router  # noqa: E402

from personafuse.routing import compute_gates_torch  # noqa: E402

from .conftest import INTERPRET  # noqa: E402

DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(router, "BLOCK_ROWS", 16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "top_k"), [((37, 5), None), ((3, 11, 10), 2), ((2, 13), 1), ((21, 64), 64)])
def test_matches_torch(shape, top_k, dtype, device, poison_empty):
    gen = torch.Generator().manual_seed(shape[-1])
    logits = (3 * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype).requires_grad_()
    gates, load = router.compute_gates(logits, 0.7, top_k)
    ref_logits = logits.detach().float().requires_grad_()
    ref_gates, ref_load = compute_gates_torch(ref_logits, 0.7, top_k)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert gates.dtype == dtype and gates.shape == logits.shape
    torch.testing.assert_close(gates.float(), ref_gates, atol=tol, rtol=tol)
    torch.testing.assert_close(load, ref_load, atol=1e-6, rtol=1e-6)
    assert not load.requires_grad

    dg = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    (got,) = torch.autograd.grad(gates, logits, dg)
    (want,) = torch.autograd.grad(ref_gates, ref_logits, dg.float())
    torch.testing.assert_close(got.float(), want, atol=10 * tol, rtol=10 * tol)


def test_validation_and_fallback(device):
    logits = torch.randn(4, 6, device=device)
    with pytest.raises(ValueError, match="top_k"):
        router.compute_gates(logits, 1.0, 7)
    with pytest.raises(ValueError, match="temperature"):
        router.compute_gates(logits, 0.0)
    wide = torch.randn(3, router.MAX_EXPERTS + 1, device=device)
    for got, want in zip(router.compute_gates(wide, 1.0, 2), compute_gates_torch(wide, 1.0, 2), strict=True):
        torch.testing.assert_close(got, want)
