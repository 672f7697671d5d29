"""Hooks that run the router at prefill and hand its gates to every MoE layer.

Routing lives on the model's backbone as a forward pre-hook, so every path that runs the backbone
routes: our ``forward``, ``generate`` (gates computed once at prefill, reused while the KV cache
grows), and trainers that call the backbone directly (TRL's fused LM head). The controller is a
submodule of the Hugging Face model, and its hooks are its bound methods, so a ``deepcopy`` of the
model (TRL's reference model) routes with its own copy.
"""

from __future__ import annotations

import dataclasses
import functools
from contextlib import contextmanager

import torch
import torch.nn as nn
from transformers.utils import ModelOutput

from personafuse.config import RouterConfig
from personafuse.context import HiddenStateContext, SentenceContext
from personafuse.layer import RoutingState
from personafuse.recompute import checkpointable_modules, snapshot_gates_on_recompute
from personafuse.router import PersonaRouter, RouterOutput


class RoutingController(nn.Module):
    """Owns the router, the context encoder and the routing state of one model."""

    def __init__(self, model: nn.Module, config: RouterConfig, num_experts: int, state: RoutingState, tokenizer=None):
        super().__init__()
        self.config, self.state = config, state
        if config.encoder == "hidden":
            num_layers = model.config.get_text_config().num_hidden_layers
            layer = config.layer if config.layer is not None else max(1, num_layers // 4)
            self.context = HiddenStateContext(model, layer, config.pooling)
        else:
            self.context = SentenceContext(tokenizer, config.sentence_encoder_path)
        self.router = PersonaRouter(self.context.output_size, num_experts, config.hidden_size, config.temperature,
                                    config.top_k, config.dropout, config.gating)
        self.num_experts = num_experts
        self.fixed: torch.Tensor | None = None
        self.last_output: RouterOutput | None = None
        self.router_calls = 0
        self._context_mask: torch.Tensor | None = None
        self._want_router_logits = False
        self._encoding = False
        self._checkpointable = checkpointable_modules(model)
        self._decoding = False
        self._fixed_plan: tuple | None = None  # (fixed gates, batch, the plan made from them)
        model.base_model.register_forward_pre_hook(self._route, with_kwargs=True)
        model.base_model.register_forward_hook(self._attach_router_logits)
        model.register_forward_hook(self._attach_aux_loss, with_kwargs=True)

    def set_context_mask(self, mask: torch.Tensor | None) -> None:
        """Marks which tokens are the situation (e.g. the prompt) for the next forward; default: all."""
        self._context_mask = mask

    def _route(self, _module, args, kwargs):
        if self._encoding:
            return None
        self._want_router_logits = bool(kwargs.pop("output_router_logits", False))
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        inputs_embeds = kwargs.get("inputs_embeds")
        reference = input_ids if input_ids is not None else inputs_embeds
        batch, length = reference.shape[0], reference.shape[1]
        start = cached_length(kwargs)
        self._decoding = start > 0
        if start == 0:
            reject_packed(kwargs)
        if torch.is_grad_enabled():
            snapshot_gates_on_recompute(self._checkpointable, self.state)
        if self.fixed is not None:
            kept = self._fixed_plan
            if not (self._decoding and self.fixed.dim() < 3 and kept is not None and kept[0] is self.fixed
                    and kept[1] == batch and kept[2] is self.state.plan):
                # per-sequence fixed gates are the same at every decode step: keep the prefill's RoutePlan
                self.state.gates = expand_gates(self.fixed, batch, length, start)
                self._fixed_plan = (self.fixed, batch, self.state.plan)
            self.last_output = None
            return args, kwargs
        if start > 0:
            return args, kwargs  # decoding: keep the gates the router chose at prefill
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None or attention_mask.dim() != 2:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=reference.device)
        context_mask = self._context_mask if self._context_mask is not None else attention_mask
        self._context_mask = None
        output = self.route(input_ids, attention_mask, context_mask.to(reference.device), inputs_embeds)
        self.state.gates = output.gates
        return args, kwargs

    def encode(self, input_ids, attention_mask, context_mask=None, inputs_embeds=None) -> torch.Tensor:
        """The router's input features: the context read by the base model alone, without gradient."""
        context_mask = attention_mask if context_mask is None else context_mask
        with self.adapters_off(), torch.no_grad():
            return self.context(input_ids, attention_mask, context_mask, inputs_embeds)

    def route(self, input_ids, attention_mask, context_mask=None, inputs_embeds=None) -> RouterOutput:
        """Encode the context (base model, adapters off, no gradient) and run the router on it."""
        output = self.router(self.encode(input_ids, attention_mask, context_mask, inputs_embeds))
        self.router_calls += 1
        self.last_output = output
        return output

    @contextmanager
    def adapters_off(self):
        """Runs the base model alone (the context encoder must see the situation, not the persona)."""
        previous = self.state.adapters_enabled, self._encoding
        self.state.adapters_enabled, self._encoding = False, True
        try:
            yield
        finally:
            self.state.adapters_enabled, self._encoding = previous

    def aux_loss(self) -> torch.Tensor | None:
        if self.last_output is None:
            return None
        return self.last_output.aux_loss(self.config.z_loss_weight)

    def _attach_router_logits(self, _module, _args, output):
        """MoE convention (Mixtral): per-token router logits, one entry per routed layer."""
        if self._want_router_logits and self.last_output is not None and hasattr(output, "last_hidden_state"):
            batch, length = output.last_hidden_state.shape[:2]
            logits = self.last_output.logits
            per_token = logits.unsqueeze(1).expand(batch, length, -1).reshape(batch * length, -1)
            return with_router_fields(output, router_logits=(per_token,))
        return output

    def _attach_aux_loss(self, _module, _args, kwargs, output):
        """Puts ``aux_loss`` on the output and, like Mixtral, adds it to ``loss`` when router logits are requested."""
        if self._decoding:  # the prefill's output carried it; recomputing it per decode step is waste
            return output
        aux = self.aux_loss()
        if aux is None or not hasattr(output, "keys") or output.get("aux_loss") is not None:
            return output
        text_config = self._text_config(_module)
        output = with_router_fields(output, aux_loss=aux)
        wants = kwargs.get("output_router_logits", getattr(text_config, "output_router_logits", False))
        if wants and output.get("loss") is not None and "log_probs" not in output:
            coef = getattr(text_config, "router_aux_loss_coef", self.config.aux_loss_coef)
            output["loss"] = output["loss"] + coef * aux.to(output["loss"].device)
        return output

    @staticmethod
    def _text_config(model: nn.Module):
        return model.config.get_text_config()


