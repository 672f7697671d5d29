"""Mixed precision: under autocast the routed delta runs in the autocast dtype on both backends, with
fp32 master weights, and matches a float64 reference within bf16 tolerance. Triton runs through the
interpreter here (its bf16 tiles multiplied as fp32, see ``_dot``); the compiled bf16 path needs a GPU."""

from __future__ import annotations

import personafuse.kernels as pk
import pytest
import torch

from personafuse import routing
from personafuse.layer import MoELoraLinear, RoutingState

pytest.importorskip("triton")

BF16_TOL = 2e-2  # relative to the largest reference value: a few bf16 roundings (2**-8 each) of sums


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    if request.param == "triton":
        kernels = routing._registry["triton"]
        monkeypatch.setitem(routing._registry, "triton",
                            routing.Kernels(kernels.routed_lora, kernels.compute_gates, lambda t: True))
    routing.set_backend(request.param)
    yield request.param
    routing.set_backend(None)


def make_layer(seed=0):
    torch.manual_seed(seed)
    layer = MoELoraLinear(torch.nn.Linear(48, 40), num_experts=4, r=8, alpha=16.0, dropout=0.0, state=RoutingState())
    torch.nn.init.normal_(layer.lora_B, std=0.2)
    return layer


def inputs(seed=1, tokens=20):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, tokens, 48, generator=gen)
    gates = torch.softmax(torch.randn(2, 4, generator=gen) * 2, -1)
    return x, gates, torch.randn(2, tokens, 40, generator=gen)


def float64_reference(layer, x, gates, weight):
    params = [p.detach().double().requires_grad_() for p in (layer.lora_A, layer.lora_B)]
    x64, g64 = x.detach().double().requires_grad_(), gates.detach().double().requires_grad_()
    base = torch.nn.functional.linear(x64, layer.base_layer.weight.double(), layer.base_layer.bias.double())
    y = base + routing.routed_lora_reference(x64, *params, g64, layer.scaling)
    (y * weight.double()).sum().backward()
    return y, {"x": x64.grad, "gates": g64.grad, "lora_A": params[0].grad, "lora_B": params[1].grad}


def assert_close_relative(got, want, what):
    error = (got.double() - want).abs().max() / want.abs().max()
    assert error <= BF16_TOL, f"{what}: relative error {error:.3g} > {BF16_TOL}"


@pytest.mark.parametrize("tokens", [3, 20], ids=["decode", "row_tile"])
def test_bf16_autocast_runs_the_delta_in_bf16_with_fp32_master_weights(backend, monkeypatch, tokens):
    layer = make_layer()
    x, gates, weight = inputs(tokens=tokens)
    x.requires_grad_()
    gates.requires_grad_()
    layer.state.gates = gates
    seen = []
    monkeypatch.setattr("personafuse.layer.routed_lora",
                        lambda x, A, B, plan, s, out=None: seen.append((x.dtype, A.dtype, B.dtype))
                        or routing.routed_lora(x, A, B, plan, s, out=out))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        assert routing.active_backend(y) == backend
    assert seen == [(torch.bfloat16,) * 3] and y.dtype == torch.bfloat16
    (y.float() * weight).sum().backward()
    want, grads = float64_reference(layer, x, gates, weight)
    assert_close_relative(y, want, "output")
    got = {"x": x.grad, "gates": gates.grad, "lora_A": layer.lora_A.grad, "lora_B": layer.lora_B.grad}
    for name in ("lora_A", "lora_B"):
        assert getattr(layer, name).dtype == torch.float32 and got[name].dtype == torch.float32  # master weights
    for name, grad in grads.items():
        assert_close_relative(got[name], grad, f"d{name}")


def test_without_autocast_the_delta_keeps_the_weights_dtype(backend):
    layer = make_layer()
    x, gates, weight = inputs()
    layer.state.gates = gates
    y = layer(x)
    want, _ = float64_reference(layer, x, gates, weight)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), want.detach(), atol=1e-4, rtol=1e-4)


def test_device_guard_names_the_inputs_device():
    guard = pk.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(pk.device_guard(torch.device("cpu")), torch.cuda.device)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_layer_on_a_second_gpu_launches_there():
    layer = make_layer().to("cuda:1")
    x, gates, _ = inputs()
    layer.state.gates = gates.to("cuda:1")
    routing.set_backend("triton")
    try:
        with torch.cuda.device(0):
            got = layer(x.to("cuda:1"))
    finally:
        routing.set_backend(None)
    layer.state.gates = gates
    torch.testing.assert_close(got.cpu(), layer.cpu()(x), atol=1e-4, rtol=1e-4)


def test_inference_casts_the_weights_once_until_they_change():
    """Decode steps reuse one bf16 copy (and the route plan's caches keyed by it); training casts differentiably."""
    layer = make_layer()
    with torch.no_grad():
        A, B = layer.weights_in(torch.bfloat16)
        assert A.dtype == B.dtype == torch.bfloat16
        assert layer.weights_in(torch.bfloat16)[0] is A
        layer.lora_B.add_(1.0)
        A2, B2 = layer.weights_in(torch.bfloat16)
        assert A2 is not A and torch.equal(B2, layer.lora_B.to(torch.bfloat16))
    assert layer.weights_in(torch.bfloat16)[0].grad_fn is not None
    assert layer.weights_in(torch.float32)[0] is layer.lora_A
