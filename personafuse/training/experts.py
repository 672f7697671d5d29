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
from personafuse.training.checkpointing import AtomicCheckpointMixin, BundleCheckpointMixin, last_checkpoint

EXPERT_COLUMN = "expert_index"


class ExpertSFTTrainer(BundleCheckpointMixin, AtomicCheckpointMixin, SFTTrainer):
    """TRL's SFTTrainer where each example is routed, one-hot, to the expert of its pole."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        collate = self.data_collator

        def with_expert(examples: list[dict]) -> dict:
            batch = collate(examples)
            batch[EXPERT_COLUMN] = torch.tensor([e[EXPERT_COLUMN] for e in examples])
            return batch

        self.data_collator = with_expert

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if EXPERT_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, EXPERT_COLUMN]

    def _get_train_sampler(self, *args, **kwargs):
        """In dataset order: ``expert_dataset`` already shuffled and balanced the poles."""
        return SequentialSampler(self.train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        experts = inputs.pop(EXPERT_COLUMN)
        pf = self.accelerator.unwrap_model(model)
        with pf.fixed_gates(F.one_hot(experts, pf.trait_set.num_experts).float()):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def expert_dataset(pf: PersonaFuseModel, situations: Sequence[Situation], experts: Sequence[str], seed: int = 0) -> Dataset:
    """Prompt/completion rows of every named pole, each tagged with its expert's gate index.

    Rows are shuffled per pole (seeded) and interleaved round-robin, so read in order every run of
    ``len(experts)`` rows holds one example per pole: each expert gets the same number of updates.
    """
    generator = torch.Generator().manual_seed(seed)
    per_expert = []
    for expert in experts:
        rows = [{**row, EXPERT_COLUMN: pf.trait_set.index(expert)} for row in expert_sft_rows(situations, expert)]
        per_expert.append([rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()])
    interleaved = [row for group in zip_longest(*per_expert) for row in group if row is not None]
    if not interleaved:
        raise ValueError(f"no training responses for experts {list(experts)}")
    return Dataset.from_list(interleaved)


def train_experts(pf: PersonaFuseModel, tokenizer, situations: Sequence[Situation], experts: Sequence[str],
                  args: SFTConfig, experts_dir: Path, resume: bool = True, log: Callable[[str], None] = print,
                  callbacks: Sequence = ()) -> dict[str, Path]:
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
    trainer = ExpertSFTTrainer(model=pf, args=args, train_dataset=expert_dataset(pf, situations, experts, args.seed),
                               processing_class=tokenizer, callbacks=list(callbacks))
    log(f"[experts] training {len(experts)} expert(s) in one run: {', '.join(experts)}")
    trainer.train(resume_from_checkpoint=last_checkpoint(args.output_dir) if resume else None)
    for key, value in declared.items():
        setattr(text_config, key, value)
    if trainer.accelerator.is_main_process:
        for name in experts:
            save_expert(pf, name, targets[name])
    trainer.accelerator.wait_for_everyone()
    return targets
