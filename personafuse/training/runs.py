"""Run plumbing shared by the recipes: distributed start-up, logging backends, trainer arguments."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from accelerate import PartialState

LOGGERS = ("none", "wandb", "wandb_offline")


def init_distributed(backend: str | None) -> PartialState:
    """Start the process group before any trainer config exists.

    On CPU, two ranks need ``gloo``; under DeepSpeed the state must exist first so its batch-size check
    sees the real world size (trainers then get ``accelerator_config={"use_configured_state": True}``).
    """
    return PartialState(backend=backend) if backend else PartialState()


def shutdown_distributed() -> None:
    """Barrier + destroy: without them some CPU runs crash at interpreter exit."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def configure_logger(kind: str, project: str = "personafuse", run_name: str | None = None) -> list[str]:
    """``report_to`` for the trainers. wandb falls back to offline mode without credentials, so a
    logging problem never stops training."""
    if kind not in LOGGERS:
        raise ValueError(f"logger.kind must be one of {LOGGERS}, got {kind!r}")
    if kind == "none":
        return []
    try:
        import wandb  # noqa: F401
    except ImportError:
        warnings.warn("logger=wandb but wandb is not installed; logging disabled", stacklevel=2)
        return []
    offline = kind == "wandb_offline" or not (os.environ.get("WANDB_API_KEY") or os.path.exists(os.path.expanduser("~/.netrc")))
    os.environ.setdefault("WANDB_MODE", "offline" if offline else "online")
    os.environ.setdefault("WANDB_PROJECT", project)
    if run_name:
        os.environ.setdefault("WANDB_NAME", run_name)
    return ["wandb"]


def trainer_kwargs(args: Mapping[str, Any], output_dir: str, report_to: list[str], distributed: bool) -> dict[str, Any]:
    """Config values plus what the run decides: where to write, CPU settings, logging."""
    kwargs = dict(args)
    kwargs.pop("_target_", None)
    kwargs.update(output_dir=output_dir, report_to=report_to)
    if not torch.cuda.is_available():
        kwargs.update(use_cpu=True, bf16=False, fp16=False)
    if distributed:
        kwargs["accelerator_config"] = {"use_configured_state": True}
    return kwargs
