"""What every workflow needs from its composed config: the run context, model, data and stack config."""

from __future__ import annotations

from pathlib import Path

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import set_seed

from personafuse import PersonaFuseConfig
from personafuse.config import check_number
from personafuse.data import DataError, bundled_seed_paths, load_situations
from personafuse.data.corpus import corpus_path
from personafuse.sharding import zero3_share
from personafuse.training.runs import (
    check_trainer_values,
    checkpointing_names,
    configure_logger,
    init_distributed,
    trainer_kwargs,
)


class Run:
    """Distributed state, logging and paths of one recipe run."""

    def __init__(self, cfg: DictConfig):
        check_config(cfg)
        self.cfg = cfg
        set_seed(cfg.seed)  # fresh experts and the router are initialised before any trainer seeds
        self.state = init_distributed(cfg.launcher.distributed_backend)
        self.callbacks = configure_logger(cfg.logger.kind, cfg.logger.project, cfg.run_name)
        self.dir = Path(cfg.run_dir)

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    def log(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def log_partitioning(self, model) -> None:
        """Says whether ZeRO-3 init partitioned the base as it loaded (rank 0's share)."""
        share = zero3_share(model)
        if share:
            self.log(f"[zero3] base partitioned at load: this rank holds {share[0]:,} of {share[1]:,} parameter values")

    def trainer_args(self, block: DictConfig, output_dir: Path):
        """The trainer config class named by ``_target_``, with the run's own settings applied."""
        values = OmegaConf.to_container(block, resolve=True)
        cls = get_class(values["_target_"])
        return cls(**checkpointing_names(cls, trainer_kwargs(values, str(output_dir), self.state.num_processes > 1)))


def check_config(cfg: DictConfig) -> None:
    """Every value a recipe will use, checked before any model loads (a typo costs seconds, not a load)."""
    for name, block in (cfg.get("trainer") or {}).items():
        if isinstance(block, DictConfig) and "_target_" in block:
            values = OmegaConf.to_container(block, resolve=True)
            check_trainer_values(get_class(values["_target_"]), values, f"trainer.{name}")
    if "experts" in cfg and "router" in cfg:
        persona_config(cfg)
    if "data" in cfg and "max_length" in cfg.data:
        check_number(cfg.data.max_length, "data.max_length", integer=True, minimum=1)


def load_model(cfg: DictConfig):
    """(model, tokenizer) from ``cfg.model`` (a ``_target_`` loader)."""
    return instantiate(cfg.model)


def persona_config(cfg: DictConfig) -> PersonaFuseConfig:
    """The stack config from ``experts.*`` and ``router.config``; an invalid value names its config key."""
    experts = cfg.experts
    try:
        return PersonaFuseConfig(
            traits=OmegaConf.to_container(experts.traits) if isinstance(experts.traits, DictConfig) else experts.traits,
            experts=list(experts.experts) if experts.experts else None,
            r=experts.r, alpha=experts.alpha, dropout=experts.dropout,
            target_modules=list(experts.target_modules) if experts.target_modules else None,
            router=OmegaConf.to_container(cfg.router.config, resolve=True),
        )
    except (TypeError, ValueError) as e:
        message = str(e)
        message = f"router.config.{message[7:]}" if message.startswith("router.") else f"experts.{message}"
        raise type(e)(message) from None


def load_data(cfg: DictConfig, traits):
    """(train, heldout) situations; ``null`` paths mean the bundled set ``data.bundled`` (seed or corpus)."""
    if cfg.data.get("bundled", "seed") == "corpus":
        corpus = load_situations(corpus_path(), traits)
        bundled_train, bundled_heldout = [s for s in corpus if s.split == "train"], [s for s in corpus if s.split != "train"]
    elif cfg.data.get("bundled", "seed") == "seed":
        seed_train, seed_heldout = bundled_seed_paths()
        bundled_train, bundled_heldout = load_situations(seed_train, traits), load_situations(seed_heldout, traits)
    else:
        raise ValueError(f"data.bundled must be 'seed' or 'corpus', got {cfg.data.bundled!r}")
    train = load_situations(cfg.data.train, traits) if cfg.data.train else bundled_train
    heldout = load_situations(cfg.data.heldout, traits) if cfg.data.heldout else bundled_heldout
    for key, situations in (("train", train), ("heldout", heldout)):
        if not situations:
            raise DataError(f"data.{key} holds no situations; it needs at least one JSON line (see personafuse/data/schema.py)",
                            path=cfg.data[key] or "the bundled data")
    return train, heldout
