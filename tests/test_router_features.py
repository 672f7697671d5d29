"""Router training on cached features: the features are the router's own, cached safely, and the fit learns."""

import pytest
import torch

from personafuse import PersonaFuseConfig, PersonaFuseModel
from personafuse.data import Situation
from personafuse.training import router_features
from personafuse.training.router import RouterLossWeights
from personafuse.training.router_features import (
    cached_features,
    encode_situations,
    fit_router,
    route_situations,
)
from tests.tiny import make_tiny_llama, make_tiny_tokenizer

ZERO = {"openness": 0.0, "conscientiousness": 0.0, "extraversion": 0.0, "agreeableness": 0.0, "neuroticism": 0.0}


def situation(i: int, text: str, **activations) -> Situation:
    return Situation.from_dict({"id": f"s{i}", "domain": "d", "split": "train",
                                "situation": [{"role": "user", "content": text}], "activations": {**ZERO, **activations}})


SITUATIONS = [situation(0, "short"), situation(1, "a much longer message than the first one, to force padding"),
              situation(2, "hello there", extraversion=0.9), situation(3, "tear my essay apart", agreeableness=-0.9)]


@pytest.fixture(scope="module")
def stack():
    tokenizer = make_tiny_tokenizer()
    return PersonaFuseModel.from_base(make_tiny_llama(tokenizer), PersonaFuseConfig(router={"gating": "poles"}),
                                      tokenizer=tokenizer), tokenizer


def test_batched_features_equal_the_router_reading_each_context_alone(stack):
    pf, tokenizer = stack
    batched = encode_situations(pf, tokenizer, SITUATIONS, max_length=256, batch_size=3, progress=False)
    for s, row in zip(SITUATIONS, batched, strict=True):
        prompt = tokenizer.apply_chat_template(s.situation, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        torch.testing.assert_close(row, pf.routing.encode(ids, torch.ones_like(ids))[0].float(), atol=1e-5, rtol=1e-5)


def test_features_are_reused_until_the_contexts_change(stack, tmp_path, monkeypatch):
    pf, tokenizer = stack
    path = tmp_path / "features.safetensors"
    first = cached_features(path, pf, tokenizer, SITUATIONS, 256, progress=False)
    monkeypatch.setattr(router_features, "encode_situations", lambda *a, **k: pytest.fail("encoded again"))
    torch.testing.assert_close(cached_features(path, pf, tokenizer, SITUATIONS, 256, progress=False), first)
    monkeypatch.undo()
    changed = cached_features(path, pf, tokenizer, SITUATIONS[:2], 256, progress=False)
    assert changed.shape[0] == 2


def test_fit_router_learns_labels_from_features(stack):
    pf, tokenizer = stack
    traits = pf.trait_set
    torch.manual_seed(0)
    features = torch.randn(40, pf.router.embed[1].in_features)
    activations = torch.zeros(40, 5)
    activations[:20, 2], activations[20:, 3] = 0.9, -0.9  # two kinds: extraversion high, agreeableness low
    features[:20] += 2.0
    targets = traits.activations_to_gate_targets(activations, 0.25)
    weights = RouterLossWeights(kl=0.0, activation=1.0, lm=0.0, contrastive=0.0, aux=0.0)
    before = torch.nn.functional.mse_loss(pf.router(features).activations, activations).item()
    summary = fit_router(pf.router, features, activations, targets, weights, max_steps=150, batch_size=8,
                         learning_rate=1e-2, seed=0)
    after = torch.nn.functional.mse_loss(pf.router(features).activations, activations).item()
    assert after < 0.1 * before and summary["activation"] < 0.05
    top = pf.router(features).gates.argmax(-1)
    assert (top[:20] == traits.index("extraversion_high")).all() and (top[20:] == traits.index("agreeableness_low")).all()


def test_batched_routing_gives_the_gates_of_routing_each_context_alone(stack):
    pf, tokenizer = stack
    pf.eval()
    batched = route_situations(pf, tokenizer, SITUATIONS, batch_size=3)
    one_by_one = torch.stack([pf.route_context(s.situation, tokenizer, max_length=512) for s in SITUATIONS])
    assert batched.shape == (len(SITUATIONS), pf.trait_set.num_experts)
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)
