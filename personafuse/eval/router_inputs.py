"""Which router input generalises? One table over the same splits, router heads trained on frozen features.

The router reads pooled features of the situation and is a small MLP on top, so comparing inputs does not
need the experts: features are computed once per input (base hidden states at several layers with mean or
last pooling, the MiniLM sentence encoder, both concatenated) and a :class:`PersonaRouter` head is trained on
them with each objective. The score is the one the router exists for: is its top expert one of the
situation's *acceptable* poles (``personafuse.data.corpus.acceptable_poles``), on held-out situations of
the training domains and on held-out domains, beside the best constant guess.

    python -m personafuse.eval.router_inputs --out outputs/router_inputs
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from personafuse.context import HiddenStateContext, SentenceContext, decoder_layers, pool
from personafuse.data import Situation
from personafuse.data.corpus import acceptable_poles
from personafuse.eval.report import markdown_table
from personafuse.router import PersonaRouter
from personafuse.training.router import RouterLossWeights
from personafuse.training.router_features import cached_tensors, fit_router
from personafuse.traits import BIG_FIVE, TraitSet

# name -> (gating, KL weight, activation-MSE weight, contrastive weight)
OBJECTIVES = {
    "softmax+KL": ("softmax", 1.0, 0.0, 0.0),
    "softmax+KL+contrastive": ("softmax", 1.0, 0.0, 0.1),
    "poles+MSE": ("poles", 0.0, 1.0, 0.0),
    "poles+MSE+contrastive": ("poles", 0.0, 1.0, 0.1),
    "poles+KL+MSE": ("poles", 1.0, 1.0, 0.0),
}


@torch.no_grad()
def context_features(model, tokenizer, situations: Sequence[Situation], layers: Sequence[int],
                     sentence_encoder: SentenceContext | None = None) -> dict[str, torch.Tensor]:
    """``{"L<layer>-<pooling>": [N, H], "minilm": [N, 384]}`` for the chat-templated contexts, as the router sees them.

    One forward per situation through the router's own :class:`HiddenStateContext`, stopped at the deepest layer;
    hooks keep the shallower layers' states on the way.
    """
    features: dict[str, list[torch.Tensor]] = {}
    deepest = HiddenStateContext(model, max(layers), "mean")
    captured: dict[int, torch.Tensor] = {}

    def keep(layer):
        def hook(_module, _inputs, output):
            captured[layer] = output[0] if isinstance(output, tuple) else output
        return hook

    blocks = decoder_layers(model)
    handles = [(model.get_input_embeddings() if layer == 0 else blocks[layer - 1]).register_forward_hook(keep(layer))
               for layer in layers if layer != max(layers)]
    try:
        for s in tqdm(situations, desc="context features", leave=False):
            prompt = tokenizer.apply_chat_template(s.situation, add_generation_prompt=True, tokenize=False)
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"][:, -512:]
            mask = torch.ones_like(ids)
            captured[max(layers)] = deepest.hidden(ids, mask)
            for layer in layers:
                for how in ("mean", "last"):
                    features.setdefault(f"L{layer}-{how}", []).append(pool(captured[layer].float(), mask, how)[0])
            if sentence_encoder is not None:
                features.setdefault("minilm", []).append(sentence_encoder(ids, mask, mask)[0].float())
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.stack(rows) for name, rows in features.items()}


def train_head(x: torch.Tensor, activations: torch.Tensor, gating: str, weights: RouterLossWeights, traits: TraitSet,
               steps: int = 300, seed: int = 0, hidden_size: int = 256, lr: float = 3e-3,
               weight_decay: float = 1e-2, dropout: float = 0.1) -> PersonaRouter:
    """A router head on frozen features, fitted with the library's own objective and loop (:func:`fit_router`)."""
    torch.manual_seed(seed)
    router = PersonaRouter(x.shape[1], traits.num_experts, hidden_size, dropout=dropout, gating=gating)
    fit_router(router, x, activations, traits.activations_to_gate_targets(activations, weights.target_temperature),
               weights, max_steps=steps, batch_size=32, learning_rate=lr, weight_decay=weight_decay, seed=seed)
    return router


def acceptable_top_accuracy(gates: torch.Tensor, situations: Sequence[Situation], traits: TraitSet) -> float:
    """Share of situations whose top gate is one of their acceptable poles."""
    hits = [traits.expert_names[int(g.argmax())] in acceptable_poles(s.activations, traits)
            for g, s in zip(gates, situations, strict=True)]
    return float(np.mean(hits))


