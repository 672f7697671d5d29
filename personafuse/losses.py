"""Router auxiliary losses that trainers add to their objective."""

from __future__ import annotations

import torch


def load_balance_loss(probs: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
    """Switch/Mixtral balance loss ``K * sum_k f_k * P_k``; 1.0 when routing is perfectly even.

    ``probs`` are the dense router probabilities ``[..., K]``; ``load`` the fraction of routing
    choices per expert (from ``compute_gates``), which carries no gradient.
    """
    num_experts = probs.shape[-1]
    mean_prob = probs.reshape(-1, num_experts).float().mean(0)
    return num_experts * (load.detach().float() * mean_prob).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: keeps router logits small so the softmax stays well conditioned."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
