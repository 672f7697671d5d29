"""Expert SFT: every trait pole's LoRA trains in one TRL ``SFTTrainer`` run over the PersonaFuse stack.

Each example carries the index of the pole its reply expresses and runs with one-hot gates on that
expert, so an expert only ever learns from its own pole's data (as if trained alone), while the
frozen base runs once per example for all poles together: ten experts cost about one LoRA run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import zip_longest
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch.utils.data import SequentialSampler
from trl import SFTConfig, SFTTrainer

from personafuse.checkpoint import save_expert
from personafuse.data import Situation, expert_sft_rows
from personafuse.model import PersonaFuseModel
from personafuse.sharding import full_weights
from personafuse.training.checkpointing import AtomicCheckpointMixin, BundleCheckpointMixin, last_checkpoint
from personafuse.traits import POLES, expert_name

EXPERT_COLUMN = "expert_index"
CONTRAST_COLUMN = "opposite_pole"  # 1 on the row that carries the opposite pole's reply to the same situation


class ExpertSFTTrainer(BundleCheckpointMixin, AtomicCheckpointMixin, SFTTrainer):
    """TRL's SFTTrainer where each example is routed, one-hot, to the expert of its pole.

    With ``pole_contrast`` > 0 (a dataset from ``expert_dataset(..., contrast=True)``) each reply row is
    followed by the opposite pole's reply to the same situation, routed to the same expert, and the loss
    adds ``pole_contrast`` times an odds-ratio preference term (ORPO) for the own reply over the opposite one.
    SFT alone mostly teaches what every pole's reply shares (the content); the paired term is the part that
    only the pole's style can lower, which is what steering needs.
    """

    def __init__(self, *args, pole_contrast: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        if pole_contrast < 0:
            raise ValueError(f"experts.pole_contrast must be >= 0, got {pole_contrast}")
        if pole_contrast and self.args.per_device_train_batch_size % 2:
            raise ValueError("experts.pole_contrast pairs each reply with the opposite pole's reply: "
                             f"trainer.expert.per_device_train_batch_size must be even, got "
                             f"{self.args.per_device_train_batch_size}")
        self.pole_contrast = pole_contrast
        collate = self.data_collator

        def with_expert(examples: list[dict]) -> dict:
            batch = collate(examples)
            batch[EXPERT_COLUMN] = torch.tensor([e[EXPERT_COLUMN] for e in examples])
            if CONTRAST_COLUMN in examples[0]:
                batch[CONTRAST_COLUMN] = torch.tensor([e[CONTRAST_COLUMN] for e in examples])
            return batch

        self.data_collator = with_expert

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = [c for c in (EXPERT_COLUMN, CONTRAST_COLUMN) if c not in self._signature_columns]
        self._signature_columns = [*self._signature_columns, *extra]

    def _get_train_sampler(self, *args, **kwargs):
        """In dataset order: ``expert_dataset`` already shuffled and balanced the poles."""
        return SequentialSampler(self.train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        experts = inputs.pop(EXPERT_COLUMN)
        opposite = inputs.pop(CONTRAST_COLUMN, None)
        pf = self.accelerator.unwrap_model(model)
        with pf.fixed_gates(F.one_hot(experts, pf.trait_set.num_experts).float()):
            if opposite is None or not self.pole_contrast:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss, outputs = self._pole_contrast_loss(model, inputs, opposite)
        if num_items_in_batch is not None:  # Trainer leaves gradient accumulation to a loss given the token count
            loss = loss / self.current_gradient_accumulation_steps
        return (loss, outputs) if return_outputs else loss

    def _pole_contrast_loss(self, model, inputs, opposite: torch.Tensor):
        """SFT on the own replies + ``pole_contrast`` * ORPO's odds-ratio term against the paired opposite replies."""
        if not torch.equal(opposite.cpu(), torch.arange(len(opposite)) % 2):  # one host sync, not two
            raise RuntimeError("pole-contrast rows must come in (own reply, opposite reply) pairs: keep the "
                               "expert dataset's order (no shuffling sampler, even batch size)")
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        log_probs, mask = outputs.log_probs, outputs.label_mask.float()  # [B, T], zero where no label
        own = opposite == 0
        sft = -log_probs[own].sum() / mask[own].sum().clamp_min(1)
        mean_log_prob = log_probs.sum(-1) / mask.sum(-1).clamp_min(1)
        log_odds = mean_log_prob - torch.log1p(-mean_log_prob.exp().clamp(max=1 - 1e-6))
        margin = log_odds[0::2] - log_odds[1::2]
        loss = sft - self.pole_contrast * F.logsigmoid(margin).mean()
        mode = "train" if self.model.training else "eval"
        stats = self.accelerator.gather_for_metrics(torch.stack([margin.detach(), (margin.detach() > 0).float()], -1))
        mean_margin, accuracy = stats.mean(0).tolist()  # one host sync for both metrics
        self._metrics[mode]["pole_log_odds_margin"].append(mean_margin)
        self._metrics[mode]["pole_preference_accuracy"].append(accuracy)
        return loss, outputs


