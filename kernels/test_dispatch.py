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


def test_out_is_added_in_place_by_both_backends(monkeypatch, operands):
    """``routing.routed_lora(..., out=)`` adds into ``out`` and returns it, torch and Triton alike."""
    pytest.importorskip("triton")
    kernels = routing._registry["triton"]
    monkeypatch.setitem(routing._registry, "triton", routing.Kernels(kernels.routed_lora, kernels.compute_gates, lambda t: True))
    want = routing.routed_lora_torch(*operands, 2.0)
    for backend in ("torch", "triton"):
        monkeypatch.setenv(routing.BACKEND_ENV, backend)
        base = torch.ones(*want.shape)
        assert routing.routed_lora(*operands, 2.0, out=base) is base
        torch.testing.assert_close(base, want + 1)


def test_layer_adds_into_base_output(monkeypatch):
    """``MoELoraLinear`` passes the base output as ``out=`` when dtypes agree, and falls back otherwise."""
    from personafuse.layer import MoELoraLinear, RoutingState

    torch.manual_seed(0)
    state = RoutingState()
    layer = MoELoraLinear(torch.nn.Linear(8, 7), num_experts=3, r=2, alpha=4.0, dropout=0.0, state=state)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 5, 8)
    state.gates = torch.softmax(torch.randn(2, 3), -1)
    seen = []
    real = routing.routed_lora_torch
    monkeypatch.setattr("personafuse.layer.routed_lora", lambda *a, out=None: seen.append(out) or routing.routed_lora(*a, out=out))
    want = layer.base_layer(x) + real(x, layer.lora_A, layer.lora_B, state.gates, layer.scaling)
    torch.testing.assert_close(layer(x), want)
    assert seen[-1] is not None and seen[-1].shape == want.shape
    layer.base_layer.to(torch.float64)
    got = layer(x.double())
    assert seen[-1] is None and got.dtype == torch.float64
    torch.testing.assert_close(got, want.double(), rtol=1e-5, atol=1e-5)
