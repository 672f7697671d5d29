"""``PersonaFuseModel``: a Hugging Face causal LM with routed persona experts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from personafuse import checkpoint
from personafuse.config import PersonaFuseConfig, RouterConfig
from personafuse.controller import RoutingController
from personafuse.layer import MoELoraLinear, RoutingState
from personafuse.targets import default_target_modules, find_targets, inject
from personafuse.traits import TraitSet

TRAINABLE = ("experts", "router", "both", "none")
MOE_CONFIG_KEYS = ("output_router_logits", "router_aux_loss_coef", "num_experts", "num_experts_per_tok")


def declare_moe(text_config, num_experts: int, router: RouterConfig) -> tuple[str, ...]:
    """Marks the base config as an MoE model the way TRL and transformers read it, so TRL's SFT and
    DPO trainers add the router's auxiliary loss (weighted by ``router_aux_loss_coef``).

    A base that is itself an MoE (it already declares ``output_router_logits``) keeps its own
    declaration. Returns the keys added, so an export can remove them again.
    """
    if hasattr(text_config, "output_router_logits"):
        return ()
    text_config.output_router_logits = router.aux_loss_coef > 0
    text_config.router_aux_loss_coef = router.aux_loss_coef
    text_config.num_experts = num_experts
    text_config.num_experts_per_tok = router.top_k or 1
    return MOE_CONFIG_KEYS


class PersonaFuseModel(nn.Module):
    """A frozen base model, K LoRA experts in its projections, and a context router choosing their gates.

    Build one with ``from_base`` (fresh experts) or ``from_pretrained`` (a saved bundle). Calls go
    through the wrapped model, so ``forward``/``generate`` and trainers behave as for the base model;
    attributes it lacks (``config``, ``generation_config``...) are read from the base model.
    """

    def __init__(self, model: nn.Module, config: PersonaFuseConfig, tokenizer=None):
        super().__init__()
        self.persona_config = config
        self.trait_set: TraitSet = config.trait_set
        self.tokenizer = tokenizer
        self.source_dir: Path | None = None  # the bundle it was loaded from: exports must not overwrite it
        self.model = model
        self.base_fingerprint = checkpoint.fingerprint(model)
        if any(isinstance(m, MoELoraLinear) for m in model.modules()):
            raise ValueError("this model already carries PersonaFuse layers; load a fresh base model for a new stack")
        model.requires_grad_(False)
        self.state = RoutingState()
        targets = config.target_modules or default_target_modules(model)
        self.target_names = find_targets(model, targets)
        self.target_modules = list(targets)
        device = next(model.parameters()).device
        self.moe_layers: dict[str, MoELoraLinear] = inject(
            model, self.target_names, self.trait_set.num_experts, config.r, config.alpha, config.dropout, self.state)
        model.add_module("personafuse_routing", RoutingController(
            model, config.router, self.trait_set.num_experts, self.state, tokenizer).to(device))
        self.declared_config_keys = declare_moe(model.config.get_text_config(), self.trait_set.num_experts, config.router)
        self._grad_masks: list = []
        self.set_trainable("both")

    # construction -------------------------------------------------------------------------------
    @classmethod
    def from_base(cls, model: nn.Module, config: PersonaFuseConfig | Mapping | None = None, tokenizer=None) -> PersonaFuseModel:
        """Inject fresh experts (B = 0, so outputs start equal to the base) and a fresh router."""
        if config is None:
            config = PersonaFuseConfig()
        elif isinstance(config, Mapping):
            config = PersonaFuseConfig.from_dict(config)
        return cls(model, config, tokenizer)

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str | Path, tokenizer=None, check_base: bool = True) -> PersonaFuseModel:
        """Load a bundle written by ``save_pretrained`` onto ``model`` (the same base it was trained on)."""
        return checkpoint.load_bundle(cls, model, Path(path), tokenizer, check_base)

    def save_pretrained(self, path: str | Path, overwrite: bool = False) -> Path:
        """Config, router and one standard PEFT LoRA adapter per expert, written atomically.

        ``overwrite=True`` replaces only an earlier bundle (a directory holding ``personafuse_config.json``)."""
        return checkpoint.save_bundle(self, Path(path), overwrite)

    def load_expert(self, name: str, adapter_dir: str | Path) -> None:
        """Import a PEFT LoRA adapter directory as expert ``name`` (shapes and targets must match)."""
        checkpoint.load_expert(self, name, Path(adapter_dir))

    # routing ------------------------------------------------------------------------------------
    @property
    def routing(self) -> RoutingController:
        return self.model.personafuse_routing

    @property
    def router(self) -> nn.Module:
        return self.routing.router

    @property
    def expert_names(self) -> tuple[str, ...]:
        return self.trait_set.expert_names

    @property
    def last_gates(self) -> torch.Tensor | None:
        """Gates of the latest forward (``[B, K]``; detached)."""
        return None if self.state.gates is None else self.state.gates.detach()

    @property
    def last_router_output(self):
        return self.routing.last_output

    @torch.no_grad()
    def route_context(self, context: str | Sequence[Mapping[str, str]], tokenizer=None,
                      max_length: int | None = None) -> torch.Tensor:
        """Router gates ``[K]`` for a chat (or one user message), chat-templated as at generation.

        ``max_length`` keeps the last tokens of a long context.
        """
        tokenizer = tokenizer or self.tokenizer
        if tokenizer is None:
            raise ValueError("routing a context needs a tokenizer (PersonaFuseModel(..., tokenizer=...))")
        messages = [{"role": "user", "content": context}] if isinstance(context, str) else list(context)
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = ids[:, -max_length:] if max_length else ids
        ids = ids.to(next(self.parameters()).device)
        return self.routing.route(ids, torch.ones_like(ids)).gates[0].float().cpu()

    def trait_activations(self, gates: torch.Tensor | None = None) -> torch.Tensor:
        """Per-trait activation ``g_high - g_low`` of the given (default: latest) gates."""
        gates = self.last_gates if gates is None else gates
        if gates is None:
            raise RuntimeError("no gates yet: run the model first or pass gates")
        return self.trait_set.gates_to_activations(gates.float())

    def gate_vector(self, gates: torch.Tensor | Mapping[str, float]) -> torch.Tensor:
        """Validate user gates: a tensor ``[K]``/``[B, K]``/``[B, T, K]`` or ``{expert_name: weight}``."""
        if isinstance(gates, Mapping):
            gates = self.trait_set.gates_from_mapping(gates)
        try:
            gates = torch.as_tensor(gates, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"gates must be a tensor or list of {self.trait_set.num_experts} numbers in expert order, or "
                            f"{{expert_name: weight}}; got {type(gates).__name__} {gates!r}") from None
        K = self.trait_set.num_experts
        if gates.dim() not in (1, 2, 3) or gates.shape[-1] != K:
            raise ValueError(f"gates must have {K} entries in the last dim ({list(self.expert_names)}), got shape {tuple(gates.shape)}")
        if not torch.isfinite(gates).all():
            raise ValueError("gates contain NaN or infinity")
        if (gates < 0).any():
            raise ValueError("gates must be non-negative")
        return gates

    @contextmanager
    def fixed_gates(self, gates: torch.Tensor | Mapping[str, float]):
        """Force the gates (router off) inside the block, e.g. ``{"extraversion_high": 1.0}``."""
        routing = self.routing
        previous = routing.fixed
        routing.fixed = self.gate_vector(gates).to(next(self.model.parameters()).device)
        try:
            yield self
        finally:
            routing.fixed = previous

    @contextmanager
    def adapters_disabled(self):
        """The plain base model inside the block."""
        with self.routing.adapters_off():
            yield self

    # running ------------------------------------------------------------------------------------
    def forward(self, *args, context_mask: torch.Tensor | None = None, route_only: bool = False, **kwargs):
        """The base model's forward; ``context_mask`` marks the situation tokens the router pools.

        ``route_only=True`` runs just the context encoder and router and returns their ``RouterOutput``;
        going through ``forward`` (not ``routing.route``) keeps DDP's gradient sync for router training.
        """
        if route_only:
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            return self.routing.route(input_ids, kwargs.get("attention_mask"), context_mask, kwargs.get("inputs_embeds"))
        self.routing.set_context_mask(context_mask)
        return self.model(*args, **kwargs)

    def generate(self, *args, context_mask: torch.Tensor | None = None, **kwargs):
        """``generate`` with the router run once at prefill; its gates serve every decoding step."""
        self.routing.set_context_mask(context_mask)
        return self.model.generate(*args, **kwargs)

    @property
    def base_model(self) -> nn.Module:
        """The backbone (HF meaning), so code that calls ``model.base_model`` directly still routes."""
        return self.model.base_model

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    # training switches --------------------------------------------------------------------------
    def set_trainable(self, what: str) -> None:
        """What trains: ``experts``, ``router``, ``both``, ``none``, or one expert's name."""
        for handle in self._grad_masks:
            handle.remove()
        self._grad_masks = []
        if what not in TRAINABLE:
            self.trait_set.index(what)
        self.model.requires_grad_(False)
        train_experts = what in ("experts", "both") or what in self.expert_names
        for layer in self.moe_layers.values():
            layer.lora_A.requires_grad_(train_experts)
            layer.lora_B.requires_grad_(train_experts)
        self.router.requires_grad_(what in ("router", "both"))
        if what in self.expert_names:
            self._mask_all_but(self.trait_set.index(what))

    def _mask_all_but(self, k: int) -> None:
        """Only expert k's rows of A and columns of B receive gradient."""
        for layer in self.moe_layers.values():
            r = layer.r
            row_mask = torch.zeros(layer.lora_A.shape[0], 1, device=layer.lora_A.device)
            row_mask[k * r : (k + 1) * r] = 1
            self._grad_masks.append(layer.lora_A.register_hook(lambda g, m=row_mask: g * m))
            self._grad_masks.append(layer.lora_B.register_hook(lambda g, m=row_mask.T: g * m))

    def trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
