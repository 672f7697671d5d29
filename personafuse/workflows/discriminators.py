"""Distil the APC relevance and NLI discriminators (optionally on teacher-synthesized labels)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from transformers import set_seed

from personafuse.apc import Discriminator, bundled_data_path, load_labelled, load_personas
from personafuse.apc.distill import accuracy, init_discriminator, split_rows, train_discriminator
from personafuse.apc.frozen import FrozenEncoderDiscriminator, HeadConfig, HeadTraining, train_head
from personafuse.apc.labels import spec
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


def train_frozen_head(cfg: DictConfig, kind: str, init, train: list[dict], run: Run) -> FrozenEncoderDiscriminator:
    """``discriminator.architecture=frozen_head``: features of the frozen encoder, a small head fitted in seconds."""
    h = OmegaConf.merge(cfg.discriminator.head, cfg.discriminator.head_overrides.get(kind) or {})
    config = HeadConfig(kind, hidden=h.hidden, dropout=h.dropout, vectors=h.vectors, max_length=h.max_length)
    disc = FrozenEncoderDiscriminator.from_encoder(init, config, seed=cfg.seed)
    training = HeadTraining(h.epochs, h.learning_rate, h.weight_decay, kind in cfg.discriminator.balance_classes)
    start = time.perf_counter()
    losses = train_head(disc, train, training, seed=cfg.seed)
    run.log(f"[discriminator] {kind}: frozen-encoder head ({disc.num_features} features, hidden {config.hidden}): features "
            f"and fit {time.perf_counter() - start:.0f} s, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return disc


def train_cross_encoder(cfg: DictConfig, kind: str, init, train: list[dict], run: Run) -> Discriminator:
    """``discriminator.architecture=cross_encoder``: the paper's fine-tuned sequence classifier."""
    d = cfg.discriminator
    set_seed(cfg.seed)  # the new head's init does not depend on what ran before (the pipeline's stages)
    model, tokenizer = init_discriminator(init, kind, d.freeze_embeddings, log=run.log)
    args = run.trainer_args(trainer_block(cfg, kind), run.dir / "checkpoints" / f"discriminator-{kind}")
    train_discriminator(model, tokenizer, train, kind, args, last_checkpoint(args.output_dir) if cfg.resume else None,
                        balance_classes=kind in d.balance_classes)
    return Discriminator(model, tokenizer, spec(kind).labels, name=f"{kind} discriminator")


ARCHITECTURES = {"frozen_head": train_frozen_head, "cross_encoder": train_cross_encoder}


def run_discriminators(cfg: DictConfig, run: Run) -> dict:
    d = cfg.discriminator
    if d.architecture not in ARCHITECTURES:
        raise ValueError(f"discriminator.architecture must be one of {sorted(ARCHITECTURES)}, got {d.architecture!r}")
    synthesized = synthesize(cfg, run) if OmegaConf.select(cfg, "synthesis.enabled", default=False) else {}
    init = d.init or bundled_sentence_encoder_path()
    report = {}
    for kind in d.kinds:
        path = synthesized.get(kind) or d.data[kind] or bundled_data_path(f"{kind}.jsonl")
        train, heldout = split_rows(load_labelled(path, kind), d.heldout_fraction, cfg.seed)
        start = time.perf_counter()
        disc = ARCHITECTURES[d.architecture](cfg, kind, init, train, run)
        report[kind] = {"data": str(path), "architecture": d.architecture, "train_rows": len(train),
                        "train_seconds": round(time.perf_counter() - start, 1), **accuracy(disc, heldout, kind)}
        if run.is_main:
            with atomic_dir(Path(d.out_dir) / kind, overwrite=True, marker="config.json") as tmp:
                if isinstance(disc, FrozenEncoderDiscriminator):
                    disc.save_pretrained(tmp)
                else:
                    disc.model.save_pretrained(tmp)
                    disc.tokenizer.save_pretrained(tmp)
        per_class = ", ".join(f"{label} {report[kind][f'accuracy_{label}']:.2f}" for label in spec(kind).labels
                              if f"accuracy_{label}" in report[kind])
        run.log(f"[discriminator] {kind}: held-out accuracy {report[kind]['accuracy']:.1%} ({per_class}) "
                f"on {report[kind]['rows']} rows ({len(train)} trained on); saved to {Path(d.out_dir) / kind}")
    if run.is_main:
        (run.dir / "discriminator_report.json").write_text(json.dumps(report, indent=2))
    return report
