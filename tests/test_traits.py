import pytest
import torch

from personafuse.traits import BIG_FIVE, MBTI, TraitSet, get_trait_set


def test_big_five_has_ten_named_experts_in_trait_order():
    assert len(BIG_FIVE.expert_names) == 10
    assert BIG_FIVE.expert_names[:2] == ("openness_high", "openness_low")
    assert BIG_FIVE.index("neuroticism_low") == 9
    assert "calm" in BIG_FIVE.markers_of("neuroticism_low")


def test_high_pole_subset_and_mbti():
    high = get_trait_set("big_five", [f"{t}_high" for t in BIG_FIVE.traits])
    assert high.expert_names == tuple(f"{t}_high" for t in BIG_FIVE.traits)
    assert MBTI.num_experts == 8 and MBTI.traits[0] == "extraversion"


def test_custom_trait_set_roundtrip_and_validation():
    custom = TraitSet({"humour": {"high": ["witty"], "low": ["earnest"]}}, name="humour")
    assert TraitSet.from_dict(custom.to_dict()) == custom
    assert get_trait_set(custom.to_dict()).expert_names == ("humour_high", "humour_low")
    with pytest.raises(ValueError, match="no markers for pole"):
        TraitSet({"humour": {"high": ["witty"]}})
    with pytest.raises(ValueError, match="identifier"):
        TraitSet({"good humour": {"high": ["a"], "low": ["b"]}})
    with pytest.raises(ValueError, match="poles must be"):
        TraitSet({"humour": {"high": ["a"], "low": ["b"]}}, poles=("medium",))
    with pytest.raises(ValueError, match="full trait x pole grid"):
        BIG_FIVE.subset(["openness_high", "extraversion_low"])
    with pytest.raises(ValueError, match="unknown TraitSet key"):
        TraitSet.from_dict({"markers": {}, "colour": "blue"})


def test_activations_map_to_gates_and_back():
    activations = torch.tensor([[0.9, 0.0, -0.6, 0.2, -0.8]])
    targets = BIG_FIVE.activations_to_gate_targets(activations)
    torch.testing.assert_close(targets.sum(-1), torch.ones(1))
    assert BIG_FIVE.expert_names[targets.argmax()] == "openness_high"
    back = BIG_FIVE.gates_to_activations(targets)
    assert torch.equal(torch.sign(back[0, [0, 2, 4]]), torch.tensor([1.0, -1.0, -1.0]))
    neutral = BIG_FIVE.activations_to_gate_targets(torch.zeros(5))
    torch.testing.assert_close(neutral, torch.full((10,), 0.1))
    with pytest.raises(ValueError, match="expected 5 trait activations"):
        BIG_FIVE.activations_to_gate_targets(torch.zeros(4))
