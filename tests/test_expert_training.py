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


def test_contrast_dataset_pairs_each_reply_with_the_opposite_pole_of_the_same_situation():
    pf, _ = _stack()
    situations = load_situations(bundled_seed_paths()[0])[:3]
    rows = expert_dataset(pf, situations, ["extraversion_low", "agreeableness_high"], seed=0, contrast=True)
    assert rows["opposite_pole"] == [0, 1] * 6 and rows["expert_index"] == [5, 5, 6, 6] * 3
    by_prompt = {s.situation[-1]["content"]: s for s in situations}
    for own, other in zip(rows.select(range(0, 12, 2)), rows.select(range(1, 12, 2)), strict=True):
        assert own["prompt"] == other["prompt"]
        s = by_prompt[own["prompt"][-1]["content"]]
        pole = pf.expert_names[own["expert_index"]]
        opposite = {"extraversion_low": "extraversion_high", "agreeableness_high": "agreeableness_low"}[pole]
        assert (own["completion"][0]["content"], other["completion"][0]["content"]) == (s.responses[pole], s.responses[opposite])


def _preference_margin(pf, tok, situations, expert: str, opposite: str) -> float:
    """Mean per-token log-likelihood of the expert's own replies minus the opposite pole's, expert at gate 1."""
    import torch

    def mean_log_prob(reply_pole: str) -> float:
        total = 0.0
        for s in situations:
            prompt = tok.apply_chat_template(s.situation, add_generation_prompt=True, tokenize=False)
            start = len(tok(prompt, add_special_tokens=False)["input_ids"])
            ids = tok(prompt + s.responses[reply_pole], add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad(), pf.fixed_gates({expert: 1.0}):
                logits = pf(input_ids=ids).logits[0, start - 1:-1]
            total += logits.log_softmax(-1).gather(-1, ids[0, start:, None]).mean().item()
        return total / len(situations)

    return mean_log_prob(expert) - mean_log_prob(opposite)


def test_pole_contrast_teaches_the_expert_to_prefer_its_pole_over_the_opposite(tmp_path):
    """Same steps and data: the odds-ratio term widens the own-vs-opposite margin beyond what SFT gives."""
    situations = load_situations(bundled_seed_paths()[0])[:4]
    margins = {}
    for weight in (0.0, 4.0):
        pf, tok = _stack()
        args = SFTConfig(output_dir=str(tmp_path / f"ckpt{weight}"), max_steps=8, per_device_train_batch_size=2,
                         learning_rate=2e-2, use_cpu=True, bf16=False, report_to=[], save_strategy="no", max_length=1024,
                         seed=0, gradient_checkpointing=False)
        train_experts(pf, tok, situations, ["extraversion_high"], args, tmp_path / f"experts{weight}", resume=False,
                      pole_contrast=weight)
        margins[weight] = _preference_margin(pf, tok, situations, "extraversion_high", "extraversion_low")
    assert margins[4.0] > 0 and margins[4.0] > margins[0.0] + 0.02, margins  # SFT alone: about -0.005


def test_pole_contrast_needs_an_even_batch(tmp_path):
    import pytest

    pf, tok = _stack()
    args = SFTConfig(output_dir=str(tmp_path / "ckpt"), max_steps=1, per_device_train_batch_size=3, use_cpu=True,
                     bf16=False, report_to=[], save_strategy="no", max_length=1024, gradient_checkpointing=False)
    with pytest.raises(ValueError, match="per_device_train_batch_size must be even"):
        train_experts(pf, tok, load_situations(bundled_seed_paths()[0])[:2], ["extraversion_high"], args,
                      tmp_path / "experts", resume=False, pole_contrast=1.0)
