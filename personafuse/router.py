"""The router head: persona features -> persona embedding -> expert gates and trait activations."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from personafuse.losses import load_balance_loss, router_z_loss
from personafuse.routing import compute_gates


@dataclass
class RouterOutput:
    """Everything one routing decision produced (for training losses and explanations)."""

    logits: torch.Tensor  # [B, K]
    probs: torch.Tensor  # [B, K] dense softmax, for the balance loss
    gates: torch.Tensor  # [B, K] what the experts are mixed with (top-k applied)
    load: torch.Tensor  # [K] fraction of routing choices per expert
    embedding: torch.Tensor  # [B, hidden] persona embedding, for contrastive training
    activations: torch.Tensor | None = None  # [B, n_traits] signed trait activations before top-k (gating="poles")

    def aux_loss(self, z_loss_weight: float) -> torch.Tensor:
        return load_balance_loss(self.probs, self.load) + z_loss_weight * router_z_loss(self.logits)


class PersonaRouter(nn.Module):
    """A small MLP over pooled context features.

    ``gating="softmax"``: K logits -> tempered softmax (optionally top-k). ``gating="poles"``: one signed
    activation per trait (experts ordered trait-major, high pole first) -> gate ``a`` on the high pole or
    ``-a`` on the low pole, optionally only for the ``top_k`` most activated traits.
    """

    def __init__(self, input_size: int, num_experts: int, hidden_size: int = 256, temperature: float = 1.0,
                 top_k: int | None = None, dropout: float = 0.0, gating: str = "softmax"):
        super().__init__()
        if gating == "poles" and num_experts % 2:
            raise ValueError(f"gating='poles' needs a high and a low expert per trait, got {num_experts} experts")
        self.temperature, self.top_k, self.gating = temperature, top_k, gating
        self.embed = nn.Sequential(nn.LayerNorm(input_size), nn.Linear(input_size, hidden_size), nn.GELU())
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, num_experts // 2 if gating == "poles" else num_experts)

    def forward(self, features: torch.Tensor) -> RouterOutput:
        dtype = self.head.weight.dtype
        embedding = self.embed(features.to(dtype))
        logits = self.head(self.dropout(embedding))
        if self.gating == "poles":
            return self._pole_gates(logits, embedding)
        gates, load = compute_gates(logits, self.temperature, self.top_k)
        probs = gates if self.top_k is None else torch.softmax(logits.float() / self.temperature, -1)
        return RouterOutput(logits, probs, gates, load, embedding)

    def _pole_gates(self, trait_logits: torch.Tensor, embedding: torch.Tensor) -> RouterOutput:
        activations = torch.tanh(trait_logits.float() / self.temperature)
        kept = activations
        if self.top_k is not None and self.top_k < activations.shape[-1]:
            keep = torch.topk(activations.abs(), self.top_k, dim=-1).indices
            kept = activations * torch.zeros_like(activations).scatter_(-1, keep, 1.0)
        gates = torch.stack([kept.clamp_min(0), (-kept).clamp_min(0)], -1).flatten(-2)
        pole_logits = torch.stack([trait_logits, -trait_logits], -1).flatten(-2)
        probs = torch.softmax(pole_logits.float(), -1)
        load = torch.zeros_like(probs).scatter_(-1, gates.argmax(-1, keepdim=True), 1.0).reshape(-1, probs.shape[-1]).mean(0)
        return RouterOutput(pole_logits, probs, gates.to(trait_logits.dtype), load, embedding, activations)
