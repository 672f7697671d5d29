"""Distil the APC relevance (no/yes) and NLI (contradicted/neutral/entailed) discriminators.

    python recipes/train_discriminator.py                                  # bundled data, MiniLM encoder
    python recipes/train_discriminator.py discriminator.init=/models/deberta-v3-large trainer=gpu
    python recipes/train_discriminator.py synthesis.enabled=true \
        '+synthesis.generator={backend: openai, base_url: http://localhost:8000/v1, model: teacher}'

Writes ``<run_dir>/discriminators/{relevance,nli}`` and ``discriminator_report.json`` (held-out accuracy).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from personafuse.cli import user_errors
from personafuse.training.runs import shutdown_distributed
from personafuse.workflows.discriminators import run_discriminators
from personafuse.workflows.run import Run


@hydra.main(config_path="../conf", config_name="train_discriminator", version_base="1.3")
@user_errors("train-discriminator")
def main(cfg: DictConfig) -> None:
    run = Run(cfg)
    run_discriminators(cfg, run)
    shutdown_distributed()


if __name__ == "__main__":
    main()
