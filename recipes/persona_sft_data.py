"""Persona-diversified SFT data: a persona bank, then rewrite-and-verify (math) or persona voices (dialogue).

    python recipes/persona_sft_data.py                                  # bundled 20 problems, embedded SmolLM2
    python recipes/persona_sft_data.py input=gsm8k_train.jsonl generator=openai \\
        generator.base_url=http://localhost:8000/v1 generator.model=Qwen2.5-72B-Instruct math.k1=5
    python recipes/persona_sft_data.py task=dialogue dialogue.k=3       # grow the trait-expert situations

Outputs in ``outputs/<run_name>/``: ``personas.jsonl``, ``<task>.jsonl`` (appended; a rerun resumes),
``math.ledger.jsonl`` and ``stats.json``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from personafuse.cli import user_errors
from personafuse.workflows.persona_sft_data import run_data


@hydra.main(config_path="../conf", config_name="persona_sft_data", version_base="1.3")
@user_errors("persona-sft-data")
def main(cfg: DictConfig) -> None:
    run_data(cfg)


if __name__ == "__main__":
    main()
