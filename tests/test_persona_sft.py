"""The persona SFT recipe on a tiny model (full, single LoRA, PersonaFuse stack) and the math evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from personafuse.data.persona_math import MathProblem, augment_math, load_problems
from personafuse.data.personas import build_persona_bank
from personafuse.math_eval import evaluate_math, wilson_interval
from personafuse.workflows.eval_math import load_for_eval, run_eval
from personafuse.workflows.persona_sft import run_sft
from personafuse.workflows.run import Run, load_model
from tests.test_persona_pipeline import PROBLEMS, Teacher

REPO = Path(__file__).resolve().parents[1]

TINY = ["experts.r=2", "experts.alpha=4", "sft.lora.r=2", "sft.lora.alpha=4", "trainer.expert.max_steps=1",
        "trainer.expert.per_device_train_batch_size=2",
        "trainer.expert.disable_tqdm=true", "trainer.expert.save_steps=1", "trainer.expert.learning_rate=1e-2"]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("persona-data") / "math.jsonl"
    augment_math(PROBLEMS, build_persona_bank(12, seed=0), Teacher(), out, k1=2, k2=2, progress=False)
    return out


def compose_cfg(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@pytest.mark.parametrize("mode, saved", [("lora", "adapter_model.safetensors"), ("full", "model.safetensors"),
                                         ("personafuse", "router.safetensors")])
def test_sft_modes_train_save_and_reload(tiny_model_dir, sft_data, tmp_path, mode, saved):
    cfg = compose_cfg("persona_sft", [f"model.path={tiny_model_dir}", f"run_dir={tmp_path}", f"sft.mode={mode}",
                                      f"sft.data={sft_data}", *TINY])
    run = Run(cfg)
    model, tokenizer = load_model(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    target = run_sft(cfg, run, model, tokenizer)
    assert (target / saved).is_file()
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "sft").glob("checkpoint-*")) == ["checkpoint-1"]
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(before[n], p)]
    assert bool(changed) == (mode == "full"), changed  # adapters leave the base weights alone

    reloaded, tok = load_for_eval(cfg.model, target)
    ids = tok.apply_chat_template([{"role": "user", "content": "2 + 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert torch.isfinite(reloaded(**ids).logits).all()
    assert run_sft(cfg, run, *load_model(cfg)) == target  # resume: a finished result is reused


def test_sft_trains_on_the_completion_only(tiny_model_dir, sft_data, tmp_path):
    from datasets import Dataset
    from trl import SFTTrainer

    from personafuse.data.persona_math import math_sft_rows

    cfg = compose_cfg("persona_sft", [f"model.path={tiny_model_dir}", f"run_dir={tmp_path}", *TINY])
    model, tokenizer = load_model(cfg)
    args = Run(cfg).trainer_args(cfg.trainer.expert, tmp_path / "x")
    assert args.completion_only_loss
    rows = math_sft_rows(sft_data)[:2]
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    for labels, row in zip(batch["labels"], rows, strict=True):
        supervised = tokenizer.decode(labels[labels != -100])
        assert row["completion"][0]["content"] in supervised and "careful math tutor" not in supervised


class Scripted:
    def __init__(self, replies):
        self.replies, self.calls = replies, []

    def generate(self, conversations, **sampling):
        self.calls.append(sampling)
        return [self.replies[c[-1]["content"]] for c in conversations]


def test_evaluate_math_scores_and_intervals():
    problems = [MathProblem(f"q{i}", f"question {i}", f"#### {i}") for i in range(10)]
    replies = {f"question {i}": f"... so \\boxed{{{i if i < 7 else i + 1}}}" for i in range(10)}
    gen = Scripted(replies)
    result = evaluate_math(gen, problems, batch_size=4, progress=False)
    assert (result.correct, result.total, result.accuracy) == (7, 10, 0.7)
    assert (result.ci_low, result.ci_high) == pytest.approx((0.3968, 0.8922), abs=1e-4)  # Wilson, 95 %
    assert all(c["temperature"] == 0 for c in gen.calls) and len(gen.calls) == 3
    assert [r["correct"] for r in result.rows] == [True] * 7 + [False] * 3 and result.rows[9]["predicted"] == "10"
    assert wilson_interval(0, 20)[0] == pytest.approx(0, abs=1e-12) and wilson_interval(20, 20)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_eval_command_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    cfg = compose_cfg("eval_math", [f"model.path={tiny_model_dir}", f"out_dir={tmp_path}", "limit=3",
                                    "max_new_tokens=4"])
    model, tokenizer = load_for_eval(cfg.model, cfg.checkpoint)
    result = run_eval(model, tokenizer, cfg.data, Path(cfg.out_dir), cfg.limit, cfg.batch_size, cfg.max_new_tokens)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["total"] == 3 == result.total and 0 <= summary["ci_low"] <= summary["ci_high"] <= 1
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 3
    assert "Wilson CI" in capsys.readouterr().out


def test_bundled_math_seed_is_well_formed():
    from personafuse.answers import is_correct
    from personafuse.data.persona_math import bundled_math_path

    problems = load_problems(bundled_math_path())
    assert len(problems) == 20 and len({p.id for p in problems}) == 20
    for p in problems:
        assert is_correct(p.answer, p.reference)  # the worked solution's own answer checks out
