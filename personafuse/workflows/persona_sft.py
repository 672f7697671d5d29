"""SFT on persona-augmented data: full, one LoRA, or the PersonaFuse stack."""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset
from omegaconf import DictConfig
from peft import get_peft_model
from trl import SFTTrainer

from personafuse import PersonaFuseModel
from personafuse.checkpoint import atomic_dir
from personafuse.data.persona_math import math_sft_rows
from personafuse.targets import lora_config
from personafuse.training.checkpointing import AtomicCheckpointMixin, BundleCheckpointMixin, last_checkpoint
from personafuse.workflows.run import Run, persona_config

MODES = {"full": "model", "lora": "adapter", "personafuse": "bundle"}


class PersonaSFTTrainer(AtomicCheckpointMixin, SFTTrainer):
    """TRL's SFTTrainer with atomic checkpoints."""


class StackSFTTrainer(BundleCheckpointMixin, PersonaSFTTrainer):
    """For the PersonaFuse stack: checkpoints hold the bundle."""


def prepare(cfg: DictConfig, model, tokenizer):
    """The module to train for ``sft.mode``, with only the weights that mode trains left trainable."""
    if cfg.sft.mode == "full":
        return model.requires_grad_(True)
    if cfg.sft.mode == "lora":
        lora = cfg.sft.lora
        targets = list(lora.target_modules) if lora.target_modules else None
        return get_peft_model(model, lora_config(model, lora.r, lora.alpha, lora.dropout, targets))
    if cfg.sft.init_bundle:
        pf = PersonaFuseModel.from_pretrained(model, cfg.sft.init_bundle, tokenizer=tokenizer)
    else:
        pf = PersonaFuseModel.from_base(model, persona_config(cfg), tokenizer=tokenizer)
    pf.set_trainable(cfg.sft.trainable)
    return pf


def run_sft(cfg: DictConfig, run: Run, model, tokenizer) -> Path:
    """Train and save; returns where the result is (a finished one is reused when resuming)."""
    if cfg.sft.mode not in MODES:
        raise ValueError(f"sft.mode must be one of {sorted(MODES)}, got {cfg.sft.mode!r}")
    target = run.dir / MODES[cfg.sft.mode]
    if cfg.resume and target.is_dir():
        run.log(f"[persona-sft] {target} exists, skipping training (resume=false retrains)")
        return target
    rows = math_sft_rows(cfg.sft.data)
    if not rows:
        raise ValueError(f"{cfg.sft.data} has no training rows")
    trained = prepare(cfg, model, tokenizer)
    args = run.trainer_args(cfg.trainer.expert, run.dir / "checkpoints" / "sft")
    torch.manual_seed(args.seed)
    trainer_cls = StackSFTTrainer if cfg.sft.mode == "personafuse" else PersonaSFTTrainer
    trainer = trainer_cls(model=trained, args=args, train_dataset=Dataset.from_list(rows),
                                processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=last_checkpoint(args.output_dir) if cfg.resume else None)
    if run.is_main:
        if cfg.sft.mode == "personafuse":
            trained.save_pretrained(target, overwrite=True)
        else:
            marker = "adapter_config.json" if cfg.sft.mode == "lora" else "config.json"
            with atomic_dir(target, overwrite=True, marker=marker) as tmp:
                trained.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
    trainer.accelerator.wait_for_everyone()
    run.log(f"[persona-sft] {cfg.sft.mode} SFT on {len(rows)} rows saved to {target}")
    return target
