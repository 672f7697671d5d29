"""Run plumbing shared by the recipes: distributed start-up, logging backends, trainer arguments."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from accelerate import PartialState
from transformers.integrations import WandbCallback

from personafuse.config import check_number
from personafuse.data import DataError, Situation

LOGGERS = ("none", "wandb", "wandb_offline")


def init_distributed(backend: str | None) -> PartialState:
    """Start the process group before any trainer config exists.

    On CPU, two ranks need ``gloo``; under DeepSpeed the state must exist first so its batch-size check
    sees the real world size (trainers then get ``accelerator_config={"use_configured_state": True}``).
    """
    if not backend:
        return PartialState()
    # Without cpu=True, accelerate ignores a CPU-only gloo group (distributed_type NO: no DDP, no data
    # sharding); under DeepSpeed it must stay False so accelerate takes its DeepSpeed path.
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    cpu = not deepspeed and (not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "0").lower() in ("1", "true"))
    return PartialState(cpu=cpu, backend=backend)


def shutdown_distributed() -> None:
    """Barrier + destroy: without them some CPU runs crash at interpreter exit."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def configure_logger(kind: str, project: str = "personafuse", run_name: str | None = None) -> Callable[[], list]:
    """A factory of trainer callbacks for the chosen logger (one fresh set per trainer). wandb goes
    offline without credentials, and its callback is wrapped so a logging failure never stops training."""
    if kind not in LOGGERS:
        raise ValueError(f"logger.kind must be one of {LOGGERS}, got {kind!r}")
    if kind == "none":
        return list
    try:
        import wandb  # noqa: F401
    except ImportError:
        warnings.warn("logger=wandb but wandb is not installed; logging disabled", stacklevel=2)
        return list
    offline = kind == "wandb_offline" or not (os.environ.get("WANDB_API_KEY") or os.path.exists(os.path.expanduser("~/.netrc")))
    os.environ.setdefault("WANDB_MODE", "offline" if offline else "online")
    os.environ.setdefault("WANDB_PROJECT", project)
    if run_name:
        os.environ.setdefault("WANDB_NAME", run_name)
    return lambda: [FailSafeWandbCallback()]


class FailSafeWandbCallback(WandbCallback):
    """transformers' wandb callback whose failures are reported once and then switch logging off."""

    def __init__(self):
        super().__init__()
        self.failed = False

    def _guard(self, method: str, *args, **kwargs):
        if self.failed:
            return None
        try:
            return getattr(super(), method)(*args, **kwargs)
        except Exception as error:  # noqa: BLE001  (any logging failure must not stop training)
            self.failed = True
            warnings.warn(f"wandb logging failed and is now off ({type(error).__name__}: {error})", stacklevel=2)
            return None

    def on_train_begin(self, *args, **kwargs):
        return self._guard("on_train_begin", *args, **kwargs)

    def on_log(self, *args, **kwargs):
        return self._guard("on_log", *args, **kwargs)

    def on_save(self, *args, **kwargs):
        return self._guard("on_save", *args, **kwargs)

    def on_train_end(self, *args, **kwargs):
        return self._guard("on_train_end", *args, **kwargs)


def trainer_kwargs(args: Mapping[str, Any], output_dir: str, distributed: bool) -> dict[str, Any]:
    """Config values plus what the run decides: where to write, CPU settings. Logging goes through
    ``configure_logger``'s callbacks, so ``report_to`` is always empty."""
    kwargs = dict(args)
    kwargs.pop("_target_", None)
    kwargs.update(output_dir=output_dir, report_to=[])
    if not torch.cuda.is_available():
        kwargs.update(use_cpu=True, bf16=False, fp16=False)
    if distributed:
        kwargs["accelerator_config"] = {"use_configured_state": True}
    return kwargs


