"""Exports that run without PersonaFuse: merged checkpoints and blended PEFT adapters.

A *blend* is one fixed gate vector: from trait activations, a named preset (``conf/presets/*.yaml``),
explicit gates, or what the router picks for a given context. Merging folds
``scaling * sum_k g_k B_k A_k`` into each base weight (in fp32, then cast), so plain ``transformers``
and vLLM load the result; the blended adapter is the exact rank ``K*r`` concatenation of the gated
experts, for multi-LoRA servers.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import yaml
from huggingface_hub import save_torch_state_dict
from safetensors.torch import save_file
from transformers.pytorch_utils import Conv1D

from personafuse.base_models import DTYPES
from personafuse.bnb import dequantized_weight, quantized_layer_class
from personafuse.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, atomic_dir, peft_key
from personafuse.layer import MoELoraLinear
from personafuse.shipped import conf_dir

BLEND_FILE = "personafuse_blend.json"
# Not a Hydra config group (conf/preset/ would be): recipes/export.py takes ``preset=<name>`` as a plain key.
# A user's own conf/presets in the working directory comes first, then the shipped ones.
PRESET_DIRS = (Path("conf/presets"), conf_dir() / "presets")


class ExportError(ValueError):
    """An export request that cannot be honoured as asked."""


def load_preset(name: str, search_dirs: Sequence[Path] = PRESET_DIRS) -> dict:
    """A preset's YAML (``activations`` per trait, optional ``description``), found by name or path."""
    candidates = [Path(name)] if name.endswith((".yaml", ".yml")) else [d / f"{name}.yaml" for d in search_dirs]
    for path in candidates:
        if path.is_file():
            preset = yaml.safe_load(path.read_text())
            if not isinstance(preset, dict) or "activations" not in preset:
                raise ExportError(f"{path}: a preset needs an 'activations' mapping of trait -> value in [-1, 1]")
            return {"name": Path(path).stem, **preset}
    known = sorted({p.stem for d in search_dirs if d.is_dir() for p in d.glob("*.yaml")})
    raise ExportError(f"unknown preset {name!r}; known presets: {known}")


def activation_vector(traits, activations: Mapping[str, float] | Sequence[float]) -> torch.Tensor:
    """Trait activations as a validated tensor in trait order."""
    if isinstance(activations, Mapping):
        unknown = sorted(set(activations) - set(traits.traits))
        if unknown:
            raise ExportError(f"unknown trait(s) {unknown}; traits are {list(traits.traits)}")
        activations = [float(activations.get(t, 0.0)) for t in traits.traits]
    vector = torch.tensor(list(activations), dtype=torch.float32)
    if vector.shape != (len(traits.traits),):
        raise ExportError(f"expected {len(traits.traits)} trait activations {list(traits.traits)}, got {vector.numel()}")
    if not torch.isfinite(vector).all() or vector.abs().max() > 1:
        raise ExportError(f"trait activations must be finite and in [-1, 1], got {vector.tolist()}")
    return vector


def blend_gates(pf, *, activations=None, preset: str | None = None, gates=None, context=None,
                temperature: float = 0.25) -> torch.Tensor:
    """Exactly one blend source -> a gate vector ``[K]``.

    ``context`` is a chat (list of messages) or a string (one user turn); the router decides.
    """
    given = [x is not None for x in (activations, preset, gates, context)]
    if sum(given) != 1:
        raise ExportError("give exactly one of activations, preset, gates or context")
    if preset is not None:
        activations = load_preset(preset)["activations"]
    if activations is not None:
        return pf.trait_set.activations_to_gate_targets(activation_vector(pf.trait_set, activations), temperature)
    if gates is not None:
        vector = pf.gate_vector(gates)
        if vector.dim() != 1:
            raise ExportError(f"a blend is one gate vector of {pf.trait_set.num_experts}, got shape {tuple(vector.shape)}")
        if vector.sum() <= 0:
            # every expert off: the export would be the base model under a persona's name
            raise ExportError(f"the gates are all zero, so the blend would switch every expert off; give at least one "
                              f"positive gate ({list(pf.expert_names)})")
        return vector
    return pf.route_context(context)


def merged_delta(layer: MoELoraLinear, gates: torch.Tensor) -> torch.Tensor:
    """``scaling * sum_k g_k B_k A_k`` as one ``[out, in]`` fp32 matrix."""
    block = (gates.float().to(layer.lora_B.device) * layer.scaling).repeat_interleave(layer.r)
    return (layer.lora_B.float() * block) @ layer.lora_A.float()


def _base_weight(base: torch.nn.Module) -> torch.Tensor:
    """fp32 weight in ``[out, in]`` orientation for Linear, Conv1D and bitsandbytes layers."""
    if quantized_layer_class(base) is not None:
        return dequantized_weight(base)
    weight = base.weight.detach().float()
    return weight.T if isinstance(base, Conv1D) else weight


