"""Train one LoRA expert per trait pole (or ``experts.only``) with TRL's SFTTrainer."""

from __future__ import annotations

from omegaconf import DictConfig

from personafuse import PersonaFuseModel
from personafuse.data import DataError
from personafuse.training.experts import train_experts
from personafuse.training.runs import require_reply_room
from personafuse.workflows.run import Run, load_data, persona_config


def run_experts(cfg: DictConfig, run: Run, model, tokenizer) -> PersonaFuseModel:
    """Train the experts (all poles in one run, or ``experts.only``); returns the stack holding them."""
    run.log_partitioning(model)
    pf = PersonaFuseModel.from_base(model, persona_config(cfg), tokenizer=tokenizer)
    experts = [cfg.experts.only] if cfg.experts.only else list(pf.expert_names)
    for name in experts:
        pf.trait_set.index(name)
    train, _ = load_data(cfg, pf.trait_set)
    if not any(s.responses for s in train):
        raise DataError("no situation has 'responses' (pole replies), so there is nothing to train the experts on",
                        path=cfg.data.train or "the bundled data")
    max_length = cfg.trainer.expert.get("max_length")
    if max_length:
        require_reply_room(tokenizer, train, max_length, "trainer.expert.max_length", lambda s: bool(s.responses))
    run_name = cfg.experts.only or "all"
    args = run.trainer_args(cfg.trainer.expert, run.dir / "checkpoints" / "experts" / run_name)
    train_experts(pf, tokenizer, train, experts, args, run.dir / "experts", resume=cfg.resume, log=run.log,
                  callbacks=run.callbacks(), pole_contrast=cfg.experts.get("pole_contrast", 0.0))
    run.log(f"[experts] {len(experts)} expert(s) in {run.dir / 'experts'}")
    return pf
