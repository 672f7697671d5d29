"""SFT on persona-augmented data with TRL (prompt/completion, loss on the response only).

    python recipes/persona_sft.py                                 # one LoRA on outputs/persona-sft-data/math.jsonl
    python recipes/persona_sft.py sft.mode=full trainer.expert.learning_rate=1e-5
    python recipes/persona_sft.py sft.mode=personafuse sft.init_bundle=outputs/personafuse/bundle
    python recipes/persona_sft.py eval.data=gsm8k_test.jsonl      # then score it (see eval_math.py)

Writes ``model/`` (full), ``adapter/`` (lora) or ``bundle/`` (personafuse) into ``outputs/<run_name>/``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from personafuse.cli import user_errors
from personafuse.training.runs import shutdown_distributed
from personafuse.workflows.eval_math import load_for_eval, run_eval
from personafuse.workflows.persona_sft import run_sft
from personafuse.workflows.run import Run, load_model


@hydra.main(config_path="../conf", config_name="persona_sft", version_base="1.3")
@user_errors("persona-sft")
def main(cfg: DictConfig) -> None:
    run = Run(cfg)
    model, tokenizer = load_model(cfg)
    target = run_sft(cfg, run, model, tokenizer)
    if cfg.eval.data and run.is_main:
        e = cfg.eval
        model, tokenizer = load_for_eval(cfg.model, target)  # the saved result, as any later user sees it
        run_eval(model, tokenizer, e.data, run.dir / "eval_math", e.limit, e.batch_size, e.max_new_tokens, e.confidence)
    shutdown_distributed()


if __name__ == "__main__":
    main()
