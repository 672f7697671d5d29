"""Tiny random causal LMs built from a config (no download), one per supported family."""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 96


def tiny_llama(seed: int = 0, layers: int = 4, tie: bool = True, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=tie, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Qwen2ForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, pad_token_id=0,
                     bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


FAMILIES = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}


def randomize_experts(pf, seed: int = 0, std: float = 0.2) -> None:
    """Fresh experts have B = 0 (no effect); tests need experts that change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in pf.moe_layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * std)


def tiny_llama_4bit(directory, double_quant: bool = False):
    """A 4-bit (nf4) tiny Llama that takes the standard bitsandbytes path on every CPU.

    Dimensions are multiples of 64 (the quant block size): the AVX512-BF16 repack fails on smaller layers.
    The repack itself is switched off, so results do not depend on the CPU; ``repack_4bit_for_cpu``
    produces that layout explicitly.
    """
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama(0, layers=2, hidden=64).save_pretrained(directory)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                               bnb_4bit_use_double_quant=double_quant)
    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=quant, device_map="cpu")
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def repack_4bit_for_cpu(model) -> None:
    """What ``Linear4bit.forward`` does in place on an AVX512-BF16 CPU at its first eval, no-grad forward."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = module.weight
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu(weight.data, weight.quant_state)