def merged_state_dict(pf, gates: torch.Tensor, dtype: torch.dtype, dequantize: bool) -> dict[str, torch.Tensor]:
    """The base model's state dict with the blend folded in; quantized layers dequantized."""
    model = pf.model
    quantized = [n for n, m in model.named_modules() if quantized_layer_class(m) is not None]
    if quantized and not dequantize:
        raise ExportError(
            f"the base model is quantized (bitsandbytes, e.g. {quantized[0]}); merging into quantized weights would "
            f"lose the experts' precision. Pass dequantize=True to dequantize, merge and save in bf16/fp16")
    state, seen, done = {}, set(), []
    for name, module in model.named_modules():
        if any(name == d or name.startswith(d + ".") for d in done):
            continue
        prefix = f"{name}." if name else ""
        if name == "personafuse_routing":
            done.append(name)
            continue
        if isinstance(module, MoELoraLinear) or quantized_layer_class(module) is not None:
            base = module.base_layer if isinstance(module, MoELoraLinear) else module
            weight = _base_weight(base)
            if isinstance(module, MoELoraLinear):
                weight = weight + merged_delta(module, gates)
            state[prefix + "weight"] = (weight.T if isinstance(base, Conv1D) else weight).contiguous()
            if getattr(base, "bias", None) is not None:
                state[prefix + "bias"] = base.bias.detach()
            done.append(name)
            continue
        tensors = list(module._parameters.items()) + [
            (k, v) for k, v in module._buffers.items() if k not in module._non_persistent_buffers_set]
        for key, tensor in tensors:
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                state[prefix + key] = tensor.detach()
    return {k: (v.to(dtype) if v.is_floating_point() else v).cpu().contiguous() for k, v in state.items()}


def _model_card(pf, gates: torch.Tensor, label: str, kind: str) -> str:
    traits = pf.trait_set
    activations = traits.gates_to_activations(gates.float())
    gate_rows = "\n".join(f"| {n} | {g:.4f} |" for n, g in zip(traits.expert_names, gates.tolist(), strict=True))
    trait_rows = "\n".join(f"| {t} | {a:+.3f} |" for t, a in zip(traits.traits, activations.tolist(), strict=True))
    base = getattr(pf.model.config, "_name_or_path", None) or "unknown"
    return f"""---
base_model: {base}
library_name: {"transformers" if kind == "merged" else "peft"}
tags: [personafuse, persona, big-five]
---
# PersonaFuse {kind} export: {label}

Base model: `{base}` (fingerprint `{pf.base_fingerprint}`). PersonaFuse {len(traits.expert_names)} experts
(r={pf.persona_config.r}, alpha={pf.persona_config.alpha}) on {sorted(pf.target_modules)}, blended with fixed gates.
This directory needs no PersonaFuse to load.

| trait | activation |
| --- | --- |
{trait_rows}

| expert | gate |
| --- | --- |
{gate_rows}
"""


def _sources(pf) -> tuple[Path, ...]:
    """What an export is made from and so must not overwrite: the bundle the stack was loaded from."""
    return (pf.source_dir,) if pf.source_dir is not None else ()


def _write_blend(directory: Path, pf, gates: torch.Tensor, label: str) -> None:
    """The blend an export holds; also its marker, so ``overwrite`` replaces only an earlier export."""
    (directory / BLEND_FILE).write_text(json.dumps(
        {"label": label, "gates": dict(zip(pf.expert_names, gates.tolist(), strict=True))}, indent=2))


def export_merged(pf, out_dir: str | Path, gates: torch.Tensor, *, dtype: str = "float32", dequantize: bool = False,
                  overwrite: bool = False, max_shard_size: str | int = "2GB", label: str = "custom blend") -> Path:
    """A standard Hugging Face model directory with the blend merged in (sharded safetensors + index)."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    gates = pf.gate_vector(gates)
    state = merged_state_dict(pf, gates, DTYPES[dtype], dequantize)
    config = copy.deepcopy(pf.model.config)
    text_config = config.get_text_config()
    for key in pf.declared_config_keys:
        if hasattr(text_config, key):
            delattr(text_config, key)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = DTYPES[dtype]
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite, marker=BLEND_FILE, protect=_sources(pf)) as tmp:
        save_torch_state_dict(state, tmp, max_shard_size=max_shard_size)
        config.save_pretrained(tmp)
        if getattr(pf.model, "generation_config", None) is not None:
            pf.model.generation_config.save_pretrained(tmp)
        if pf.tokenizer is not None:
            pf.tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(_model_card(pf, gates, label, "merged"))
        _write_blend(tmp, pf, gates, label)
    return out_dir


def export_blended_adapter(pf, out_dir: str | Path, gates: torch.Tensor, *, overwrite: bool = False,
                           label: str = "custom blend") -> Path:
    """One PEFT LoRA of rank ``K*r`` equal to the gated stack: A stacked, B scaled per block by its gate."""
    from peft import LoraConfig

    gates = pf.gate_vector(gates)
    cfg = pf.persona_config
    K = pf.trait_set.num_experts
    tensors = {}
    for name, layer in pf.moe_layers.items():
        block = gates.to(layer.lora_B.device).repeat_interleave(layer.r)
        tensors[peft_key(name, "A")] = layer.lora_A.detach().float().cpu().contiguous()
        tensors[peft_key(name, "B")] = (layer.lora_B.detach().float() * block).cpu().contiguous()
    conv = any(isinstance(layer.base_layer, Conv1D) for layer in pf.moe_layers.values())
    lora = LoraConfig(r=K * cfg.r, lora_alpha=cfg.alpha * K, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=sorted(pf.target_modules), fan_in_fan_out=conv,
                      base_model_name_or_path=getattr(pf.model.config, "_name_or_path", None) or None)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite, marker=BLEND_FILE, protect=_sources(pf)) as tmp:
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        config = lora.to_dict()
        config["target_modules"] = sorted(pf.target_modules)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, default=list))
        (tmp / "README.md").write_text(_model_card(pf, gates, label, "adapter"))
        _write_blend(tmp, pf, gates, label)
    return out_dir
