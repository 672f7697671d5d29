"""How well the router reads situations: top-pole agreement, load, entropy, and a heatmap."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from personafuse.data import Situation
from personafuse.training.router_features import route_situations


def routing_report(pf, tokenizer, situations: Sequence[Situation]) -> dict:
    """Top-pole accuracy (router's largest gate is the pole the labels call for most), per-expert load,
    mean gate entropy, and the activation matrices for plotting."""
    traits = pf.trait_set
    gates = route_situations(pf, tokenizer, situations)
    targets = torch.stack([s.gate_targets(traits) for s in situations]).float()
    predicted = traits.gates_to_activations(gates)
    wanted = torch.stack([s.activation_vector(traits) for s in situations]).float()
    entropy = -(gates.clamp_min(1e-9).log() * gates).sum(-1).mean()
    top_trait = (predicted.abs().argmax(-1) == wanted.abs().argmax(-1)).float().mean()
    return {
        "top_pole_accuracy": (gates.argmax(-1) == targets.argmax(-1)).float().mean().item(),
        "top_trait_accuracy": top_trait.item(),
        "load": dict(zip(traits.expert_names, gates.mean(0).tolist(), strict=True)),
        "mean_entropy": entropy.item(),
        "predicted_activations": predicted.tolist(),
        "target_activations": wanted.tolist(),
        "ids": [s.id for s in situations],
    }


def plot_activation_heatmap(report: dict, traits: Sequence[str], path: Path) -> Path:
    """Side-by-side heatmaps of target and router trait activations per held-out situation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(report["ids"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 1.2 + 0.35 * rows), sharey=True)
    for ax, key, title in zip(axes, ("target_activations", "predicted_activations"), ("target", "router"), strict=True):
        image = ax.imshow(report[key], cmap="coolwarm", vmin=-1, vmax=1, aspect="auto")
        ax.set_xticks(range(len(traits)), [t[:5] for t in traits], rotation=45)
        ax.set_title(f"{title} trait activation")
    axes[0].set_yticks(range(rows), report["ids"])
    fig.colorbar(image, ax=axes, shrink=0.8)
    fig.suptitle(f"held-out routing: top-pole accuracy {report['top_pole_accuracy']:.0%}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
