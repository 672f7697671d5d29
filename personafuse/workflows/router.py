"""Train the context router over frozen experts, report held-out routing, save the bundle."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from personafuse import PersonaFuseModel
from personafuse.sharding import full_weights, zero3_share
from personafuse.training.checkpointing import last_checkpoint
from personafuse.training.router import RouterDataset, RouterLossWeights, RouterTrainer, collate
from personafuse.training.router_features import cached_features, fit_router
from personafuse.training.routing_metrics import plot_activation_heatmap, routing_report
from personafuse.training.runs import require_reply_room
from personafuse.workflows.run import Run, load_data, persona_config


def build_stack(cfg: DictConfig, model, tokenizer) -> PersonaFuseModel:
    """A fresh stack on ``model`` with the trained experts from ``experts_dir``."""
    pf = PersonaFuseModel.from_base(model, persona_config(cfg), tokenizer=tokenizer)
    experts_dir = Path(cfg.experts_dir)
    for name in pf.expert_names:
        if not (experts_dir / name / "adapter_config.json").exists():
            raise FileNotFoundError(f"expert {name!r} not found in {experts_dir} (experts_dir); run `personafuse train-experts` first")
        pf.load_expert(name, experts_dir / name)
    return pf


def run_router(cfg: DictConfig, run: Run, pf: PersonaFuseModel, tokenizer) -> tuple[PersonaFuseModel, dict]:
    """Train the router of a stack whose experts are trained; save bundle, report and heatmap."""
    run.log_partitioning(pf.model)
    pf.set_trainable("router")
    train, heldout = load_data(cfg, pf.trait_set)
    weights = RouterLossWeights(**OmegaConf.to_container(cfg.router.loss, resolve=True))
    if weights.lm > 0:
        require_reply_room(tokenizer, train, cfg.data.max_length, "data.max_length", lambda s: s.response is not None)
    args = run.trainer_args(cfg.trainer.router, run.dir / "checkpoints" / "router")
    if weights.lm == 0 and cfg.router.cached_features:
        if zero3_share(pf.model):
            raise ValueError("router.cached_features=true (with router.loss.lm=0) encodes the contexts outside the "
                             "trainer, which cannot run a base that ZeRO-3 partitioned at load; set "
                             "router.cached_features=false or launch with launch/deepspeed_zero2.yaml / multi_gpu.yaml")
        fit_on_features(cfg, run, pf, tokenizer, train, weights, args)
    else:
        dataset = RouterDataset(train, tokenizer, pf.trait_set, cfg.data.max_length, weights.target_temperature)
        trainer = RouterTrainer(model=pf, args=args, train_dataset=dataset, loss_weights=weights,
                                data_collator=collate(tokenizer.pad_token_id), callbacks=run.callbacks())
        trainer.train(resume_from_checkpoint=last_checkpoint(args.output_dir) if cfg.resume else None)
    pf.eval()
    with full_weights(pf):  # a collective under ZeRO-3 / FSDP2: every rank gathers, the main one writes
        if run.is_main:  # the trained router is saved before anything that could still fail
            pf.save_pretrained(Path(cfg.bundle_dir), overwrite=True)
    report = routing_report(pf, tokenizer, heldout)
    if run.is_main:
        (run.dir / "routing_report.json").write_text(json.dumps(report, indent=2))
        plot_activation_heatmap(report, pf.trait_set.traits, run.dir / "routing_heatmap.png")
    run.log(f"[router] held-out top-pole accuracy {report['top_pole_accuracy']:.0%}, "
            f"top-trait accuracy {report['top_trait_accuracy']:.0%}, mean gate entropy {report['mean_entropy']:.2f}")
    run.log(f"[router] bundle in {cfg.bundle_dir}, heatmap in {run.dir / 'routing_heatmap.png'}")
    return pf, report


def fit_on_features(cfg: DictConfig, run: Run, pf: PersonaFuseModel, tokenizer, train, weights: RouterLossWeights,
                    args) -> None:
    """Labels-only router training: encode every context once (cached in the run dir), then fit the head.

    Every rank encodes and fits the same seeded way, so the routers agree without communication.
    """
    traits = pf.trait_set
    features = cached_features(run.dir / "router_features.safetensors", pf, tokenizer, train, cfg.data.max_length)
    activations = torch.stack([s.activation_vector(traits) for s in train]).float()
    targets = torch.stack([s.gate_targets(traits, weights.target_temperature) for s in train]).float()
    steps = args.max_steps if args.max_steps > 0 else math.ceil(len(train) / args.per_device_train_batch_size) * math.ceil(args.num_train_epochs)
    fit_router(pf.router, features, activations, targets, weights, pf.routing.config.z_loss_weight,
               max_steps=steps, batch_size=args.per_device_train_batch_size, learning_rate=args.learning_rate,
               weight_decay=args.weight_decay, seed=args.seed, log=run.log, logging_steps=args.logging_steps)
