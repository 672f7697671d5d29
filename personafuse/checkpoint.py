"""Saving and loading bundles: safetensors only, standard PEFT adapters per expert, atomic writes.

Layout of a bundle directory::

    personafuse_config.json         PersonaFuseConfig, trait set, base-model fingerprint
    router.safetensors              router weights
    experts/<expert>/adapter_config.json + adapter_model.safetensors   (plain PEFT LoRA)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D

from personafuse.config import PersonaFuseConfig

if TYPE_CHECKING:
    from personafuse.model import PersonaFuseModel

FORMAT_VERSION = 1
CONFIG_FILE = "personafuse_config.json"
ROUTER_FILE = "router.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class CheckpointError(ValueError):
    """A bundle or adapter that does not fit the model it is loaded into."""


def fingerprint(model: torch.nn.Module) -> str:
    """Identifies a base model by its shape and a slice of its input embeddings (cheap, device-independent)."""
    cfg = model.config.get_text_config()
    digest = hashlib.sha256()
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"):
        digest.update(f"{key}={getattr(cfg, key, None)};".encode())
    embed = model.get_input_embeddings().weight
    digest.update(embed[:8, :64].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@contextmanager
def atomic_dir(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yields a temp dir beside ``target``; on success it replaces ``target`` in one rename."""
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def peft_key(module_name: str, which: str) -> str:
    return f"base_model.model.{module_name}.lora_{which}.weight"


def _adapter_config(model: PersonaFuseModel) -> dict:
    from peft import LoraConfig

    cfg = model.persona_config
    conv = any(isinstance(layer.base_layer, Conv1D) for layer in model.moe_layers.values())
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=sorted(model.target_modules),
                      bias="none", task_type="CAUSAL_LM", fan_in_fan_out=conv,
                      base_model_name_or_path=getattr(model.model.config, "_name_or_path", None) or None)
    return lora.to_dict()


def _meta(model: PersonaFuseModel) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "config": model.persona_config.to_dict(),
        "trait_set": model.trait_set.to_dict(),
        "base_model": {
            "name_or_path": getattr(model.model.config, "_name_or_path", None),
            "model_type": model.model.config.get_text_config().model_type,
            "fingerprint": model.base_fingerprint,
        },
    }


def write_expert(model: PersonaFuseModel, name: str, expert_dir: Path) -> None:
    """Expert ``name`` as a plain PEFT LoRA adapter directory (plus the base it belongs to)."""
    k = model.trait_set.index(name)
    adapter_config = _adapter_config(model)
    adapter_config.update(peft_type="LORA", task_type="CAUSAL_LM", target_modules=sorted(model.target_modules))
    tensors = {}
    for module_name, layer in model.moe_layers.items():
        A, B = layer.expert_weights(k)
        tensors[peft_key(module_name, "A")] = A.detach().cpu().contiguous()
        tensors[peft_key(module_name, "B")] = B.detach().cpu().contiguous()
    expert_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, expert_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (expert_dir / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, default=list))
    (expert_dir / "personafuse_base.json").write_text(json.dumps(_meta(model)["base_model"], indent=2))


def save_expert(model: PersonaFuseModel, name: str, expert_dir: Path, overwrite: bool = True) -> Path:
    """One expert's adapter directory, written atomically."""
    with atomic_dir(expert_dir, overwrite) as tmp:
        write_expert(model, name, tmp)
    return expert_dir


