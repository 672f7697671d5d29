"""APC-DPO on tiny models: one DPO step trains exactly the chosen part with the aux loss; the recipe
end to end (discriminator distillation, pairs, DPO, bundle) and its resume."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from personafuse import PersonaFuseConfig, PersonaFuseModel
from personafuse.apc.dpo import PersonaDPOTrainer
from tests.apc_tiny import tiny_bert_classifier
from tests.tiny import make_tiny_tokenizer
from tests.tiny_models import randomize_experts, tiny_llama

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "recipes") not in sys.path:
    sys.path.insert(0, str(REPO / "recipes"))


def test_one_dpo_step_trains_only_the_experts_and_adds_aux_loss(tmp_path):
    from datasets import Dataset
    from trl import DPOConfig

    tok = make_tiny_tokenizer()
    base = tiny_llama(0, layers=2)
    base.resize_token_embeddings(len(tok))
    pf = PersonaFuseModel.from_base(base, PersonaFuseConfig(r=2, alpha=4.0, dropout=0.0), tokenizer=tok)
    randomize_experts(pf)
    pf.set_trainable("experts")
    before = {n: p.detach().clone() for n, p in pf.named_parameters()}
    rows = [{"prompt": [{"role": "user", "content": f"question {i}"}],
             "chosen": [{"role": "assistant", "content": "a faithful answer"}],
             "rejected": [{"role": "assistant", "content": "nope"}]} for i in range(2)]
    args = DPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-2, beta=0.1,
                     precompute_ref_log_probs=True, use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                     logging_steps=1, seed=0)
    trainer = PersonaDPOTrainer(model=pf, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    assert trainer.aux_loss_enabled and trainer.ref_model is None
    trainer.train()
    changed = {n for n, p in pf.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all("lora_" in n for n in changed), changed
    assert not any("router" in n for n in changed)
    assert any(log.get("aux_loss", 0) > 0 for log in trainer.state.log_history)


def test_apc_dpo_recipe_end_to_end_and_resume(tiny_model_dir, tmp_path):
    from apc_dpo import run_apc_dpo
    from common import Run, load_model
    from hydra import compose, initialize_config_dir
    from train_discriminator import run_discriminators

    run_dir = tmp_path / "run"
    init = tiny_bert_classifier(tmp_path / "encoder", 2)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        dcfg = compose("train_discriminator", [f"run_dir={run_dir}", f"discriminator.init={init}",
                                               "trainer.discriminator.num_train_epochs=1",
                                               "trainer.discriminator.per_device_train_batch_size=32"])
        cfg = compose("apc_dpo", [f"model.path={tiny_model_dir}", f"run_dir={run_dir}", "bundle_dir=null",
                                  "experts.r=2", "experts.alpha=4", "apc.character=Lena Sato", "apc.max_train_queries=3",
                                  "apc.max_heldout_queries=2", "apc.num_samples=2", "apc.margin=0.0",
                                  "apc.sampling.max_new_tokens=8", "apc.eval_max_new_tokens=8", "apc.trainable=both",
                                  "trainer.dpo.max_steps=2", "trainer.dpo.max_length=1024"])
    report = run_discriminators(dcfg, Run(dcfg))
    assert 0 <= report["relevance"]["accuracy"] <= 1 and (run_dir / "discriminators" / "nli" / "config.json").is_file()

    model, tokenizer = load_model(cfg)
    pf, report = run_apc_dpo(cfg, Run(cfg), model, tokenizer)
    pairs = [json.loads(line) for line in (run_dir / "apc" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 3 and report["pairs"] == sum(p["kept"] for p in pairs) > 0
    assert all(len(p["responses"]) == 2 for p in pairs)
    assert {"mean_apc_before", "mean_apc_after"} <= set(report)
    saved = PersonaFuseModel.from_pretrained(load_model(cfg)[0], run_dir / "apc_bundle", tokenizer=tokenizer)
    layer = next(iter(saved.moe_layers.values()))
    assert layer.lora_B.abs().sum() > 0  # fresh experts start at B = 0: DPO moved them
    assert (run_dir / "checkpoints" / "apc_dpo" / "checkpoint-2").is_dir()

    mtime = (run_dir / "apc" / "pairs.jsonl").stat().st_mtime_ns
    model, tokenizer = load_model(cfg)
    _, again = run_apc_dpo(cfg, Run(cfg), model, tokenizer)  # resumes: no new samples, training already done
    assert again["pairs"] == report["pairs"]
    assert len((run_dir / "apc" / "pairs.jsonl").read_text().splitlines()) == 3
    assert (run_dir / "apc" / "pairs.jsonl").stat().st_mtime_ns >= mtime
