"""Router training: experts frozen, the router learns which traits a situation calls for.

The objective mixes five signals, each with its own weight (0 turns it off):
``kl`` between the router's gates and the target gate distribution from the situation's trait
labels; ``activation``, the squared error of the signed trait activations (``gating="poles"``); ``lm``, the language-model loss of the gated mixture on the blended reply; ``contrastive``,
which pulls persona embeddings of situations with similar activation profiles together; ``aux``,
load balance plus z-loss.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import Trainer

from personafuse.data import Situation
from personafuse.training.checkpointing import AtomicCheckpointMixin, BundleCheckpointMixin


@dataclass
class RouterLossWeights:
    """Weights of the router objective; ``target_temperature`` shapes the target gates from activations."""

    kl: float = 1.0
    activation: float = 0.0
    lm: float = 0.5
    contrastive: float = 0.1
    aux: float = 0.01
    target_temperature: float = 0.25
    contrastive_temperature: float = 0.1


def encode_situation(tokenizer, situation: Situation, max_length: int) -> dict:
    """Chat-templated context + blended reply; the context tokens are what the router reads."""
    prompt = tokenizer.apply_chat_template(situation.situation, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][-max_length:]
    reply_ids = []
    if situation.response:
        reply_ids = tokenizer(situation.response + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
        reply_ids = reply_ids[: max(0, max_length - len(prompt_ids))]
    input_ids = prompt_ids + reply_ids
    return {
        "input_ids": input_ids,
        "context_mask": [1] * len(prompt_ids) + [0] * len(reply_ids),
        "labels": [-100] * len(prompt_ids) + reply_ids,
    }


class RouterDataset(torch.utils.data.Dataset):
    def __init__(self, situations: Sequence[Situation], tokenizer, traits, max_length: int, target_temperature: float):
        self.rows = []
        for s in situations:
            row = encode_situation(tokenizer, s, max_length)
            row["gate_targets"] = s.gate_targets(traits, target_temperature)
            row["activations"] = s.activation_vector(traits)
            self.rows.append(row)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def collate(pad_id: int):
    """Right-pads token fields; the router pools only ``context_mask`` tokens, so padding side is free."""
    def fn(rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)
        def pad(key, value):
            return torch.tensor([r[key] + [value] * (width - len(r[key])) for r in rows])
        return {
            "input_ids": pad("input_ids", pad_id),
            "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows]),
            "context_mask": pad("context_mask", 0),
            "labels": pad("labels", -100),
            "gate_targets": torch.stack([torch.as_tensor(r["gate_targets"], dtype=torch.float32) for r in rows]),
            "activations": torch.stack([torch.as_tensor(r["activations"], dtype=torch.float32) for r in rows]),
        }
    return fn


def contrastive_loss(embedding: torch.Tensor, activations: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft-target InfoNCE: each situation's similarity distribution over the others should follow
    how close their activation profiles are."""
    n = embedding.shape[0]
    if n < 3:
        return embedding.sum() * 0.0
    off_diag = ~torch.eye(n, dtype=torch.bool, device=embedding.device)
    z = F.normalize(embedding.float(), dim=-1)
    logits = (z @ z.T / temperature)[off_diag].view(n, n - 1)
    distance = torch.cdist(activations.float(), activations.float()).pow(2)[off_diag].view(n, n - 1)
    target = torch.softmax(-distance / 0.5, dim=-1)
    return -(target * torch.log_softmax(logits, dim=-1)).sum(-1).mean()


def router_loss(routed, targets: torch.Tensor, activations: torch.Tensor, w: RouterLossWeights, z_loss_weight: float,
                lm: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted router objective and its parts (the parts that could be computed, for logging)."""
    parts = {
        "kl": F.kl_div(torch.log(routed.probs.float().clamp_min(1e-9)), targets, reduction="batchmean"),
        "activation": (F.mse_loss(routed.activations, activations.to(routed.activations.dtype))
                       if routed.activations is not None else None),
        "lm": lm,
        "contrastive": contrastive_loss(routed.embedding, activations, w.contrastive_temperature),
        "aux": routed.aux_loss(z_loss_weight),
    }
    parts = {name: value for name, value in parts.items() if value is not None}
    loss = sum(getattr(w, name) * value for name, value in parts.items() if getattr(w, name) > 0)
    return loss, parts


class RouterTrainer(BundleCheckpointMixin, AtomicCheckpointMixin, Trainer):
    """A ``transformers.Trainer`` (so DDP/DeepSpeed, checkpoints and resume come for free) with the router objective."""

    def __init__(self, *args, loss_weights: RouterLossWeights | None = None, **kwargs):
        train_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if train_args is not None and train_args.ddp_find_unused_parameters is None:
            # Not a PreTrainedModel, so Trainer would pick find_unused_parameters=True and pay a graph walk
            # per step; every router weight is used in every step.
            train_args.ddp_find_unused_parameters = False
        super().__init__(*args, **kwargs)
        self.loss_weights = loss_weights or RouterLossWeights()
        self._parts: dict[str, list[float]] = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        w = self.loss_weights
        pf = self.accelerator.unwrap_model(model)
        targets, activations = inputs.pop("gate_targets"), inputs.pop("activations")
        context_mask = inputs.pop("context_mask")
        outputs = None
        if w.lm > 0:
            outputs = model(**inputs, context_mask=context_mask, output_router_logits=False)
            routed = pf.last_router_output
        else:
            routed = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                           context_mask=context_mask, route_only=True)
        loss, parts = router_loss(routed, targets, activations, w, pf.routing.config.z_loss_weight,
                                  outputs.loss if outputs is not None else None)
        for name, value in parts.items():
            self._parts[name].append(value.detach().item())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        for name, values in self._parts.items():
            logs[f"loss_{name}"] = sum(values) / len(values)
        self._parts.clear()
        super().log(logs, *args, **kwargs)