def expert_dataset(pf: PersonaFuseModel, situations: Sequence[Situation], experts: Sequence[str], seed: int = 0,
                   contrast: bool = False) -> Dataset:
    """Prompt/completion rows of every named pole, each tagged with its expert's gate index.

    Rows are shuffled per pole (seeded) and interleaved round-robin, so read in order every run of
    ``len(experts)`` rows holds one example per pole: each expert gets the same number of updates.
    With ``contrast`` every row is followed by the opposite pole's reply to the same situation
    (``opposite_pole`` = 1, same expert index), the pair :class:`ExpertSFTTrainer` contrasts.
    """
    generator = torch.Generator().manual_seed(seed)
    per_expert = []
    for expert in experts:
        index = pf.trait_set.index(expert)
        own = [{**row, EXPERT_COLUMN: index} for row in expert_sft_rows(situations, expert)]
        if contrast:
            other = expert_sft_rows(situations, opposite_pole(pf.trait_set, expert))
            groups = [[{**a, CONTRAST_COLUMN: 0}, {**b, EXPERT_COLUMN: index, CONTRAST_COLUMN: 1}]
                      for a, b in zip(own, other, strict=True)]
        else:
            groups = [[row] for row in own]
        per_expert.append([groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()])
    interleaved = [row for turn in zip_longest(*per_expert) for group in turn if group is not None for row in group]
    if not interleaved:
        raise ValueError(f"no training responses for experts {list(experts)}")
    return Dataset.from_list(interleaved)


def opposite_pole(traits, expert: str) -> str:
    """The other pole of the expert's trait (``extraversion_high`` -> ``extraversion_low``)."""
    trait, pole = traits.split(expert)
    (other,) = (p for p in POLES if p != pole)
    return expert_name(trait, other)


def train_experts(pf: PersonaFuseModel, tokenizer, situations: Sequence[Situation], experts: Sequence[str],
                  args: SFTConfig, experts_dir: Path, resume: bool = True, log: Callable[[str], None] = print,
                  callbacks: Sequence = (), pole_contrast: float = 0.0) -> dict[str, Path]:
    """Train the named experts of ``pf`` (others stay untouched) and write each as a PEFT adapter.

    With ``resume``, experts already written are kept and an interrupted run continues from its last
    complete checkpoint.
    """
    targets = {name: experts_dir / name for name in experts}
    finished = [n for n, d in targets.items() if resume and (d / "adapter_model.safetensors").exists()]
    if finished:
        log(f"[experts] already trained in {experts_dir}, skipping: {', '.join(finished)}")
        for name in finished:
            pf.load_expert(name, targets[name])
    experts = [n for n in experts if n not in finished]
    if not experts:
        return targets
    pf.set_trainable(experts[0] if len(experts) == 1 else "experts")
    text_config = pf.config.get_text_config()
    declared = {key: getattr(text_config, key) for key in pf.declared_config_keys}
    # Gates are fixed here, so there is no router loss; TRL would otherwise look for router logits.
    args.router_aux_loss_coef = 0.0
    dataset = expert_dataset(pf, situations, experts, args.seed, contrast=pole_contrast > 0)
    trainer = ExpertSFTTrainer(model=pf, args=args, train_dataset=dataset, processing_class=tokenizer,
                               callbacks=list(callbacks), pole_contrast=pole_contrast)
    log(f"[experts] training {len(experts)} expert(s) in one run: {', '.join(experts)}")
    trainer.train(resume_from_checkpoint=last_checkpoint(args.output_dir) if resume else None)
    for key, value in declared.items():
        setattr(text_config, key, value)
    with full_weights(pf):  # every rank joins the gather under ZeRO-3 / FSDP2; one writes
        if trainer.accelerator.is_main_process:
            for name in experts:
                save_expert(pf, name, targets[name])
    trainer.accelerator.wait_for_everyone()
    return targets
