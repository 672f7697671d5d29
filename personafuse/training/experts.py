"""Per-pole expert SFT: one standard PEFT LoRA per trait pole, trained with TRL's SFTTrainer."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from trl import SFTConfig, SFTTrainer

from personafuse.checkpoint import atomic_dir, fingerprint
from personafuse.data import Situation, expert_sft_rows
from personafuse.targets import default_target_modules
from personafuse.training.checkpointing import AtomicCheckpointMixin, last_checkpoint


class ExpertSFTTrainer(AtomicCheckpointMixin, SFTTrainer):
    """TRL's SFTTrainer with atomic checkpoints."""


def expert_lora_config(model, r: int, alpha: float, dropout: float, target_modules: Sequence[str] | None) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                      target_modules=list(target_modules or default_target_modules(model)))


def train_expert(model, tokenizer, situations: Sequence[Situation], expert: str, lora: LoraConfig,
                 args: SFTConfig, out_dir: Path, resume: bool = True, callbacks: Sequence = ()) -> Path:
    """Train expert ``expert`` on the responses written in its voice; returns its adapter directory.

    The base model is left as it was (the LoRA layers are unloaded afterwards). ``out_dir`` gets a
    plain PEFT adapter, written atomically and only by the main process.
    """
    rows = expert_sft_rows(situations, expert)
    if not rows:
        raise ValueError(f"no training responses for expert {expert!r}")
    peft_model = get_peft_model(model, lora)
    try:
        trainer = ExpertSFTTrainer(model=peft_model, args=args, train_dataset=Dataset.from_list(rows),
                                   processing_class=tokenizer, callbacks=list(callbacks))
        trainer.train(resume_from_checkpoint=last_checkpoint(args.output_dir) if resume else None)
        if trainer.accelerator.is_main_process:
            with atomic_dir(out_dir, overwrite=True) as tmp:
                peft_model.save_pretrained(tmp)
                base = {"name_or_path": getattr(model.config, "_name_or_path", None), "fingerprint": fingerprint(model)}
                (tmp / "personafuse_base.json").write_text(json.dumps(base, indent=2))
        trainer.accelerator.wait_for_everyone()
    finally:
        peft_model.unload()
    return out_dir


def train_experts(model, tokenizer, situations: Sequence[Situation], experts: Sequence[str], lora: LoraConfig,
                  make_args: Callable[[str], SFTConfig], experts_dir: Path, resume: bool = True,
                  log: Callable[[str], None] = print, callbacks: Callable[[], Sequence] = list) -> dict[str, Path]:
    """Train every named expert in turn; finished experts are skipped when resuming."""
    done = {}
    for expert in experts:
        target = experts_dir / expert
        if resume and (target / "adapter_model.safetensors").exists():
            log(f"[experts] {expert}: already trained at {target}, skipping")
        else:
            log(f"[experts] {expert}: training")
            torch.manual_seed(make_args(expert).seed)
            train_expert(model, tokenizer, situations, expert, lora, make_args(expert), target, resume, callbacks())
        done[expert] = target
    return done
