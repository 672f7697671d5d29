"""Activation (gradient) checkpointing that recomputes a layer with the gates of its own forward.

The MoE layers read their gates from the model's shared ``RoutingState``. A checkpointed layer is
recomputed at backward time, when that state may hold the gates of a later forward (a second batch,
the context encoder, the other half of a DPO pair). Each checkpointed call therefore passes the
gates of its forward into the checkpoint as an explicit input: recompute sees its own gates, and
reentrant checkpointing (which only differentiates explicit inputs) still sends gradient to the router.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from personafuse.layer import RoutingState
from personafuse.route_plan import RoutePlan


class GateSnapshotCheckpoint:
    """Wraps a layer's checkpoint function (transformers' ``_gradient_checkpointing_func``).

    A callable object, not a closure, so ``copy.deepcopy`` of a model gives the copy's layers its own state.
    """

    def __init__(self, checkpoint: Callable, state: RoutingState):
        self.checkpoint, self.state = checkpoint, state

    def __call__(self, function: Callable, *args, **kwargs):
        state, plan, adapters_enabled = self.state, self.state.plan, self.state.adapters_enabled

        def with_own_gates(gates, *inner_args, **inner_kwargs):
            previous = state.plan, state.adapters_enabled
            # reentrant checkpointing hands in a detached copy of the gates: a plan of its own, so grads reach it
            state.plan = plan if plan is None or plan.gates is gates else RoutePlan(gates)
            state.adapters_enabled = adapters_enabled
            try:
                return function(*inner_args, **inner_kwargs)
            finally:
                state.plan, state.adapters_enabled = previous

        return self.checkpoint(with_own_gates, None if plan is None else plan.gates, *args, **kwargs)


def checkpointable_modules(model: nn.Module) -> list[nn.Module]:
    """The modules transformers may checkpoint (they carry a ``gradient_checkpointing`` flag)."""
    return [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]


def snapshot_gates_on_recompute(modules: list[nn.Module], state: RoutingState) -> None:
    """Wrap the checkpoint function of every module with checkpointing on, unless wrapped already.

    Called before each forward that builds a graph, so checkpointing switched on by any route
    (``Trainer``, ``activation_checkpointing_enable`` on the inner model, TRL) is covered.
    """
    for module in modules:
        checkpoint = getattr(module, "_gradient_checkpointing_func", None)
        if module.gradient_checkpointing and checkpoint is not None and not isinstance(checkpoint, GateSnapshotCheckpoint):
            module._gradient_checkpointing_func = GateSnapshotCheckpoint(checkpoint, state)