def best_constant_pole(train: Sequence[Situation], traits: TraitSet) -> str:
    """The single pole that is acceptable for the most training situations (the constant-guess baseline)."""
    counts = {name: sum(name in acceptable_poles(s.activations, traits) for s in train) for name in traits.expert_names}
    return max(counts, key=counts.get)


def compare(features: dict[str, torch.Tensor], situations: Sequence[Situation], traits: TraitSet = BIG_FIVE,
            seeds: Sequence[int] = (0, 1, 2), objectives: dict = OBJECTIVES, steps: int = 300) -> dict:
    """Accuracy per (input, objective) on each evaluation split, mean over ``seeds``, plus the constant guess."""
    split_index = {name: [i for i, s in enumerate(situations) if s.split == name] for name in ("train", "heldout", "heldout_domain")}
    train = [situations[i] for i in split_index["train"]]
    activations = torch.stack([s.activation_vector(traits) for s in train]).float()
    constant = best_constant_pole(train, traits)
    results = {"constant_pole": constant, "rows": {}}
    for split in ("heldout", "heldout_domain"):
        chosen = [situations[i] for i in split_index[split]]
        results[f"constant_{split}"] = float(np.mean([constant in acceptable_poles(s.activations, traits) for s in chosen])) if chosen else None
    for name, x in tqdm(features.items(), desc="router inputs"):
        x_train = x[split_index["train"]]
        for objective, (gating, kl, activation, contrastive) in objectives.items():
            weights = RouterLossWeights(kl=kl, activation=activation, lm=0.0, contrastive=contrastive, aux=0.0)
            scores = {split: [] for split in ("heldout", "heldout_domain")}
            for seed in seeds:
                router = train_head(x_train, activations, gating, weights, traits, steps=steps, seed=seed)
                with torch.no_grad():
                    for split in scores:
                        if split_index[split]:
                            chosen = [situations[i] for i in split_index[split]]
                            scores[split].append(acceptable_top_accuracy(router(x[split_index[split]]).gates, chosen, traits))
            results["rows"][f"{name} | {objective}"] = {
                f"{split}_{stat}": (float(f(v)) if v else None)
                for split, v in scores.items() for stat, f in (("mean", np.mean), ("std", np.std))
            }
    return results


def concatenated(features: dict[str, torch.Tensor], a: str, b: str) -> torch.Tensor:
    """Two inputs side by side, each standardised so neither dominates by scale."""
    def standardise(x):
        return (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    return torch.cat([standardise(features[a]), standardise(features[b])], -1)


def cached_features(path: Path, situations: Sequence[Situation], model_path: str, layers: Sequence[int]) -> dict[str, torch.Tensor]:
    """Features of every situation, reused from ``path`` while the situations' conversations and layers are unchanged
    (labels may change: relabelling does not need the model again)."""
    from personafuse.base_models import load_base_model

    def compute() -> dict[str, torch.Tensor]:
        model, tokenizer = load_base_model(model_path)
        return context_features(model.eval(), tokenizer, situations, layers, SentenceContext(tokenizer))

    return cached_tensors(path, [model_path, list(layers), [s.situation for s in situations]], compute)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/router_inputs")
    parser.add_argument("--layers", default="2,4,7", help="hidden-state indices to compare")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3, help="router heads per (input, objective), averaged")
    parser.add_argument("--model", default="embedded")
    args = parser.parse_args(argv)

    from personafuse.data.corpus import corpus_path
    from personafuse.data.schema import load_situations

    torch.manual_seed(0)
    situations = load_situations(corpus_path())
    layers = [int(v) for v in args.layers.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    features = cached_features(out / "features.safetensors", situations, args.model, layers)
    best_hidden = f"L{layers[-1]}-mean"  # the default router layer (a quarter of the depth)
    features[f"{best_hidden}+minilm"] = concatenated(features, best_hidden, "minilm")
    results = compare(features, situations, seeds=tuple(range(args.seeds)), steps=args.steps)
    (out / "router_inputs.json").write_text(json.dumps(results, indent=2))
    table = markdown_table(results["rows"], ("heldout_mean", "heldout_std", "heldout_domain_mean", "heldout_domain_std"))
    text = (f"Top expert is an acceptable pole (mean of {args.seeds} seed(s)). Best constant guess `{results['constant_pole']}`: "
            f"held-out {results['constant_heldout']:.2f}, held-out domains {results['constant_heldout_domain']:.2f}.\n\n{table}\n")
    (out / "router_inputs.md").write_text(text)
    print(text)
    return results


if __name__ == "__main__":
    main()
