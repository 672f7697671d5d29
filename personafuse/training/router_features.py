"""Router training on cached context features.

When the router learns from labels alone (no LM loss), every step of :class:`RouterTrainer` re-runs the same
frozen context encoder (base model, adapters off, no gradient) on the same situations: on 2 CPU cores that is
~1 s per situation per epoch. The features cannot change while the base is frozen, so they are encoded once and
the router head trains on them in seconds, with the same objective (:func:`router_loss`). The result is the same
router a Trainer run would give for the same batches, without paying the encoder per step.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from personafuse.data import Situation
from personafuse.training.router import RouterLossWeights, router_loss


@torch.no_grad()
def encode_situations(pf, tokenizer, situations: Sequence[Situation], max_length: int, batch_size: int = 8,
                      progress: bool = True) -> torch.Tensor:
    """``[N, F]`` router input features of the chat-templated contexts, as the router reads them at generation."""
    device = next(pf.parameters()).device
    prompts = [tokenizer.apply_chat_template(s.situation, add_generation_prompt=True, tokenize=False) for s in situations]
    rows = []
    for start in tqdm(range(0, len(prompts), batch_size), disable=not progress, desc="router features", leave=False):
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"][-max_length:] for p in prompts[start:start + batch_size]]
        width = max(len(i) for i in ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([i + [pad] * (width - len(i)) for i in ids], device=device)
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids], device=device)
        rows.append(pf.routing.encode(input_ids, mask, mask).float().cpu())
    return torch.cat(rows)


@torch.no_grad()
def route_situations(pf, tokenizer, situations: Sequence[Situation], max_length: int = 512, batch_size: int = 16) -> torch.Tensor:
    """``[N, K]`` gates for the situations' contexts, encoded in batches: what ``pf.route_context`` gives one by one,
    at a fraction of the cost (evaluation routes hundreds of held-out situations)."""
    features = encode_situations(pf, tokenizer, situations, max_length, batch_size, progress=False)
    weight = next(pf.router.parameters())
    return pf.router(features.to(weight.device, weight.dtype)).gates.float().cpu()


def cached_tensors(path: Path, key_parts, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``compute()``'s tensors, reused from ``path`` while ``key_parts`` (JSON-able) are unchanged; written atomically."""
    key = hashlib.sha1(json.dumps(key_parts, default=str).encode()).hexdigest()
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    tensors = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp), metadata={"key": key})
    tmp.replace(path)
    return tensors


def cached_features(path: Path, pf, tokenizer, situations: Sequence[Situation], max_length: int,
                    progress: bool = True) -> torch.Tensor:
    """:func:`encode_situations`, reused from ``path`` while the contexts, router input config and base are the same
    (so a resumed run does not encode again)."""
    router = pf.persona_config.router
    input_config = [router.encoder, router.layer, router.pooling, router.sentence_encoder_path]
    key_parts = [[s.situation for s in situations], max_length, input_config, pf.base_fingerprint]
    return cached_tensors(path, key_parts, lambda: {
        "features": encode_situations(pf, tokenizer, situations, max_length, progress=progress)})["features"]


def fit_router(router: torch.nn.Module, features: torch.Tensor, activations: torch.Tensor, targets: torch.Tensor,
               weights: RouterLossWeights, z_loss_weight: float = 0.1, max_steps: int = 300, batch_size: int = 16,
               learning_rate: float = 3e-3, weight_decay: float = 0.01, seed: int = 0,
               log: Callable[[str], None] | None = None, logging_steps: int = 100) -> dict[str, float]:
    """Train a router head on features with the router objective (AdamW, shuffled mini-batches, seeded).

    Returns the mean of each loss part over the last logging window.
    """
    generator = torch.Generator().manual_seed(seed)
    device = next(router.parameters()).device
    features, activations, targets = features.to(device), activations.to(device), targets.to(device)
    optimizer = torch.optim.AdamW([p for p in router.parameters() if p.requires_grad], lr=learning_rate,
                                  weight_decay=weight_decay)
    router.train()
    order, cursor, window = torch.randperm(len(features), generator=generator), 0, {}
    for step in range(1, max_steps + 1):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(features), generator=generator), 0
        index = order[cursor:cursor + batch_size].to(device)
        cursor += batch_size
        routed = router(features[index])
        loss, parts = router_loss(routed, targets[index], activations[index], weights, z_loss_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for name, value in parts.items():
            window.setdefault(name, []).append(value.item())
        if step % logging_steps == 0 or step == max_steps:
            summary = {name: sum(v) / len(v) for name, v in window.items()}
            if log is not None:
                log(f"[router] step {step}/{max_steps} " + " ".join(f"loss_{k} {v:.4f}" for k, v in summary.items()))
            window = {}
    router.eval()
    return summary
