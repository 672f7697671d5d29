"""Distil the APC relevance and NLI discriminators (optionally on teacher-synthesized labels)."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from transformers import set_seed

from personafuse.apc import bundled_data_path, load_labelled, load_personas
from personafuse.apc.distill import accuracy, init_discriminator, split_rows, train_discriminator
from personafuse.apc.synthesis import synthesize_labels
from personafuse.checkpoint import atomic_dir
from personafuse.context import bundled_sentence_encoder_path
from personafuse.data import make_generator
from personafuse.training.checkpointing import last_checkpoint
from personafuse.workflows.run import Run


def synthesize(cfg: DictConfig, run: Run) -> dict[str, Path]:
    """Teacher-labelled JSONL for every requested character (resumes where it stopped)."""
    s = cfg.synthesis
    if not s.generator:
        raise ValueError("synthesis.enabled=true needs synthesis.generator (a make_generator spec)")
    generator = make_generator(OmegaConf.to_container(s.generator, resolve=True))
    personas = load_personas(s.persona_file or bundled_data_path("personas.yaml"))
    paths = {}
    for character in s.characters or list(personas):
        persona = personas[character]
        paths = synthesize_labels(generator, character, s.out_dir, profile=persona.profile,
                                  statements=None if s.from_profile else persona.statements,
                                  queries_per_statement=s.queries_per_statement, negatives=s.negatives,
                                  borrowed=s.borrowed, seed=cfg.seed)
        run.log(f"[synthesis] {character}: labels in {s.out_dir}")
    return paths


def trainer_block(cfg: DictConfig, kind: str) -> DictConfig:
    """The trainer group's ``discriminator`` block with ``discriminator.trainer.<kind>`` applied."""
    return OmegaConf.merge(cfg.trainer.discriminator, cfg.discriminator.trainer.get(kind) or {})


def run_discriminators(cfg: DictConfig, run: Run) -> dict:
    d = cfg.discriminator
    synthesized = synthesize(cfg, run) if OmegaConf.select(cfg, "synthesis.enabled", default=False) else {}
    init = d.init or bundled_sentence_encoder_path()
    report = {}
    for kind in d.kinds:
        path = synthesized.get(kind) or d.data[kind] or bundled_data_path(f"{kind}.jsonl")
        train, heldout = split_rows(load_labelled(path, kind), d.heldout_fraction, cfg.seed)
        set_seed(cfg.seed)  # the new head's init does not depend on what ran before (the pipeline's stages)
        model, tokenizer = init_discriminator(init, kind, d.freeze_embeddings, log=run.log)
        args = run.trainer_args(trainer_block(cfg, kind), run.dir / "checkpoints" / f"discriminator-{kind}")
        train_discriminator(model, tokenizer, train, kind, args, last_checkpoint(args.output_dir) if cfg.resume else None,
                            balance_classes=kind in d.balance_classes)
        report[kind] = {"data": str(path), "train_rows": len(train), **accuracy(model, tokenizer, heldout, kind)}
        if run.is_main:
            with atomic_dir(Path(d.out_dir) / kind, overwrite=True, marker="config.json") as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
        run.log(f"[discriminator] {kind}: held-out accuracy {report[kind]['accuracy']:.1%} "
                f"on {report[kind]['rows']} rows ({len(train)} trained on); saved to {Path(d.out_dir) / kind}")
    if run.is_main:
        (run.dir / "discriminator_report.json").write_text(json.dumps(report, indent=2))
    return report
