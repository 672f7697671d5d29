"""``personafuse.routing`` picks the backend: env switch, registration, and a clear error."""

from __future__ import annotations

import personafuse.kernels  # noqa: F401  (registers the backend)
import pytest
import torch

from personafuse import routing


@pytest.fixture
def operands():
    gen = torch.Generator().manual_seed(0)
    x, a, b = torch.randn(2, 5, 8, generator=gen), torch.randn(6, 8, generator=gen), torch.randn(7, 6, generator=gen)
    return x, a, b, torch.softmax(torch.randn(2, 3, generator=gen), -1)


@pytest.fixture(autouse=True)
def unforced():
    routing.set_backend(None)
    yield
    routing.set_backend(None)


def test_registered_but_not_for_cpu(operands):
    kernels = routing._registry["triton"]
    assert kernels.supports is personafuse.kernels.supports
    assert not kernels.supports(operands[0])


def test_torch_forced_and_auto_on_cpu(monkeypatch, operands):
    for choice in ("torch", "auto"):
        monkeypatch.setenv(routing.BACKEND_ENV, choice)
        assert routing.active_backend(operands[0]) == "torch"
        torch.testing.assert_close(routing.routed_lora(*operands, 2.0), routing.routed_lora_torch(*operands, 2.0))


def test_triton_forced_on_cpu_raises(monkeypatch, operands):
    monkeypatch.setenv(routing.BACKEND_ENV, "triton")
    with pytest.raises(RuntimeError, match="PERSONAFUSE_BACKEND=triton but the Triton kernels cannot run here"):
        routing.routed_lora(*operands, 2.0)


def test_triton_dispatch_runs_the_kernels(monkeypatch, operands):
    """With ``supports`` forced true, the routing entry points reach the (interpreted) kernels."""
    pytest.importorskip("triton")
    if not personafuse.kernels.supports(operands[0]):
        kernels = routing._registry["triton"]
        monkeypatch.setitem(routing._registry, "triton", routing.Kernels(kernels.routed_lora, kernels.compute_gates, lambda t: True))
    monkeypatch.setenv(routing.BACKEND_ENV, "triton")
    torch.testing.assert_close(routing.routed_lora(*operands, 2.0), routing.routed_lora_torch(*operands, 2.0))
    logits = torch.randn(9, 3)
    for got, want in zip(routing.compute_gates(logits, 1.0, 2), routing.compute_gates_torch(logits, 1.0, 2), strict=True):
        torch.testing.assert_close(got, want)