@functools.cache
def _router_output_class(cls: type) -> type:
    """``cls`` plus the MoE fields (``aux_loss``, ``router_logits``) as declared dataclass fields, so the
    output survives code that rebuilds it from its fields (DDP, ``to_tuple``)."""
    fields = [(name, object, dataclasses.field(default=None)) for name in ("aux_loss", "router_logits")
              if name not in {f.name for f in dataclasses.fields(cls)}]
    if not fields:
        return cls
    return dataclasses.make_dataclass(f"{cls.__name__}WithRouter", fields, bases=(cls,))


def with_router_fields(output: ModelOutput, **values) -> ModelOutput:
    """A copy of a model output carrying router fields."""
    cls = _router_output_class(type(output))
    return cls(**{**dict(output.items()), **values})


def cached_length(kwargs: dict) -> int:
    """Tokens already in the KV cache (``cache`` in transformers 5, ``past_key_values`` before)."""
    for key in ("cache", "past_key_values"):
        cache = kwargs.get(key)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
    return 0


def reject_packed(kwargs: dict) -> None:
    """Sequence routing pools one context per row; a packed (padding-free) row holds several sequences."""
    if any(kwargs.get(key) is not None for key in PACKED_KWARGS):
        raise ValueError(PACKED_ERROR)
    positions = kwargs.get("position_ids")
    if positions is None or positions.dim() != 2 or positions.shape[1] < 2:
        return
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.shape == positions.shape:  # padding has arbitrary positions (generate fills 1)
        restarts = (positions[:, 1:] <= positions[:, :-1]) & mask[:, 1:].bool() & mask[:, :-1].bool()
    else:  # without a mask, left padding may repeat position 0
        restarts = positions[:, 1:] < positions[:, :-1]
    if restarts.any():
        raise ValueError(PACKED_ERROR)


PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens_q", "cu_seqlens_k")
PACKED_ERROR = (
    "packed / padding-free batches are not supported: PersonaFuse routes one context per row, and this row "
    "holds several sequences (position_ids restart inside it). Set the trainer config's `packing: false` and "
    "`padding_free: false` (TRL SFTConfig / DPOConfig) so every row is one padded sequence"
)


def expand_gates(gates: torch.Tensor, batch: int, length: int, start: int = 0) -> torch.Tensor:
    """Fixed gates ``[K]``, ``[b, K]`` or ``[b, T, K]`` -> the batch actually running.

    A batch that is a multiple of ``b`` (``num_return_sequences``, beams) repeats each row, the way
    ``generate`` expands its inputs. Per-token gates give positions ``0..T-1`` of the (padded) input;
    a forward over positions ``start..start+length-1`` (``start`` > 0 while decoding with a KV cache)
    takes those rows, and positions past ``T - 1`` keep the gates of position ``T - 1``.
    """
    if gates.dim() == 1:
        return gates.expand(batch, -1)
    if batch % gates.shape[0]:
        raise ValueError(f"fixed gates for {gates.shape[0]} sequences cannot serve a batch of {batch}")
    if gates.dim() == 3:
        if start == 0 and gates.shape[1] < length:
            raise ValueError(f"per-token fixed gates cover {gates.shape[1]} tokens but the input has {length}")
        positions = torch.arange(start, start + length, device=gates.device).clamp(max=gates.shape[1] - 1)
        gates = gates[:, positions]
    return gates.repeat_interleave(batch // gates.shape[0], dim=0)
