"""The sparse routed-LoRA path (only the selected experts' r-blocks) against the dense path and the loop,
its automatic choice, the lean inference path, and generation with top-k routing."""

import pytest
import torch

from personafuse import PersonaFuseConfig, PersonaFuseModel, routing
from personafuse.route_plan import RoutePlan
from personafuse.routing import compute_gates, routed_lora, routed_lora_reference
from tests.tiny_models import VOCAB, randomize_experts, tiny_llama

K, R, D_IN, D_OUT = 6, 4, 12, 9


@pytest.fixture(autouse=True)
def torch_backend():
    routing.set_backend("torch")
    routing.path_counts.clear()
    yield
    routing.set_backend(None)
    routing.set_routed_path(None)


def _operands(sequences: int, length: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sequences, length, D_IN, generator=gen, dtype=torch.float64, requires_grad=True)
    A = torch.randn(K * R, D_IN, generator=gen, dtype=torch.float64, requires_grad=True)
    B = torch.randn(D_OUT, K * R, generator=gen, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(sequences, K, generator=gen, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(sequences, length, D_OUT, generator=gen, dtype=torch.float64)
    return x, A, B, logits, grad_out


def _run(path, x, A, B, logits, grad_out, top_k):
    """Output and the gradients of x, A, B, the gates and the router logits behind them."""
    gates, _ = compute_gates(logits, 0.7, top_k)
    gates.retain_grad()
    y = routed_lora(x, A, B, gates, 2.0, path=path)
    y.backward(grad_out)
    grads = [t.grad.clone() for t in (x, A, B, gates, logits)]
    for t in (x, A, B, logits):
        t.grad = None
    return y.detach(), gates.detach(), grads


# (sequences, tokens): per-sequence batched GEMMs (long sequences, different experts) and the shared
# union (one sequence; decode-sized rows)
@pytest.mark.parametrize("shape", [(3, 40), (1, 7), (4, 1)])
@pytest.mark.parametrize("top_k", [1, 2, K])
def test_sparse_equals_dense_and_loop_forward_and_grads(shape, top_k):
    x, A, B, logits, grad_out = _operands(*shape)
    y_dense, gates, (dx, dA, dB, dg, dlogits) = _run("dense", x, A, B, logits, grad_out, top_k)
    y_sparse, _, (sx, sA, sB, sg, slogits) = _run("sparse", x, A, B, logits, grad_out, top_k)
    assert routing.path_counts == {"torch-dense": 1, "torch-sparse": 1}
    exact = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_sparse, routed_lora_reference(x.detach(), A.detach(), B.detach(), gates, 2.0), **exact)
    torch.testing.assert_close(y_sparse, y_dense, **exact)
    for dense, sparse in ((dx, sx), (dA, sA), (dB, sB), (dlogits, slogits)):
        torch.testing.assert_close(sparse, dense, **exact)
    routed = gates != 0
    # a zero gate is "not routed": the sparse path gives it no gradient; top-k masks it in the router anyway
    torch.testing.assert_close(sg[routed], dg[routed], **exact)
    assert torch.equal(sg[~routed], torch.zeros_like(sg[~routed]))


def test_unselected_experts_get_exactly_zero_gradient_and_are_never_read():
    x, A, B, _, grad_out = _operands(2, 9)
    gates = torch.zeros(2, K, dtype=torch.float64)
    gates[0, 1], gates[0, 4], gates[1, 4] = 0.6, 0.4, 1.0
    selected = torch.tensor([1, 4])
    y = routed_lora(x, A, B, gates, 2.0)  # auto: per-sequence gates, at most half nonzero -> sparse
    assert routing.path_counts == {"torch-sparse": 1}
    y.backward(grad_out)
    blocks = A.grad.view(K, R, D_IN)
    unselected = [k for k in range(K) if k not in selected]
    assert torch.equal(blocks[unselected], torch.zeros_like(blocks[unselected]))
    assert torch.equal(B.grad.view(D_OUT, K, R)[:, unselected], torch.zeros(D_OUT, len(unselected), R, dtype=torch.float64))
    assert (blocks[selected].abs().sum((1, 2)) > 0).all()
    poisoned_A, poisoned_B = A.detach().clone(), B.detach().clone()
    poisoned_A.view(K, R, D_IN)[unselected] = float("nan")
    poisoned_B.view(D_OUT, K, R)[:, unselected] = float("nan")
    torch.testing.assert_close(routed_lora(x.detach(), poisoned_A, poisoned_B, gates, 2.0), y.detach(), rtol=0, atol=0)


def test_automatic_choice_and_override():
    x, A, B, _, _ = _operands(2, 5)
    x = x.detach()
    half = torch.zeros(2, K, dtype=torch.float64)
    half[:, : K // 2] = 1.0 / (K // 2)
    dense = torch.full((2, K), 1.0 / K, dtype=torch.float64)
    per_token = torch.full((2, 5, K), 1.0 / K, dtype=torch.float64)
    for gates, path in ((half, "sparse"), (dense, "dense"), (per_token, "dense")):
        routing.path_counts.clear()
        routed_lora(x, A, B, gates, 1.0)
        assert routing.path_counts == {f"torch-{path}": 1}
    routing.set_routed_path("dense")
    routing.path_counts.clear()
    routed_lora(x, A, B, half, 1.0)
    assert routing.path_counts == {"torch-dense": 1}
    with pytest.raises(ValueError, match="per-sequence gates"):
        routed_lora(x, A, B, per_token, 1.0, path="sparse")
    with pytest.raises(ValueError, match="unknown routed-LoRA path"):
        routing.set_routed_path("fast")


def test_path_env_is_validated(monkeypatch):
    x, A, B, logits, _ = _operands(2, 3)
    monkeypatch.setenv(routing.PATH_ENV, "sparse")
    routed_lora(x.detach(), A, B, torch.softmax(logits.detach(), -1), 1.0)
    assert routing.path_counts == {"torch-sparse": 1}
    monkeypatch.setenv(routing.PATH_ENV, "fastest")
    with pytest.raises(ValueError, match="PERSONAFUSE_ROUTED_PATH"):
        routed_lora(x, A, B, torch.softmax(logits, -1), 1.0)


@pytest.mark.parametrize("gate_kind", ["same", "different", "dense", "per_token"])
@pytest.mark.parametrize("tokens", [1, 30])
def test_lean_inference_path_adds_into_out_and_reuses_its_weights(gate_kind, tokens):
    """Without autograd the delta goes straight into ``out``, with gate-folded weights the plan keeps for
    the next decode step; the weights are rebuilt when they change in place."""
    x, A, B, logits, _ = _operands(3, tokens)
    x, A, B = x.detach(), A.detach().clone(), B.detach().clone()
    if gate_kind == "per_token":
        gates = compute_gates(torch.randn(3, tokens, K, dtype=torch.float64), top_k=2)[0]
    elif gate_kind == "same":
        gates = compute_gates(logits.detach()[:1], top_k=2)[0].expand(3, K)
    else:
        gates = compute_gates(logits.detach(), top_k=None if gate_kind == "dense" else 2)[0]
    plan = RoutePlan(gates)
    base = torch.randn(3, tokens, D_OUT, dtype=torch.float64)
    for _ in range(2):
        with torch.no_grad():
            out = base.clone()
            assert routed_lora(x, A, B, plan, 2.0, out=out) is out
        torch.testing.assert_close(out, base + routed_lora_reference(x, A, B, gates, 2.0), rtol=1e-12, atol=1e-12)
        with torch.no_grad():
            A.mul_(1.5)  # an optimizer step between calls: the plan must not serve stale weights


def _pf(top_k):
    pf = PersonaFuseModel.from_base(tiny_llama(0), PersonaFuseConfig(r=4, alpha=8.0, dropout=0.0))
    pf.router.top_k = top_k
    randomize_experts(pf, 0)
    with torch.no_grad():
        pf.router.head.weight.normal_(0, 3.0, generator=torch.Generator().manual_seed(1))
    return pf


def test_generation_with_top2_routing_equals_generation_with_those_gates_fixed():
    pf = _pf(top_k=2)
    prompts = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(0))
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    pf.routing.router_calls = 0
    routed = pf.generate(input_ids=prompts, **settings)
    assert pf.routing.router_calls == 1  # one router call for the whole batch, gates kept through decoding
    gates = pf.last_gates.clone()
    assert ((gates != 0).sum(-1) == 2).all() and torch.unique(gates, dim=0).shape[0] == 3
    assert routing.path_counts["torch-sparse"] > 0 and routing.path_counts["torch-dense"] == 0
    with pf.fixed_gates(gates):
        fixed = pf.generate(input_ids=prompts, **settings)
    assert torch.equal(routed, fixed)
    routing.set_routed_path("dense")
    with pf.fixed_gates(gates):
        dense = pf.generate(input_ids=prompts, **settings)
    assert torch.equal(routed, dense)
    for i in range(3):  # batched serving: each sequence as if it ran alone with its own gates
        with pf.fixed_gates(gates[i]):
            alone = pf.generate(input_ids=prompts[i : i + 1], **settings)
        assert torch.equal(alone[0], routed[i])


def test_decode_steps_skip_the_aux_loss_but_prefill_keeps_it():
    pf = _pf(top_k=2)
    seen = []
    pf.model.register_forward_hook(lambda _m, _a, out: seen.append(out.get("aux_loss")))
    pf.generate(input_ids=torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2)),
                max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert seen[0] is not None and all(aux is None for aux in seen[1:]) and len(seen) == 3
