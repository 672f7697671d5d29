"""Sharded models: loading a base partitioned under ZeRO-3, and full values of the trainable weights
(experts, router) while ZeRO-3 or FSDP2 shards them.

Bundles are written from, and loaded into, the live parameters. Under DeepSpeed ZeRO-3 a parameter
holds only its rank's partition (``ds_id`` set, ``data`` empty); under FSDP2 (``fully_shard``) it is a
``DTensor`` shard. ``full_weights`` gathers just the LoRA and router parameters (never the frozen base)
for the duration of a block, on every rank: it is a collective, so every rank must enter it, and
typically only the main process writes inside it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from personafuse.model import PersonaFuseModel


def trainable_slots(pf: PersonaFuseModel) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of every expert and router parameter, in a fixed order (same on every rank)."""
    slots = [(layer, name) for layer in pf.moe_layers.values() for name in ("lora_A", "lora_B")]
    slots += [(module, name) for module in pf.router.modules() for name, p in module._parameters.items() if p is not None]
    return slots


def is_zero3(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def zero3_loading(path: str | os.PathLike, dtype: torch.dtype, trust_remote_code: bool = False):
    """The DeepSpeed config that makes ``from_pretrained`` partition the base as it loads (ZeRO-3 init), or None.

    Under ``accelerate launch`` with a ZeRO-3 DeepSpeed config and ``zero3_init_flag``, accelerate only builds
    this config when the trainer's Accelerator starts, after the recipe has loaded the base: every rank
    would hold the whole base first. This builds it from the same launch settings. Keep the returned object
    alive while loading (transformers holds it by weak reference); the trainer's Accelerator replaces it.
    DeepSpeed drops ``"auto"`` values, so two are filled here: ``bf16``/``fp16`` from the load dtype (the
    partitions would be fp32 otherwise) and the persistence threshold as the trainer fills it later
    (10 x the base's hidden size), so the same parameters stay unpartitioned at load and in training.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin()
    if not plugin.zero3_init_flag:
        return None
    plugin.set_mixed_precision({torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no"))
    from transformers import AutoConfig

    hidden_size = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code
                                             ).get_text_config().hidden_size
    plugin.fill_match("zero_optimization.stage3_param_persistence_threshold", must_match=False,
                      **{"zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size})
    plugin.set_deepspeed_weakref()
    return plugin


def zero3_share(model: nn.Module) -> tuple[int, int] | None:
    """(values this rank holds, values in all) of the ZeRO-3 partitioned parameters, or None if none is."""
    partitioned = [p for p in model.parameters() if is_zero3(p)]
    if not partitioned:
        return None
    return sum(p.ds_tensor.numel() for p in partitioned), sum(p.ds_numel for p in partitioned)


@contextmanager
def gathered(params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Inside the block, ZeRO-3 partitioned ``params`` hold their full values (read-only) on every rank.
    A collective under ZeRO-3: every rank must enter it. Other parameters are left as they are."""
    partitioned = [p for p in params if is_zero3(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned):
        yield


def is_dtensor(param: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def reshard_fsdp(model: nn.Module) -> None:
    """FSDP2 keeps the root's parameters unsharded after a forward (registered as plain tensors whose storage
    it frees later); resharding first means the registered parameters are the ``DTensor`` shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextmanager
def full_weights(pf: PersonaFuseModel, write_back: bool = False) -> Iterator[None]:
    """Inside the block the expert and router parameters hold their full values on every rank.

    ``write_back=True`` (loading a bundle): what the block writes into them is kept, from rank 0 under
    ZeRO-3 (broadcast) and re-sharded under FSDP2 (every rank must write the same values).
    Without sharding this does nothing.
    """
    reshard_fsdp(pf.model)
    slots = trainable_slots(pf)
    params = [module._parameters[name] for module, name in slots]
    if any(is_zero3(p) for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for p in params if is_zero3(p)], modifier_rank=0 if write_back else None):
            yield
        return
    sharded = [(module, name, p) for (module, name), p in zip(slots, params, strict=True) if is_dtensor(p)]
    if not sharded:
        yield
        return
    full = []
    for module, name, p in sharded:  # swap in plain full parameters: the bundle code reads and writes them
        value = nn.Parameter(p.full_tensor().detach(), requires_grad=p.requires_grad)
        module._parameters[name] = value
        full.append(value)
    try:
        yield
    finally:
        for module, name, p in sharded:
            module._parameters[name] = p
    if write_back:
        from torch.distributed.tensor import distribute_tensor

        with torch.no_grad():
            for (_, _, p), value in zip(sharded, full, strict=True):
                shard = distribute_tensor(value.detach().to(p.dtype), p.device_mesh, p.placements, src_data_rank=None)
                p.to_local().copy_(shard.to_local())