def save_bundle(model: PersonaFuseModel, path: Path, overwrite: bool) -> Path:
    with atomic_dir(path, overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(_meta(model), indent=2))
        save_file({k: v.detach().cpu().contiguous() for k, v in model.router.state_dict().items()}, tmp / ROUTER_FILE)
        for name in model.expert_names:
            write_expert(model, name, tmp / "experts" / name)
    return path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def load_bundle(cls, model: torch.nn.Module, path: Path, tokenizer, check_base: bool) -> PersonaFuseModel:
    meta = _read_json(path / CONFIG_FILE)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path / CONFIG_FILE}: format_version {meta.get('format_version')} is not {FORMAT_VERSION}")
    expected = meta["base_model"]["fingerprint"]
    if check_base and fingerprint(model) != expected:
        raise CheckpointError(
            f"{path} was trained on base {meta['base_model']['name_or_path']!r} (fingerprint {expected}), "
            f"but the given model has fingerprint {fingerprint(model)}; pass check_base=False to override"
        )
    pf = cls(model, PersonaFuseConfig.from_dict(meta["config"]), tokenizer)
    load_weights(pf, path, check_base)
    return pf


def load_weights(pf: PersonaFuseModel, path: Path, check_base: bool = True) -> None:
    """Router and expert weights of a bundle into an existing stack of the same shape (e.g. on resume)."""
    router_state = load_file(path / ROUTER_FILE)
    missing, unexpected = pf.router.load_state_dict(router_state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path / ROUTER_FILE}: missing {missing}, unexpected {unexpected}")
    for name in pf.expert_names:
        load_expert(pf, name, path / "experts" / name, check_base=check_base)


def load_expert(pf: PersonaFuseModel, name: str, adapter_dir: Path, check_base: bool = True) -> None:
    """Copy a PEFT LoRA adapter into expert slot ``name``; any mismatch is an error before anything is written."""
    k = pf.trait_set.index(name)
    cfg = _read_json(adapter_dir / ADAPTER_CONFIG)
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora"):
        raise CheckpointError(f"{adapter_dir}: only plain LoRA adapters can be experts (peft_type={cfg.get('peft_type')}, use_dora={cfg.get('use_dora')})")
    r = cfg.get("r")
    if r != pf.persona_config.r:
        raise CheckpointError(f"{adapter_dir}: adapter rank r={r} does not match the stack's r={pf.persona_config.r}")
    base_info = adapter_dir / "personafuse_base.json"
    if check_base and base_info.exists() and _read_json(base_info)["fingerprint"] != pf.base_fingerprint:
        raise CheckpointError(f"{adapter_dir}: expert was trained on another base model ({_read_json(base_info)['name_or_path']!r})")
    weights_path = adapter_dir / ADAPTER_WEIGHTS
    if not weights_path.exists():
        raise CheckpointError(f"{weights_path} is missing (only safetensors adapters are loaded)")
    tensors = load_file(weights_path)
    their_scaling = cfg["lora_alpha"] / (r**0.5 if cfg.get("use_rslora") else r)
    rescale = their_scaling / (pf.persona_config.alpha / pf.persona_config.r)
    expected = {peft_key(n, w) for n in pf.moe_layers for w in ("A", "B")}
    keys = {key.replace(".default.weight", ".weight") for key in tensors}
    if keys != expected:
        missing, extra = sorted(expected - keys)[:5], sorted(keys - expected)[:5]
        raise CheckpointError(f"{adapter_dir}: target modules differ from the stack's {pf.target_modules} "
                              f"(missing e.g. {missing}, unexpected e.g. {extra})")
    tensors = {key.replace(".default.weight", ".weight"): v for key, v in tensors.items()}
    updates = []
    for module_name, layer in pf.moe_layers.items():
        A_new, B_new = tensors[peft_key(module_name, "A")], tensors[peft_key(module_name, "B")]
        A, B = layer.expert_weights(k)
        if A_new.shape != A.shape or B_new.shape != B.shape:
            raise CheckpointError(
                f"{adapter_dir}: {module_name} has A {tuple(A_new.shape)}, B {tuple(B_new.shape)} but the base needs "
                f"A {tuple(A.shape)}, B {tuple(B.shape)} (expert from another base model?)")
        updates.append((A, B, A_new, B_new))
    with torch.no_grad():
        for A, B, A_new, B_new in updates:
            A.copy_(A_new.to(A.dtype))
            B.copy_((B_new.float() * rescale).to(B.dtype))
