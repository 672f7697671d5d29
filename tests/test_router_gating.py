"""The router head and its objectives: pole gating is well-formed, and both objectives learn separable contexts."""

import pytest
import torch
import torch.nn.functional as F

from personafuse import PersonaFuseConfig
from personafuse.router import PersonaRouter
from personafuse.traits import BIG_FIVE

# Five situation kinds, each calling for a different profile (signed activations per Big Five trait).
PROFILES = torch.tensor([
    [0.0, 0.6, -0.9, 0.3, 0.0],   # "just the answer"      -> extraversion_low
    [0.0, 0.0, 0.3, 0.9, -0.6],   # grief                  -> agreeableness_high
    [0.9, -0.6, 0.3, 0.0, 0.0],   # brainstorm             -> openness_high
    [0.0, 0.3, 0.0, -0.9, 0.0],   # "tear it apart"        -> agreeableness_low
    [0.3, 0.0, 0.0, 0.0, 0.9],    # nervous role-play      -> neuroticism_high
])


def toy_contexts(n_per_kind: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(PROFILES), 32, generator=torch.Generator().manual_seed(0)) * 2
    kinds = torch.arange(len(PROFILES)).repeat_interleave(n_per_kind)
    return centres[kinds] + torch.randn(len(kinds), 32, generator=g), PROFILES[kinds]


def top_pole_accuracy(gates: torch.Tensor, activations: torch.Tensor) -> float:
    wanted = BIG_FIVE.activations_to_gate_targets(activations, 0.05).argmax(-1)
    return (gates.argmax(-1) == wanted).float().mean().item()


def test_pole_gates_switch_on_one_pole_per_trait_with_the_activation_as_strength():
    torch.manual_seed(0)
    router = PersonaRouter(16, 10, hidden_size=8, gating="poles")
    out = router(torch.randn(6, 16))
    per_trait = out.gates.view(6, 5, 2)
    assert ((per_trait > 0).sum(-1) <= 1).all()
    torch.testing.assert_close(BIG_FIVE.gates_to_activations(out.gates), out.activations)


def test_pole_gates_top_k_keeps_the_most_activated_traits():
    torch.manual_seed(0)
    router = PersonaRouter(16, 10, hidden_size=8, gating="poles", top_k=2)
    out = router(torch.randn(6, 16))
    kept = BIG_FIVE.gates_to_activations(out.gates)
    assert ((kept != 0).sum(-1) == 2).all()
    strongest = out.activations.abs().topk(2, -1).indices.sort(-1).values
    assert torch.equal((kept != 0).nonzero()[:, 1].view(6, 2), strongest)


@pytest.mark.parametrize("gating", ["softmax", "poles"])
def test_router_objective_learns_separable_contexts(gating):
    torch.manual_seed(0)
    x, activations = toy_contexts(20, seed=1)
    router = PersonaRouter(32, 10, hidden_size=32, gating=gating)
    optimizer = torch.optim.Adam(router.parameters(), lr=1e-2)
    targets = BIG_FIVE.activations_to_gate_targets(activations, 0.25)
    for _ in range(150):
        out = router(x)
        if gating == "poles":
            loss = F.mse_loss(out.activations, activations)
        else:
            loss = F.kl_div(out.probs.clamp_min(1e-9).log(), targets, reduction="batchmean")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    router.eval()
    x_test, a_test = toy_contexts(10, seed=2)
    with torch.no_grad():
        assert top_pole_accuracy(router(x_test).gates, a_test) >= 0.95
        untrained = PersonaRouter(32, 10, hidden_size=32, gating=gating).eval()
        assert top_pole_accuracy(untrained(x_test).gates, a_test) < 0.6


def test_pole_gating_needs_both_poles_of_every_trait():
    with pytest.raises(ValueError, match="both poles"):
        PersonaFuseConfig(experts=[f"{t}_high" for t in BIG_FIVE.traits], router={"gating": "poles"})
    with pytest.raises(ValueError, match="exceeds the 5 traits"):
        PersonaFuseConfig(router={"gating": "poles", "top_k": 6})
    with pytest.raises(ValueError, match="router.gating"):
        PersonaFuseConfig(router={"gating": "sparsemax"})
