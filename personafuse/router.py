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

    def aux_loss(self, z_loss_weight: float) -> torch.Tensor:
        return load_balance_loss(self.probs, self.load) + z_loss_weight * router_z_loss(self.logits)


class PersonaRouter(nn.Module):
    """A small MLP over pooled context features; K logits -> tempered softmax (optionally top-k)."""

    def __init__(self, input_size: int, num_experts: int, hidden_size: int = 256, temperature: float = 1.0,
                 top_k: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.temperature, self.top_k = temperature, top_k
        self.embed = nn.Sequential(nn.LayerNorm(input_size), nn.Linear(input_size, hidden_size), nn.GELU())
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, num_experts)

    def forward(self, features: torch.Tensor) -> RouterOutput:
        dtype = self.head.weight.dtype
        embedding = self.embed(features.to(dtype))
        logits = self.head(self.dropout(embedding))
        gates, load = compute_gates(logits, self.temperature, self.top_k)
        probs = gates if self.top_k is None else torch.softmax(logits.float() / self.temperature, -1)
        return RouterOutput(logits, probs, gates, load, embedding)
