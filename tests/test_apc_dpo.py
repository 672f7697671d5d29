"""APC-DPO on tiny models: one DPO step trains exactly the chosen part with the aux loss; the recipe
end to end (discriminator distillation, pairs, DPO, bundle) and its resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from personafuse import PersonaFuseConfig, PersonaFuseModel
from personafuse.apc.dpo import PersonaDPOTrainer
from tests.apc_tiny import tiny_bert_classifier
from tests.tiny import make_tiny_tokenizer
from tests.tiny_models import randomize_experts, tiny_llama

REPO = Path(__file__).resolve().parents[1]


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
    from hydra import compose, initialize_config_dir

    from personafuse.workflows.apc_dpo import load_stack, run_apc_dpo
    from personafuse.workflows.discriminators import run_discriminators
    from personafuse.workflows.run import Run, load_model

    run_dir = tmp_path / "run"
    init = tiny_bert_classifier(tmp_path / "encoder", 2)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        dcfg = compose("train_discriminator", [f"run_dir={run_dir}", f"discriminator.init={init}",
                                               "discriminator.architecture=cross_encoder",
                                               "trainer.discriminator.num_train_epochs=1",
                                               "trainer.discriminator.per_device_train_batch_size=32"])
        cfg = compose("apc_dpo", [f"model.path={tiny_model_dir}", f"run_dir={run_dir}", "bundle_dir=null",
                                  "experts.r=2", "experts.alpha=4", "apc.character=[Lena Sato,Tobias Wren]",
                                  "apc.max_train_queries=2", "apc.max_heldout_queries=1", "apc.num_samples=2", "apc.margin=0.0",
                                  "apc.sampling.max_new_tokens=8", "apc.eval_max_new_tokens=8", "apc.trainable=both",
                                  "trainer.dpo.max_steps=2", "trainer.dpo.max_length=1024"])
    report = run_discriminators(dcfg, Run(dcfg))
    assert 0 <= report["relevance"]["accuracy"] <= 1 and (run_dir / "discriminators" / "nli" / "config.json").is_file()
    before, after = (load_file(next(Path(d).glob("*.safetensors"))) for d in (init, run_dir / "discriminators" / "nli"))
    embeddings = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(before[embeddings], after[embeddings])  # discriminator.freeze_embeddings=true
    assert not torch.equal(before["bert.encoder.layer.0.attention.self.query.weight"],
                           after["bert.encoder.layer.0.attention.self.query.weight"])

    model, tokenizer = load_model(cfg)
    pf, report = run_apc_dpo(cfg, Run(cfg), load_stack(cfg, model, tokenizer), tokenizer)
    pairs = [json.loads(line) for line in (run_dir / "apc" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 4 and report["pairs"] == sum(p["kept"] for p in pairs) > 0
    assert all(len(p["responses"]) == 2 for p in pairs)
    assert {p["character"] for p in pairs} == {"Lena Sato", "Tobias Wren"}  # pooled characters, one run
    assert report["heldout_queries"] == 2 and set(report["per_character"]) == {"Lena Sato", "Tobias Wren"}
    change = report["change"]
    assert change["delta"] == pytest.approx(report["mean_apc_after"] - report["mean_apc_before"])
    assert change["ci_low"] <= change["delta"] <= change["ci_high"]
    saved = PersonaFuseModel.from_pretrained(load_model(cfg)[0], run_dir / "apc_bundle", tokenizer=tokenizer)
    layer = next(iter(saved.moe_layers.values()))
    assert layer.lora_B.abs().sum() > 0  # fresh experts start at B = 0: DPO moved them
    assert (run_dir / "checkpoints" / "apc_dpo" / "checkpoint-2").is_dir()

    mtime = (run_dir / "apc" / "pairs.jsonl").stat().st_mtime_ns
    model, tokenizer = load_model(cfg)
    _, again = run_apc_dpo(cfg, Run(cfg), load_stack(cfg, model, tokenizer), tokenizer)  # resumes: no new samples, training already done
    assert again["pairs"] == report["pairs"]
    assert len((run_dir / "apc" / "pairs.jsonl").read_text().splitlines()) == 4
    assert (run_dir / "apc" / "pairs.jsonl").stat().st_mtime_ns >= mtime


def test_demo_config_runs_apc_with_per_kind_discriminator_settings(tmp_path):
    """`make demo` ends with APC-DPO; each discriminator kind gets its own trainer overrides."""
    from hydra import compose, initialize_config_dir

    from personafuse.workflows.discriminators import trainer_block
    from personafuse.workflows.run import Run

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("demo", [f"run_dir={tmp_path}"])
    assert cfg.apc_dpo and cfg.apc.discriminators.nli == f"{tmp_path}/discriminators/nli"
    assert cfg.discriminator.architecture == "frozen_head"
    run = Run(cfg)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("demo", [f"run_dir={tmp_path}", "discriminator.architecture=cross_encoder",
                               "+discriminator.trainer.relevance.learning_rate=2e-4"])
    args = {kind: run.trainer_args(trainer_block(cfg, kind), tmp_path) for kind in cfg.discriminator.kinds}
    assert args["relevance"].learning_rate == 2e-4 != args["nli"].learning_rate


def test_apc_dpo_refuses_a_base_partitioned_at_load(tmp_path):
    """Rank 0 alone samples before any trainer exists, which a ZeRO-3 partitioned base cannot run: a clear error
    instead of a crash in the embedding (or a hang of the other ranks)."""
    from hydra import compose, initialize_config_dir

    from personafuse.workflows.apc_dpo import run_apc_dpo

    pf = PersonaFuseModel.from_base(tiny_llama(0, layers=1), PersonaFuseConfig(r=2, alpha=4.0, dropout=0.0))
    weight = pf.model.get_input_embeddings().weight  # marked the way DeepSpeed marks a partitioned parameter
    weight.ds_id, weight.ds_numel, weight.ds_tensor = 0, weight.numel(), weight.detach().flatten()[: weight.numel() // 2]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("apc_dpo", [f"run_dir={tmp_path}"])
    with pytest.raises(ValueError, match="ZeRO-3 partitioned at load cannot run; launch it with launch/deepspeed_zero2"):
        run_apc_dpo(cfg, None, pf, None)


def prepared_discriminators(tmp_path: Path) -> Path:
    """A run folder with tiny distilled discriminators in ``discriminators/``; returns the run folder."""
    from hydra import compose, initialize_config_dir

    from personafuse.workflows.discriminators import run_discriminators
    from personafuse.workflows.run import Run

    run_dir = tmp_path / "run"
    init = tiny_bert_classifier(tmp_path / "encoder", 2)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        dcfg = compose("train_discriminator", [f"run_dir={run_dir}", f"discriminator.init={init}",
                                               "trainer.discriminator.num_train_epochs=1"])
    run_discriminators(dcfg, Run(dcfg))
    return run_dir


def two_process_apc_dpo(launch: list[str], env: dict, tiny_model_dir: Path, run_dir: Path) -> str:
    """APC-DPO on two CPU processes; asserts what every launch must give and returns the output."""
    from tests.test_recipes import run_cmd, tail

    out = run_cmd([*launch, "recipes/apc_dpo.py", "launcher=cpu_gloo", f"model.path={tiny_model_dir}",
                   f"run_dir={run_dir}", "bundle_dir=null", "experts.r=2", "experts.alpha=4", "apc.character=Tobias Wren",
                   "apc.max_train_queries=2", "apc.max_heldout_queries=1", "apc.num_samples=2", "apc.margin=0.0",
                   "apc.sampling.max_new_tokens=8", "apc.eval_max_new_tokens=8", "trainer.dpo.max_steps=2",
                   "trainer.dpo.per_device_train_batch_size=1", "trainer.dpo.max_length=1024"], env=env)
    assert out.count("mean APC before") == 2 and "mean APC before DPO" in out, tail(out)  # rank 0 logs only
    pairs = [json.loads(line) for line in (run_dir / "apc" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 2, pairs  # written once, by rank 0
    assert (run_dir / "checkpoints" / "apc_dpo" / "checkpoint-2").is_dir(), tail(out)
    assert (run_dir / "apc_bundle" / "personafuse_config.json").is_file()
    assert (run_dir / "apc_report.json").is_file()
    return out


@pytest.mark.slow
def test_apc_dpo_two_processes_ddp(tiny_model_dir, tmp_path):
    """Under a 2-process gloo launch, rank 0 alone samples and writes the pairs, both ranks train (DDP)."""
    from tests.test_recipes import NOT_DDP, accelerate_cmd, subprocess_env, tail

    run_dir = prepared_discriminators(tmp_path)
    out = two_process_apc_dpo(accelerate_cmd("--multi_gpu", "--num_processes", "2"),
                              subprocess_env(ACCELERATE_USE_CPU="1"), tiny_model_dir, run_dir)
    assert NOT_DDP not in out, tail(out)
    checkpoint = run_dir / "checkpoints" / "apc_dpo" / "checkpoint-2"
    assert sorted(p.name for p in checkpoint.glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]


@pytest.mark.slow
def test_apc_dpo_two_processes_deepspeed_zero2(tiny_model_dir, tmp_path):
    """The same under launch/deepspeed_zero2.yaml: the reference log-probs are precomputed through a DeepSpeed
    inference engine, and the checkpoint holds the optimizer state sharded over both ranks."""
    from tests.test_recipes import accelerate_cmd, subprocess_env

    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install '.[distributed]')")
    run_dir = prepared_discriminators(tmp_path)
    two_process_apc_dpo(accelerate_cmd("--config_file", "launch/deepspeed_zero2.yaml", "--num_processes", "2"),
                        subprocess_env(ACCELERATE_USE_DEEPSPEED="true"), tiny_model_dir, run_dir)
    step_dir = run_dir / "checkpoints" / "apc_dpo" / "checkpoint-2" / "global_step2"
    assert sorted(p.name for p in step_dir.glob("zero_pp_rank_*_optim_states.pt")) == \
        ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_select_personas_pools_names_lists_and_all():
    from personafuse.apc import bundled_data_path
    from personafuse.apc.personas import load_personas, select_personas
    from personafuse.data.schema import DataError

    path = bundled_data_path("personas.yaml")
    assert [p.character for p in select_personas(path, "Lena Sato")] == ["Lena Sato"]
    assert [p.character for p in select_personas(path, ["Tobias Wren", "Lena Sato"])] == ["Tobias Wren", "Lena Sato"]
    assert [p.character for p in select_personas(path, "all")] == list(load_personas(path))
    with pytest.raises(DataError, match="no character 'Nobody'.*apc.character"):
        select_personas(path, ["Lena Sato", "Nobody"])


def test_apc_comparison_pairs_the_same_queries_per_character():
    from personafuse.apc.dpo import PersonaQuery, apc_comparison
    from personafuse.apc.personas import Persona
    from personafuse.apc.score import APCResult

    a, b = Persona("A", ("x",)), Persona("B", ("y",))
    items = [PersonaQuery(a, "q1", []), PersonaQuery(a, "q2", []), PersonaQuery(b, "q1", [])]
    result = lambda total: APCResult(query="q", response="r", total=total, statements=())  # noqa: E731
    out = apc_comparison(items, [result(1.0), result(2.0), result(0.0)], [result(2.0), result(2.0), result(1.0)])
    assert out["heldout_queries"] == 3 and out["change"]["delta"] == pytest.approx(2 / 3)
    assert out["per_character"] == {"A": {"n": 2, "before": 1.5, "after": 2.0}, "B": {"n": 1, "before": 0.0, "after": 1.0}}
    assert 0 <= out["change"]["ci_low"] <= out["change"]["ci_high"] <= 1
