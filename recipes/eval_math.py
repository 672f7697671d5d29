"""Accuracy on GSM8K-format JSONL: greedy solutions, answer extraction, a Wilson confidence interval.

    python recipes/eval_math.py                                          # base model, bundled 20 problems
    python recipes/eval_math.py data=gsm8k_test.jsonl checkpoint=outputs/persona-sft/adapter
    python recipes/eval_math.py checkpoint=outputs/persona-sft/bundle   # a PersonaFuse bundle

``checkpoint`` may be a full model directory, a PEFT adapter or a PersonaFuse bundle; adapters and
bundles go on top of ``model``. Writes ``summary.json`` and ``predictions.jsonl`` into ``out_dir``.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from personafuse.cli import user_errors
from personafuse.workflows.eval_math import load_for_eval, run_eval


@hydra.main(config_path="../conf", config_name="eval_math", version_base="1.3")
@user_errors("eval-math")
def main(cfg: DictConfig) -> None:
    model, tokenizer = load_for_eval(cfg.model, cfg.checkpoint)
    run_eval(model, tokenizer, cfg.data, Path(cfg.out_dir), cfg.limit, cfg.batch_size, cfg.max_new_tokens,
             cfg.confidence)


if __name__ == "__main__":
    main()
