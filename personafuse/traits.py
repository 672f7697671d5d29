"""Trait taxonomies: which experts exist and how gates map to trait activations.

An expert is one pole of one trait, named ``"<trait>_<pole>"``. The Big Five with both poles gives
ten experts; subsets (e.g. the five high poles) and custom taxonomies (e.g. MBTI dimensions) use the
same machinery, so the router, the data loaders and the export all agree on one ordering.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

POLES = ("high", "low")

BIG_FIVE_MARKERS: dict[str, dict[str, tuple[str, ...]]] = {
    "openness": {
        "high": ("curious", "imaginative", "inventive", "open to new ideas"),
        "low": ("conventional", "practical", "down-to-earth", "prefers the familiar"),
    },
    "conscientiousness": {
        "high": ("organised", "careful", "thorough", "dependable"),
        "low": ("spontaneous", "casual", "flexible", "easy-going about details"),
    },
    "extraversion": {
        "high": ("energetic", "talkative", "enthusiastic", "outgoing"),
        "low": ("reserved", "quiet", "reflective", "brief"),
    },
    "agreeableness": {
        "high": ("warm", "kind", "cooperative", "compassionate"),
        "low": ("blunt", "critical", "competitive", "sceptical"),
    },
    "neuroticism": {
        "high": ("anxious", "worried", "tense", "emotionally reactive"),
        "low": ("calm", "steady", "reassuring", "emotionally stable"),
    },
}

MBTI_MARKERS: dict[str, dict[str, tuple[str, ...]]] = {
    "extraversion": {"high": ("outgoing", "energised by people"), "low": ("introverted", "energised by solitude")},
    "intuition": {"high": ("abstract", "future-oriented"), "low": ("concrete", "detail-oriented")},
    "thinking": {"high": ("logical", "objective"), "low": ("values-driven", "empathetic")},
    "judging": {"high": ("planned", "decisive"), "low": ("adaptable", "spontaneous")},
}


def expert_name(trait: str, pole: str) -> str:
    return f"{trait}_{pole}"


@dataclass(frozen=True)
class TraitSet:
    """An ordered set of traits and the poles that get an expert.

    Args:
        markers: trait -> pole -> marker adjectives. Poles must be ``"high"`` and/or ``"low"``.
        poles: which poles get an expert (default both). ``("high",)`` gives one expert per trait.
        name: a label saved with checkpoints.
    """

    markers: Mapping[str, Mapping[str, Sequence[str]]]
    poles: tuple[str, ...] = POLES
    name: str = "custom"
    traits: tuple[str, ...] = field(init=False)
    expert_names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not self.markers:
            raise ValueError("TraitSet needs at least one trait")
        poles = tuple(self.poles)
        if not poles or len(set(poles)) != len(poles) or any(p not in POLES for p in poles):
            raise ValueError(f"TraitSet.poles must be a non-empty subset of {POLES}, got {self.poles!r}")
        for trait, by_pole in self.markers.items():
            if not trait.isidentifier():
                raise ValueError(f"trait name {trait!r} must be an identifier (letters, digits, underscores)")
            missing = [p for p in poles if p not in by_pole]
            if missing:
                raise ValueError(f"trait {trait!r} has no markers for pole(s) {missing}")
        object.__setattr__(self, "poles", poles)
        object.__setattr__(self, "traits", tuple(self.markers))
        names = tuple(expert_name(t, p) for t in self.markers for p in poles)
        object.__setattr__(self, "expert_names", names)

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    def index(self, name: str) -> int:
        """Position of an expert in the gate vector; unknown names list the valid ones."""
        try:
            return self.expert_names.index(name)
        except ValueError:
            raise KeyError(f"unknown expert {name!r}; experts are {list(self.expert_names)}") from None

    def markers_of(self, name: str) -> tuple[str, ...]:
        trait, pole = self.split(name)
        return tuple(self.markers[trait][pole])

    def split(self, name: str) -> tuple[str, str]:
        self.index(name)
        trait, _, pole = name.rpartition("_")
        return trait, pole

    def subset(self, experts: Sequence[str]) -> TraitSet:
        """Keep only the named experts' traits and poles (the result must be a full trait x pole grid)."""
        for e in experts:
            self.index(e)
        traits = {self.split(e)[0] for e in experts}
        poles = tuple(p for p in self.poles if any(self.split(e)[1] == p for e in experts))
        kept = TraitSet({t: self.markers[t] for t in self.traits if t in traits}, poles, self.name)
        if set(kept.expert_names) != set(experts):
            raise ValueError(
                f"experts {list(experts)} are not a full trait x pole grid; "
                f"choose poles for all kept traits (would be {list(kept.expert_names)})"
            )
        return kept

    def gates_from_mapping(self, weights: Mapping[str, float]) -> torch.Tensor:
        """``{expert_name: weight}`` -> a gate vector in expert order (missing experts get 0)."""
        gates = torch.zeros(self.num_experts)
        for name, w in weights.items():
            gates[self.index(name)] = float(w)
        return gates

    def activations_to_gate_targets(self, activations: torch.Tensor, temperature: float = 0.25) -> torch.Tensor:
        """Trait activations in [-1, 1] (``[..., n_traits]``) -> a target gate distribution.

        Each pole scores ``+a`` (high) or ``-a`` (low); a softmax over all experts at ``temperature``
        puts mass on the poles the situation calls for, and stays uniform for a neutral situation.
        """
        if activations.shape[-1] != len(self.traits):
            raise ValueError(f"expected {len(self.traits)} trait activations {self.traits}, got {activations.shape[-1]}")
        sign = {"high": 1.0, "low": -1.0}
        scores = torch.stack([sign[p] * activations[..., i] for i in range(len(self.traits)) for p in self.poles], -1)
        return torch.softmax(scores / temperature, dim=-1)

    def gates_to_activations(self, gates: torch.Tensor) -> torch.Tensor:
        """Gates ``[..., K]`` -> per-trait activation ``g_high - g_low`` in [-1, 1] (``[..., n_traits]``).

        With only one pole per trait the activation is that pole's gate (signed by the pole).
        """
        if gates.shape[-1] != self.num_experts:
            raise ValueError(f"expected {self.num_experts} gates {self.expert_names}, got {gates.shape[-1]}")
        per = gates.reshape(*gates.shape[:-1], len(self.traits), len(self.poles))
        sign = torch.tensor([1.0 if p == "high" else -1.0 for p in self.poles], dtype=gates.dtype, device=gates.device)
        return (per * sign).sum(-1)

    def to_dict(self) -> dict:
        return {"name": self.name, "poles": list(self.poles), "markers": {t: {p: list(m) for p, m in v.items()} for t, v in self.markers.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> TraitSet:
        unknown = set(d) - {"name", "poles", "markers"}
        if unknown:
            raise ValueError(f"unknown TraitSet key(s) {sorted(unknown)}; expected name, poles, markers")
        return cls(markers=d["markers"], poles=tuple(d.get("poles", POLES)), name=d.get("name", "custom"))


BIG_FIVE = TraitSet(BIG_FIVE_MARKERS, POLES, "big_five")
MBTI = TraitSet(MBTI_MARKERS, POLES, "mbti")
_NAMED = {"big_five": BIG_FIVE, "mbti": MBTI}


def get_trait_set(spec: str | Mapping | TraitSet = "big_five", experts: Sequence[str] | None = None) -> TraitSet:
    """Resolve a trait-set spec: a name (``big_five``, ``mbti``), a ``TraitSet.to_dict()`` mapping, or a TraitSet.

    ``experts`` narrows it to a subset, e.g. the five ``*_high`` poles.
    """
    if isinstance(spec, TraitSet):
        traits = spec
    elif isinstance(spec, str):
        if spec not in _NAMED:
            raise ValueError(f"unknown trait set {spec!r}; choose one of {sorted(_NAMED)} or pass a mapping")
        traits = _NAMED[spec]
    else:
        traits = TraitSet.from_dict(spec)
    return traits.subset(experts) if experts else traits
