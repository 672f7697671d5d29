"""All poles train in one run, and each example only reaches its own expert."""

from trl import SFTConfig

from personafuse import PersonaFuseConfig, PersonaFuseModel
from personafuse.data import bundled_seed_paths, load_situations
from personafuse.training.experts import expert_dataset, train_experts
from tests.tiny import make_tiny_tokenizer
from tests.tiny_models import tiny_llama


def _stack():
    tok = make_tiny_tokenizer()
    base = tiny_llama()
    base.resize_token_embeddings(len(tok))
    return PersonaFuseModel.from_base(base, PersonaFuseConfig(r=2, alpha=4.0, dropout=0.0), tokenizer=tok), tok


def test_each_example_trains_only_its_own_expert(tmp_path):
    pf, tok = _stack()
    situations = load_situations(bundled_seed_paths()[0])[:6]
    trained = ["openness_high", "neuroticism_low"]
    args = SFTConfig(output_dir=str(tmp_path / "ckpt"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                     use_cpu=True, bf16=False, report_to=[], save_strategy="no", max_length=1024, seed=0,
                     gradient_checkpointing=False)
    pf.set_trainable("experts")
    out = train_experts(pf, tok, situations, trained, args, tmp_path / "experts", resume=False)
    assert sorted(out) == sorted(trained) and all((d / "adapter_config.json").exists() for d in out.values())
    for name in pf.expert_names:
        k = pf.trait_set.index(name)
        moved = sum(layer.expert_weights(k)[1].abs().sum().item() for layer in pf.moe_layers.values())
        assert (moved > 0) == (name in trained), name
    assert pf.config.get_text_config().router_aux_loss_coef == 0.01, "expert SFT must restore the MoE declaration"


def test_expert_dataset_tags_rows_with_gate_index():
    pf, _ = _stack()
    situations = load_situations(bundled_seed_paths()[0])[:3]
    rows = expert_dataset(pf, situations, ["extraversion_low", "agreeableness_high"], seed=0)
    assert rows["expert_index"] == [5, 6, 5, 6, 5, 6]
    replies = {s.responses["extraversion_low"] for s in situations}
    assert {r["completion"][0]["content"] for r in rows if r["expert_index"] == 5} == replies
    again = expert_dataset(pf, situations, ["extraversion_low", "agreeableness_high"], seed=0)
    assert again["completion"] == rows["completion"]
