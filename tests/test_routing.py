import pytest
import torch

from personafuse.routing import compute_gates, routed_lora, routed_lora_reference, set_backend


@pytest.fixture(autouse=True)
def torch_backend():
    set_backend("torch")
    yield
    set_backend(None)


def _inputs(per_token: bool, top_k: int | None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    B, T, d_in, d_out, K, r = 3, 5, 12, 9, 6, 4
    x = torch.randn(B, T, d_in, generator=gen, dtype=torch.float64)
    A = torch.randn(K * r, d_in, generator=gen, dtype=torch.float64)
    Bm = torch.randn(d_out, K * r, generator=gen, dtype=torch.float64)
    logits = torch.randn(*((B, T) if per_token else (B,)), K, generator=gen, dtype=torch.float64)
    gates, _ = compute_gates(logits, 0.7, top_k)
    return x, A, Bm, gates


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("top_k", [None, 2])
def test_stacked_equals_per_expert_loop(per_token, top_k):
    x, A, B, gates = _inputs(per_token, top_k)
    torch.testing.assert_close(routed_lora(x, A, B, gates, 2.0), routed_lora_reference(x, A, B, gates, 2.0),
                               rtol=1e-12, atol=1e-12)


def test_gates_sum_to_one_and_top_k_zeros_the_rest():
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(1))
    dense, load = compute_gates(logits)
    torch.testing.assert_close(dense.sum(-1), torch.ones(8))
    torch.testing.assert_close(load.sum(), torch.tensor(1.0))
    sparse, load = compute_gates(logits, top_k=3)
    torch.testing.assert_close(sparse.sum(-1), torch.ones(8))
    assert ((sparse > 0).sum(-1) == 3).all()
    kept = torch.topk(logits, 3).indices
    assert torch.equal(torch.sort(kept).values, torch.sort(torch.topk(sparse, 3).indices).values)
    torch.testing.assert_close(load.sum(), torch.tensor(1.0))


def test_gate_shape_mismatch_is_a_clear_error():
    x, A, B, gates = _inputs(False, None)
    with pytest.raises(ValueError, match="do not match input"):
        routed_lora(x, A, B, gates[:2], 1.0)
    with pytest.raises(ValueError, match="not a multiple"):
        routed_lora(x, A[:-1], B, gates, 1.0)


def test_bad_router_settings():
    with pytest.raises(ValueError, match="top_k"):
        compute_gates(torch.randn(2, 4), top_k=5)
    with pytest.raises(ValueError, match="temperature"):
        compute_gates(torch.randn(2, 4), temperature=0.0)


def test_backend_env_is_validated(monkeypatch):
    x, A, B, gates = _inputs(False, None)
    set_backend(None)
    monkeypatch.setenv("PERSONAFUSE_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="PERSONAFUSE_BACKEND"):
        routed_lora(x, A, B, gates, 1.0)


def test_reference_adds_into_out_like_the_dispatcher():
    x, A, B, gates = _inputs(False, None)
    base = torch.randn(*x.shape[:-1], B.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected = base + routed_lora_reference(x, A, B, gates, 2.0)
    out = base.clone()
    assert routed_lora_reference(x, A, B, gates, 2.0, out=out) is out
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
