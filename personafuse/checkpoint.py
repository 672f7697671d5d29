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
import socket
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D

from personafuse.config import PersonaFuseConfig
from personafuse.sharding import gathered

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
    with gathered([embed]):  # a ZeRO-3 partition holds a flat slice: every rank hashes the gathered values
        digest.update(embed[:8, :64].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _hidden(target: Path, kind: str) -> Path:
    """``.name.tmp-HOST-PID`` / ``.name.old-HOST-PID`` beside ``target``: the writer is known, so leftovers of a
    dead one can be told from a live write (PIDs only mean something on their own host)."""
    return target.with_name(f".{target.name}.{kind}-{socket.gethostname()}-{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(target: Path) -> None:
    """Finish what a killed ``atomic_dir`` left beside ``target``: a kill between its two renames leaves no
    ``target`` and a hidden old copy, which is put back; staging dirs of dead writers are deleted."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    host = socket.gethostname()
    for kind in ("old", "tmp"):
        prefix = f".{target.name}.{kind}-{host}-"
        for leftover in sorted(target.parent.glob(f"{prefix}*")):
            pid = leftover.name[len(prefix):].split("-", 1)[0]
            if not pid.isdigit() or _pid_alive(int(pid)):
                continue
            if kind == "old" and not target.exists():
                os.replace(leftover, target)
                warnings.warn(f"restored {target} from {leftover.name}, left by a write that was killed", stacklevel=3)
            else:
                shutil.rmtree(leftover, ignore_errors=True)


def check_target(target: Path, overwrite: bool, marker: str, protect: Sequence[Path] = ()) -> None:
    """Refuse a write that could delete what it should not: a file, a folder that is not an earlier output of
    this kind (it lacks ``marker``), or a path that holds or sits inside a ``protect`` dir (an export's source)."""
    here = Path(target).resolve()
    for source in protect:
        source_path = Path(source).resolve()
        if here == source_path or here in source_path.parents or source_path in here.parents:
            raise FileExistsError(f"{target} holds or is inside {source}, which this output is made from; "
                                  f"choose an output path outside it")
    if not os.path.lexists(target):
        return
    if not Path(target).is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; this output is a directory, choose another path")
    if not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True (--overwrite) to replace it")
    if not (Path(target) / marker).is_file():
        raise FileExistsError(f"{target} exists but has no {marker}, so it is not an earlier output of this kind; "
                              f"refusing to replace it (choose another path or remove it yourself)")


def _apply_umask(root: Path) -> None:
    """``mkdtemp`` makes 0700 and safetensors writes 0600; shared filesystems need the modes the umask gives."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for name, mode in [(d, 0o777) for d in dirnames] + [(f, 0o666) for f in filenames]:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, mode & ~mask)


@contextmanager
def atomic_dir(target: Path, overwrite: bool = False, *, marker: str, protect: Sequence[Path] = ()) -> Iterator[Path]:
    """Yields a temp dir beside ``target``; on success it replaces ``target`` in one rename.

    ``marker`` is a file every output of this kind holds: an existing ``target`` is replaced only when it holds
    one too, so a mistyped path never deletes a user's folder. See ``check_target`` for ``protect``.
    """
    target = Path(target)
    recover(target)
    check_target(target, overwrite, marker, protect)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_hidden(target, 'tmp').name}-", dir=target.parent))
    old = _hidden(target, "old")
    try:
        yield tmp
        if not (tmp / marker).is_file():
            raise RuntimeError(f"the writer of {target} left no {marker}; a later overwrite could not recognise it")
        _apply_umask(tmp)
        if target.exists():
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        if old.exists() and not target.exists():
            os.replace(old, target)
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
    with atomic_dir(expert_dir, overwrite, marker=ADAPTER_CONFIG) as tmp:
        write_expert(model, name, tmp)
    return expert_dir


def save_bundle(model: PersonaFuseModel, path: Path, overwrite: bool) -> Path:
    with atomic_dir(path, overwrite, marker=CONFIG_FILE) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(_meta(model), indent=2))
        save_file({k: v.detach().cpu().contiguous() for k, v in model.router.state_dict().items()}, tmp / ROUTER_FILE)
        for name in model.expert_names:
            write_expert(model, name, tmp / "experts" / name)
    return path


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def require_key(data: dict, path: Path, *keys: str):
    """``data[k1][k2]...``, or a CheckpointError naming the file and the missing key."""
    value = data
    for depth, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            raise CheckpointError(f"{path}: missing key {'.'.join(keys[:depth + 1])!r}")
        value = value[key]
    return value


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one file; a missing, corrupt or truncated file or a NaN/Inf tensor is a CheckpointError
    naming it, because non-finite weights load silently and only show up as NaN replies."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing (only safetensors weights are loaded)")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file, corrupt or truncated ({e})") from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            count = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{path}: tensor {name!r} holds {count} non-finite value(s) (NaN/Inf); "
                                  f"the weights are broken, load an earlier checkpoint")
    return tensors


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` cannot be opened as safetensors (truncated, corrupt), or None; reads only the header."""
    try:
        with safe_open(str(path), "pt"):
            return None
    except (SafetensorError, OSError) as e:
        return f"{path.name}: {e}"


def load_bundle(cls, model: torch.nn.Module, path: Path, tokenizer, check_base: bool) -> PersonaFuseModel:
    recover(path)
    config_path = path / CONFIG_FILE
    meta = read_json(config_path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{config_path}: format_version {meta.get('format_version')} is not {FORMAT_VERSION}")
    expected = require_key(meta, config_path, "base_model", "fingerprint")
    if check_base and fingerprint(model) != expected:
        raise CheckpointError(
            f"{path} was trained on base {meta['base_model'].get('name_or_path')!r} (fingerprint {expected}), "
            f"but the given model has fingerprint {fingerprint(model)}; pass check_base=False to override"
        )
    try:
        config = PersonaFuseConfig.from_dict(require_key(meta, config_path, "config"))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: config: {e}") from None
    pf = cls(model, config, tokenizer)
    load_weights(pf, path, check_base)
    pf.source_dir = path.resolve()
    return pf


def load_weights(pf: PersonaFuseModel, path: Path, check_base: bool = True) -> None:
    """Router and expert weights of a bundle into an existing stack of the same shape (e.g. on resume)."""
    router_state = read_safetensors(path / ROUTER_FILE)
    own = pf.router.state_dict()
    wrong = [f"{key} {tuple(value.shape)} (the router needs {tuple(own[key].shape)})"
             for key, value in router_state.items() if key in own and value.shape != own[key].shape]
    if wrong:
        raise CheckpointError(f"{path / ROUTER_FILE}: wrong tensor shape for {', '.join(wrong[:3])}; "
                              f"was it saved with another router config or base model?")
    missing, unexpected = sorted(set(own) - set(router_state)), sorted(set(router_state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{path / ROUTER_FILE}: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():  # copied in place, not load_state_dict: FSDP2's load hooks expect its shards registered
        for key, value in router_state.items():
            own[key].copy_(value.to(own[key].dtype))
    for name in pf.expert_names:
        load_expert(pf, name, path / "experts" / name, check_base=check_base)


def load_expert(pf: PersonaFuseModel, name: str, adapter_dir: Path, check_base: bool = True) -> None:
    """Copy a PEFT LoRA adapter into expert slot ``name``; any mismatch is an error before anything is written."""
    k = pf.trait_set.index(name)
    config_path = adapter_dir / ADAPTER_CONFIG
    cfg = read_json(config_path)
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora"):
        raise CheckpointError(f"{adapter_dir}: only plain LoRA adapters can be experts (peft_type={cfg.get('peft_type')}, use_dora={cfg.get('use_dora')})")
    r, alpha = require_key(cfg, config_path, "r"), require_key(cfg, config_path, "lora_alpha")
    for key, value in (("r", r), ("lora_alpha", alpha)):
        if isinstance(value, bool) or not isinstance(value, int if key == "r" else (int, float)):
            raise CheckpointError(f"{config_path}: {key!r} must be a number{' (integer)' if key == 'r' else ''}, "
                                  f"got {value!r} ({type(value).__name__})")
    if r != pf.persona_config.r:
        raise CheckpointError(f"{adapter_dir}: adapter rank r={r} does not match the stack's r={pf.persona_config.r}")
    base_info = adapter_dir / "personafuse_base.json"
    if check_base and base_info.exists():
        info = read_json(base_info)
        if require_key(info, base_info, "fingerprint") != pf.base_fingerprint:
            raise CheckpointError(f"{adapter_dir}: expert was trained on another base model ({info.get('name_or_path')!r})")
    tensors = read_safetensors(adapter_dir / ADAPTER_WEIGHTS)
    their_scaling = alpha / (r**0.5 if cfg.get("use_rslora") else r)
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
