import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from personafuse import PersonaFuseConfig, PersonaFuseModel
from personafuse.export import (
    ExportError,
    blend_gates,
    export_blended_adapter,
    export_merged,
    load_preset,
    merged_state_dict,
)
from tests.test_model import CFG, ids, make
from tests.tiny import make_tiny_tokenizer
from tests.tiny_models import randomize_experts, repack_4bit_for_cpu, tiny_llama, tiny_llama_4bit


def _logits(pf, gates):
    with torch.no_grad(), pf.fixed_gates(gates):
        return pf(input_ids=ids()).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merged_equals_unmerged(family, tmp_path):
    pf = make(family)
    gates = blend_gates(pf, preset="counselor")
    out = export_merged(pf, tmp_path / "merged", gates)
    merged = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert (merged(input_ids=ids()).logits - _logits(pf, gates)).abs().max() <= 1e-4
    assert not hasattr(merged.config, "num_experts") and not hasattr(merged.config, "output_router_logits")


def test_merged_dir_loads_without_personafuse(tmp_path):
    pf = make()
    gates = torch.softmax(torch.randn(10, generator=torch.Generator().manual_seed(3)), -1)
    out = export_merged(pf, tmp_path / "merged", gates, label="test blend")
    torch.save(ids(), tmp_path / "ids.pt")
    code = f"""
import sys
sys.modules["personafuse"] = None  # any import of personafuse now fails
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(out)!r})
ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, {str(tmp_path / 'logits.pt')!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=300)
    fresh = torch.load(tmp_path / "logits.pt", weights_only=True)
    assert (fresh - _logits(pf, gates)).abs().max() <= 1e-4
    card = (out / "README.md").read_text()
    assert "test blend" in card and "agreeableness" in card


def test_shards_and_index_are_consistent(tmp_path):
    pf = make()
    out = export_merged(pf, tmp_path / "merged", blend_gates(pf, preset="tutor"), max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1
    keys = set()
    for name in files:
        keys |= set(load_file(out / name))
    assert keys == set(index["weight_map"])
    assert not any("lora" in k or "personafuse" in k or "base_layer" in k for k in keys)


def test_blended_adapter_through_plain_peft(tmp_path):
    pf = make()
    gates = blend_gates(pf, activations={"extraversion": 0.8, "neuroticism": -0.5})
    out = export_blended_adapter(pf, tmp_path / "adapter", gates)
    peft_model = PeftModel.from_pretrained(tiny_llama(0), out)
    with torch.no_grad():
        assert (peft_model(input_ids=ids()).logits - _logits(pf, gates)).abs().max() <= 1e-5


def test_one_hot_blend_equals_single_expert(tmp_path):
    pf = make()
    pf.save_pretrained(tmp_path / "bundle")
    one_hot = blend_gates(pf, gates={"conscientiousness_low": 1.0})
    merged = AutoModelForCausalLM.from_pretrained(export_merged(pf, tmp_path / "merged", one_hot))
    expert = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "bundle" / "experts" / "conscientiousness_low")
    with torch.no_grad():
        assert (merged(input_ids=ids()).logits - expert(input_ids=ids()).logits).abs().max() <= 1e-4


def test_context_blend_uses_the_router():
    tok = make_tiny_tokenizer()
    base = tiny_llama()
    base.resize_token_embeddings(len(tok))
    pf = PersonaFuseModel.from_base(base, PersonaFuseConfig(**CFG), tokenizer=tok)
    pf.routing.router_calls = 0
    gates = blend_gates(pf, context="hello there friend")
    assert gates.shape == (10,) and pf.routing.router_calls == 1
    torch.testing.assert_close(gates.sum(), torch.tensor(1.0))


def test_refusals(tmp_path):
    pf = make()
    gates = blend_gates(pf, preset="counselor")
    export_merged(pf, tmp_path / "merged", gates)
    with pytest.raises(FileExistsError, match="overwrite"):
        export_merged(pf, tmp_path / "merged", gates)
    export_merged(pf, tmp_path / "merged", gates, overwrite=True)
    with pytest.raises(ExportError, match="unknown preset 'pirate'.*counselor"):
        load_preset("pirate")
    with pytest.raises(ExportError, match="exactly one"):
        blend_gates(pf, preset="tutor", gates=torch.ones(10))
    with pytest.raises(ValueError, match="10 entries"):
        export_merged(pf, tmp_path / "bad", torch.ones(7))
    with pytest.raises(ValueError, match="non-negative"):
        export_blended_adapter(pf, tmp_path / "bad", -torch.ones(10))
    with pytest.raises(ValueError, match="NaN"):
        export_merged(pf, tmp_path / "bad", torch.full((10,), float("nan")))
    with pytest.raises(ExportError, match=r"in \[-1, 1\]"):
        blend_gates(pf, activations={"openness": 2.0})
    with pytest.raises(ExportError, match="unknown trait"):
        blend_gates(pf, activations={"humour": 0.5})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


@pytest.mark.parametrize("double_quant", [False, True])
def test_quantized_base_needs_dequantize(double_quant, tmp_path):
    pytest.importorskip("bitsandbytes")
    base = tiny_llama_4bit(tmp_path / "base", double_quant)
    pf = PersonaFuseModel.from_base(base, PersonaFuseConfig(**CFG))
    randomize_experts(pf)
    gates = blend_gates(pf, preset="counselor")
    with pytest.raises(ExportError, match="dequantize=True"):
        export_merged(pf, tmp_path / "merged", gates)
    out = export_merged(pf, tmp_path / "merged", gates, dequantize=True, dtype="bfloat16")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not hasattr(merged.config, "quantization_config")
    with torch.no_grad():
        assert (merged(input_ids=ids()).logits - _logits(pf, gates)).abs().max() < 0.1


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_reads_the_avx512bf16_repacked_layout(double_quant, tmp_path):
    """An AVX512-BF16 CPU repacks 4-bit weights in place at the first eval forward; a later export must
    still merge the same weights (up to the bf16 absmax that layout keeps) and leave the layer packed."""
    pytest.importorskip("bitsandbytes")
    pf = PersonaFuseModel.from_base(tiny_llama_4bit(tmp_path / "base", double_quant), PersonaFuseConfig(**CFG))
    randomize_experts(pf)
    gates = blend_gates(pf, preset="counselor")
    standard = merged_state_dict(pf, gates, torch.float32, dequantize=True)
    repack_4bit_for_cpu(pf.model)
    layer = pf.moe_layers["model.layers.0.self_attn.q_proj"].base_layer
    packed_bytes = layer.weight.data.clone()
    repacked = merged_state_dict(pf, gates, torch.float32, dequantize=True)
    assert layer.weight.quant_state.packing_format_for_cpu and torch.equal(layer.weight.data, packed_bytes)
    assert repacked.keys() == standard.keys()
    for key, weight in standard.items():
        torch.testing.assert_close(repacked[key], weight, rtol=0, atol=float(weight.abs().max()) * 2**-7, msg=key)
