"""Train the context router over frozen experts, report held-out routing, save the bundle.

    python recipes/train_router.py                       # reads outputs/<run_name>/experts
    python recipes/train_router.py router=sentence router.loss.lm=0

With ``router.loss.lm=0`` the router learns from the labels alone and (``router.cached_features``) trains on
contexts encoded once instead of re-running the frozen encoder every step.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from personafuse.cli import user_errors
from personafuse.training.runs import shutdown_distributed
from personafuse.workflows.router import build_stack, run_router
from personafuse.workflows.run import Run, load_model


@hydra.main(config_path="../conf", config_name="train_router", version_base="1.3")
@user_errors("train-router")
def main(cfg: DictConfig) -> None:
    run = Run(cfg)
    model, tokenizer = load_model(cfg)
    run_router(cfg, run, build_stack(cfg, model, tokenizer), tokenizer)
    shutdown_distributed()


if __name__ == "__main__":
    main()
