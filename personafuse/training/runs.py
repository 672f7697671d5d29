"""Run plumbing shared by the recipes: distributed start-up, logging backends, trainer arguments."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from accelerate import PartialState
from transformers.integrations import WandbCallback

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