# transformers 5 renamed these; the old names still work but warn (FutureWarning) on every run.
CHECKPOINTING_NAMES = (("gradient_checkpointing", "activation_checkpointing"),
                       ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"))


def checkpointing_names(cls: type, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Trainer-config kwargs under the names ``cls`` takes without a warning, the class default kept.

    TRL configs default ``gradient_checkpointing=True``; that default is carried over to the current name,
    so a run behaves as before and prints no deprecation. On a transformers without the new names, the
    new names map back to the old ones.
    """
    kwargs = dict(kwargs)
    fields = getattr(cls, "__dataclass_fields__", {})
    for old, new in CHECKPOINTING_NAMES:
        if new not in fields:
            if new in kwargs:
                kwargs[old] = kwargs.pop(new)
            continue
        if old in fields and kwargs.get(new) is None:
            default = fields[old].default if fields[old].default is not dataclasses.MISSING else None
            kwargs[new] = kwargs.get(old, default)
        if old in fields:
            kwargs[old] = None
    return kwargs


def _numeric_kinds(hint: Any) -> tuple[set[type], bool] | None:
    """``({int, float, bool} members, allows None)`` of a purely numeric/boolean field type, else ``None``."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kinds = {a for a in args if a is not type(None)}
    return (kinds, type(None) in args) if kinds and kinds <= {int, float, bool} else None


def check_trainer_values(cls: type, values: Mapping[str, Any], where: str) -> None:
    """Check a trainer config block against its config class before any model loads.

    Unknown keys, numbers of the wrong type (``max_steps=abc``) and settings that train nothing
    (``max_steps=0``, ``learning_rate=0``) fail naming ``where.<key>``; transformers would accept
    ``max_steps=0`` and quietly fall back to epochs, or fail on a string only mid-training.
    """
    if not dataclasses.is_dataclass(cls):
        return
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields - {"_target_"})
    if unknown:
        raise TypeError(f"{where}: unknown key(s) {unknown} for {cls.__name__}")
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001  (unresolvable annotations: skip the type check, keep the range checks)
        hints = {}
    for key, value in values.items():
        numeric = _numeric_kinds(hints.get(key))
        if numeric is None or (value is None and numeric[1]):
            continue
        kinds, _ = numeric
        if kinds == {bool}:
            if not isinstance(value, bool):
                raise TypeError(f"{where}.{key} must be true or false, got {value!r}")
        else:
            check_number(value, f"{where}.{key}", integer=kinds == {int})
    max_steps = values.get("max_steps", -1)
    if max_steps == 0 or max_steps < -1:
        raise ValueError(f"{where}.max_steps={max_steps} trains nothing; give a positive number of steps "
                         f"(or -1 to train for num_train_epochs)")
    if max_steps == -1 and values.get("num_train_epochs", 1) <= 0:
        raise ValueError(f"{where}.num_train_epochs={values['num_train_epochs']} trains nothing; give a positive number")
    if "learning_rate" in values:
        check_number(values["learning_rate"], f"{where}.learning_rate", minimum=0, exclusive=True)
    if "per_device_train_batch_size" in values:
        check_number(values["per_device_train_batch_size"], f"{where}.per_device_train_batch_size", integer=True, minimum=1)
    for key in ("packing", "padding_free"):
        if values.get(key):
            raise ValueError(f"{where}.{key}=true is not supported: PersonaFuse routes one context per row, and a "
                             f"packed / padding-free row holds several sequences; set {where}.{key}=false")


def require_reply_room(tokenizer, situations: list[Situation], max_length: int, key: str,
                       has_reply: Callable[[Situation], bool]) -> None:
    """Fail when a context fills ``max_length`` tokens: truncation would cut the whole reply, so the
    loss would be NaN (no label left) or zero instead of an error."""
    lengths = {}
    for s in situations:
        if has_reply(s):
            prompt = tokenizer.apply_chat_template(s.situation, add_generation_prompt=True, tokenize=False)
            lengths[s.id] = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    too_long = {i: n for i, n in lengths.items() if n >= max_length}
    if too_long:
        worst = max(too_long, key=too_long.get)
        raise DataError(f"{len(too_long)} of {len(lengths)} situations have a context of {max_length} tokens or more, "
                        f"so {key}={max_length} leaves no room for the reply (longest: situation {worst!r}, "
                        f"{too_long[worst]} tokens); raise {key} well above {max(lengths.values())}")
