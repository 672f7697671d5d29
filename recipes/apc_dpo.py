"""APC-DPO: make a PersonaFuse model more faithful to a persona (Peng & Shang, NeurIPS 2024).

For each training query the current model samples n replies (dynamic routing), APC scores them,
and the best reply is paired against the worst when their APC gap exceeds δ. Pairs go to
``apc.pairs_file`` as they are made (a rerun resumes there); then TRL's DPOTrainer trains the
configured part (experts, router or both) against the model before DPO, with the router's aux loss.
Mean APC on held-out queries is reported before and after.

    python recipes/train_discriminator.py && python recipes/apc_dpo.py          # after recipes/pipeline.py
    python recipes/apc_dpo.py apc.trainable=both apc.num_samples=8 trainer.dpo.beta=0.05
    accelerate launch --config_file launch/multi_gpu.yaml recipes/apc_dpo.py model=llama31_8b trainer=gpu
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from personafuse.cli import user_errors
from personafuse.training.runs import shutdown_distributed
from personafuse.workflows.apc_dpo import load_stack, run_apc_dpo
from personafuse.workflows.run import Run, load_model


@hydra.main(config_path="../conf", config_name="apc_dpo", version_base="1.3")
@user_errors("apc-dpo")
def main(cfg: DictConfig) -> None:
    run = Run(cfg)
    model, tokenizer = load_model(cfg)
    run_apc_dpo(cfg, run, load_stack(cfg, model, tokenizer), tokenizer)
    shutdown_distributed()


if __name__ == "__main__":
    main()
