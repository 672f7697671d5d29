"""Train one LoRA expert per trait pole with TRL's SFTTrainer (loss on the reply only).

    python recipes/train_experts.py                                  # all ten poles, embedded model
    python recipes/train_experts.py experts.only=extraversion_high   # one pole
    python recipes/train_experts.py -m experts.only=openness_high,openness_low
    accelerate launch --config_file launch/multi_gpu.yaml recipes/train_experts.py model=llama31_8b trainer=gpu
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from personafuse.cli import user_errors
from personafuse.training.runs import shutdown_distributed
from personafuse.workflows.experts import run_experts
from personafuse.workflows.run import Run, load_model


@hydra.main(config_path="../conf", config_name="train_experts", version_base="1.3")
@user_errors("train-experts")
def main(cfg: DictConfig) -> None:
    run = Run(cfg)
    model, tokenizer = load_model(cfg)
    run_experts(cfg, run, model, tokenizer)
    shutdown_distributed()


if __name__ == "__main__":
    main()
