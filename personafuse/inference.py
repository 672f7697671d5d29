"""Routing-aware inference: load a bundle, generate with dynamic routing, explain the routing."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from personafuse.base_models import load_base_model
from personafuse.checkpoint import CONFIG_FILE, read_json, recover, require_key
from personafuse.config import check_number
from personafuse.model import PersonaFuseModel


def load_bundle(bundle_dir: str | Path, base: str | Path | None = None, **load_kwargs) -> PersonaFuseModel:
    """A saved bundle on its base model (default: the base path recorded in the bundle)."""
    bundle_dir = Path(bundle_dir)
    recover(bundle_dir)
    if base is None:
        base = require_key(read_json(bundle_dir / CONFIG_FILE), bundle_dir / CONFIG_FILE, "base_model", "name_or_path")
        if not base or not Path(base).is_dir():
            raise FileNotFoundError(f"{bundle_dir / CONFIG_FILE} records base {base!r}, which is not a local directory; pass the base path")
    model, tokenizer = load_base_model(base, **load_kwargs)
    return PersonaFuseModel.from_pretrained(model, bundle_dir, tokenizer=tokenizer).eval()


@dataclass
class Reply:
    prompt: str
    text: str
    activations: dict[str, float]  # trait -> g_high - g_low
    gates: dict[str, float]  # expert -> gate

    def top_traits(self, n: int = 3) -> list[tuple[str, float]]:
        return sorted(self.activations.items(), key=lambda kv: -abs(kv[1]))[:n]


def _messages(prompt: str | Sequence[dict], system: str | None) -> list[dict]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return ([{"role": "system", "content": system}] if system else []) + messages


@torch.no_grad()
def generate_replies(pf: PersonaFuseModel, prompts: Sequence[str | Sequence[dict]], system: str | None = None,
                     max_new_tokens: int = 96, **generate_kwargs) -> list[Reply]:
    """One batched ``generate``: the router runs once per prompt at prefill (left padding)."""
    tokenizer = pf.tokenizer
    if tokenizer is None:
        raise ValueError("generate_replies needs the PersonaFuseModel's tokenizer")
    texts = [tokenizer.apply_chat_template(_messages(p, system), add_generation_prompt=True, tokenize=False) for p in prompts]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(next(pf.parameters()).device)
    finally:
        tokenizer.padding_side = side
    max_new_tokens = cap_new_tokens(pf, batch["input_ids"].shape[1], max_new_tokens)
    settings = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id, **generate_kwargs}
    output = pf.generate(**batch, **settings)
    gates = pf.last_gates.float().cpu()
    activations = pf.trait_activations(gates)
    traits = pf.trait_set
    replies = []
    for i, prompt in enumerate(prompts):
        text = tokenizer.decode(output[i, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        replies.append(Reply(
            prompt if isinstance(prompt, str) else prompt[-1]["content"], text,
            dict(zip(traits.traits, activations[i].tolist(), strict=True)),
            dict(zip(traits.expert_names, gates[i].tolist(), strict=True))))
    return replies


def cap_new_tokens(pf: PersonaFuseModel, prompt_length: int, max_new_tokens: int) -> int:
    """``max_new_tokens``, cut to the context the prompt leaves: past the model's positions generation
    would run until killed (or produce garbage), however large the request."""
    check_number(max_new_tokens, "max_new_tokens", integer=True, minimum=1)
    context = getattr(pf.model.config.get_text_config(), "max_position_embeddings", None)
    if not context:
        return max_new_tokens
    left = context - prompt_length
    if left < 1:
        raise ValueError(f"the prompt is {prompt_length} tokens and fills the model's context of {context} tokens "
                         f"(max_position_embeddings); shorten the prompt")
    if max_new_tokens > left:
        warnings.warn(f"max_new_tokens={max_new_tokens} capped at {left}, the context left after the "
                      f"{prompt_length}-token prompt", stacklevel=3)
    return min(max_new_tokens, left)


def explain(pf: PersonaFuseModel, context: str | Sequence[dict], out_png: str | Path) -> Path:
    """Bar charts of the router's ten gates and five trait activations for one context.

    ``out_png`` is a file (its suffix picks the format: ``.png``, ``.svg``, ``.pdf``) or a directory (an
    existing one, or a path without a suffix), which gets ``explain.png``. Returns the file written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gates = pf.route_context(context)
    activations = pf.trait_activations(gates)
    traits = pf.trait_set
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    left.bar(range(len(gates)), gates.tolist(), color=["#3b7dd8" if n.endswith("_high") else "#d8843b" for n in traits.expert_names])
    left.set_xticks(range(len(gates)), traits.expert_names, rotation=60, ha="right")
    left.set_ylabel("gate")
    left.set_title("expert gates")
    right.barh(range(len(traits.traits)), activations.tolist(), color="#5a5a9e")
    right.set_yticks(range(len(traits.traits)), traits.traits)
    right.set_xlim(-1, 1)
    right.axvline(0, color="black", linewidth=0.8)
    right.set_title("trait activation (high - low)")
    text = context if isinstance(context, str) else context[-1]["content"]
    fig.suptitle(f"context: {text[:90]}{'...' if len(text) > 90 else ''}", fontsize=10)
    out_png = Path(out_png)
    if out_png.is_dir() or not out_png.suffix:
        out_png = out_png / "explain.png"
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out_png
