"""Evaluation suites on a PersonaFuse bundle and its baselines: results.json, report.md and plots.

    python recipes/evaluate.py                                   # outputs/demo/bundle, trait expression + routing
    python recipes/evaluate.py suites='[gsm8k,multiple_choice]' data.gsm8k=gsm8k_test.jsonl
    python recipes/evaluate.py suites='[adherence,pairwise,judge_sanity]' \\
        +judges.qwen='{backend: openai, base_url: "http://localhost:8000/v1", model: Qwen2.5-72B-Instruct}'
    python recipes/evaluate.py suites='[personagym]' data.personagym=PersonaGym/questions/benchmark-v1 \\
        +judges.qwen='{backend: openai, base_url: "http://localhost:8000/v1", model: Qwen2.5-72B-Instruct}'

Replies and scores are cached in ``<out_dir>/cache/``; a rerun continues where the last one stopped.
"""

from __future__ import annotations

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from personafuse import PersonaFuseModel
from personafuse.cli import user_errors
from personafuse.eval import GenerationSettings, run_evaluation


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
@user_errors("evaluate")
def main(cfg: DictConfig) -> None:
    model, tokenizer = instantiate(cfg.model)
    pf = PersonaFuseModel.from_pretrained(model, cfg.bundle_dir, tokenizer=tokenizer).eval()
    plain = OmegaConf.to_container(cfg, resolve=True)
    run_evaluation(pf, tokenizer, cfg.out_dir, suites=plain["suites"], candidates=plain["candidates"],
                   settings=GenerationSettings(**plain["generation"]), data=plain["data"],
                   trait_scorer=cfg.trait_scorer, judges=plain["judges"], apc=plain["apc"], safety=plain["safety"],
                   reward_models=plain["reward_models"], math_max_new_tokens=cfg.math_max_new_tokens,
                   limit=cfg.limit, baseline=cfg.baseline, personafeedback_fields=plain["personafeedback_fields"])
    print(f"[evaluate] results in {cfg.out_dir}/results.json, report in {cfg.out_dir}/report.md")


if __name__ == "__main__":
    main()
