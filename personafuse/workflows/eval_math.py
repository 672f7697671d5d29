"""Accuracy on GSM8K-format JSONL for a base, full, adapter or bundle checkpoint."""

from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from personafuse import PersonaFuseModel
from personafuse.base_models import load_base_model
from personafuse.checkpoint import CONFIG_FILE
from personafuse.data import HFChatGenerator
from personafuse.data.persona_math import bundled_math_path, load_problems
from personafuse.math_eval import MathEvalResult, evaluate_math, save_eval


def load_for_eval(cfg_model: DictConfig, checkpoint: str | None):
    """(model in eval mode, tokenizer) for a base, full, adapter or bundle checkpoint."""
    path = Path(checkpoint) if checkpoint else None
    if path is not None and not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} is not a directory")
    if path is not None and (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        model, tokenizer = load_base_model(path, dtype=cfg_model.dtype)
        return model.eval(), tokenizer
    model, tokenizer = instantiate(cfg_model)
    if path is None:
        return model.eval(), tokenizer
    if (path / CONFIG_FILE).exists():
        return PersonaFuseModel.from_pretrained(model, path, tokenizer=tokenizer).eval(), tokenizer
    if (path / "adapter_config.json").exists():
        from peft import PeftModel

        return PeftModel.from_pretrained(model, path).merge_and_unload().eval(), tokenizer
    raise FileNotFoundError(f"{path} holds no model (config.json), PEFT adapter (adapter_config.json) "
                            f"or PersonaFuse bundle ({CONFIG_FILE})")


def run_eval(model, tokenizer, data: str | None, out_dir: Path, limit: int | None = None, batch_size: int = 8,
             max_new_tokens: int = 384, confidence: float = 0.95) -> MathEvalResult:
    problems = load_problems(data or bundled_math_path())[slice(limit)]
    generator = HFChatGenerator(model, tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens, temperature=0)
    result = evaluate_math(generator, problems, batch_size=batch_size, confidence=confidence,
                           max_new_tokens=max_new_tokens)
    save_eval(result, out_dir)
    print(f"[eval-math] accuracy {result.accuracy:.1%} ({result.correct}/{result.total}), "
          f"{confidence:.0%} Wilson CI [{result.ci_low:.1%}, {result.ci_high:.1%}]; details in {out_dir}")
    return result
