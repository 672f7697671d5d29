"""Activation checkpointing recomputes each layer with the gates of its own forward."""

import pytest
import torch

from personafuse import PersonaFuseConfig, PersonaFuseModel
from tests.tiny_models import VOCAB, randomize_experts, tiny_llama


def grads_of_two_batches(checkpointing: dict | None, fixed: bool = False) -> dict[str, torch.Tensor]:
    """Two forwards with different contexts, then one backward: the second forward replaces the shared gates
    before the first one's layers are recomputed."""
    pf = PersonaFuseModel.from_base(tiny_llama(0, layers=3), PersonaFuseConfig(r=4, alpha=8.0, dropout=0.0))
    randomize_experts(pf, 0, std=0.3)
    pf.train()
    if checkpointing is not None:
        pf.model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, VOCAB, (2, 6), generator=gen) for _ in range(2)]
    gates = [torch.softmax(torch.randn(2, 10, generator=gen) * 3, -1) for _ in range(2)]
    loss = 0
    for batch, gate in zip(batches, gates, strict=True):
        if fixed:
            with pf.fixed_gates(gate):
                loss = loss + pf(input_ids=batch, labels=batch).loss
        else:
            loss = loss + pf(input_ids=batch, labels=batch).loss
    loss.backward()
    return {name: p.grad.clone() for name, p in pf.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fixed", [False, True], ids=["routed", "fixed"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpointing_gives_the_gradients_of_a_plain_backward(reentrant, fixed):
    expected = grads_of_two_batches(None, fixed)
    got = grads_of_two_batches({"use_reentrant": reentrant}, fixed)
    assert set(got) == set(expected)
    assert any("lora_B" in name for name in got) and fixed != any("router" in name for name in got)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("preset, expected", [("cpu_demo", False), ("gpu", True)])
def test_trainer_presets_set_activation_checkpointing_by_its_current_name(preset, expected):
    """``gradient_checkpointing`` is a deprecated alias in transformers 5; TRL defaults it to on."""
    import warnings

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tests.test_inputs import compose_cfg

    cfg = compose_cfg("apc_dpo", [f"trainer={preset}", "run_dir=/tmp/unused"])
    for block in ("expert", "dpo"):
        values = OmegaConf.to_container(cfg.trainer[block], resolve=True)
        assert "gradient_checkpointing" not in values
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # a deprecated name would warn here
            args = instantiate({**values, "output_dir": "/tmp/unused", "use_cpu": True, "bf16": False})
        assert args.activation_checkpointing is expected and args.gradient_checkpointing is expected
