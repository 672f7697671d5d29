"""Bundles under sharded training: FSDP2 (``fully_shard``, torchrun + gloo)."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_recipes import free_port, run_cmd, subprocess_env, tail

REPO = Path(__file__).resolve().parents[1]


def bundle_tensors(bundle: Path) -> dict[str, torch.Tensor]:
    return {f"{f.relative_to(bundle)}:{k}": v for f in sorted(bundle.rglob("*.safetensors")) for k, v in load_file(f).items()}


def test_full_weights_is_a_no_op_without_sharding():
    from personafuse import PersonaFuseConfig, PersonaFuseModel
    from personafuse.sharding import full_weights, trainable_slots
    from tests.tiny_models import tiny_llama

    pf = PersonaFuseModel.from_base(tiny_llama(0, layers=1), PersonaFuseConfig(r=2, alpha=4.0, dropout=0.0))
    before = [m._parameters[n] for m, n in trainable_slots(pf)]
    assert len(before) == 2 * len(pf.moe_layers) + len(list(pf.router.parameters()))
    with full_weights(pf, write_back=True):
        assert [m._parameters[n] for m, n in trainable_slots(pf)] == before


@pytest.mark.parametrize(("config", "dtype", "partitioned"), [
    ("zero3.json", torch.bfloat16, True), ("zero3.json", torch.float32, True), ("zero2.json", torch.bfloat16, False)])
def test_zero3_loading_config_follows_the_launch(tiny_model_dir, monkeypatch, config, dtype, partitioned):
    """What ``accelerate launch --config_file launch/deepspeed_zero3.yaml`` exports: the base then loads under
    ZeRO-3 init, partitions in the load dtype, persistence threshold as the trainer fills it (10 x hidden)."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install '.[distributed]')")
    from transformers import AutoConfig
    from transformers.integrations import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    from personafuse.sharding import zero3_loading

    assert zero3_loading(tiny_model_dir, dtype) is None  # not launched under DeepSpeed
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(REPO / "launch" / "deepspeed" / config))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO3_INIT", "true")
    try:
        plugin = zero3_loading(tiny_model_dir, dtype)
        assert (plugin is not None) == partitioned == is_deepspeed_zero3_enabled()
        if partitioned:
            zero = plugin.deepspeed_config["zero_optimization"]
            hidden = AutoConfig.from_pretrained(tiny_model_dir).hidden_size
            assert zero["stage3_param_persistence_threshold"] == 10 * hidden
            assert plugin.deepspeed_config["bf16"]["enabled"] is (dtype == torch.bfloat16)
            assert plugin.deepspeed_config["fp16"]["enabled"] is False
            assert zero["stage3_gather_16bit_weights_on_model_save"] is False
    finally:
        unset_hf_deepspeed_config()


@pytest.mark.slow
def test_fsdp2_saves_the_unsharded_bundle_and_resumes_into_shards(tmp_path):
    """tests/fsdp2_bundle.py asserts logits, reload and a backward on the shards; here: the files are identical."""
    out = run_cmd([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(free_port()), "tests/fsdp2_bundle.py", str(tmp_path)], env=subprocess_env(OMP_NUM_THREADS="1"))
    assert "FSDP2 OK" in out, tail(out)
    plain, sharded = bundle_tensors(tmp_path / "plain"), bundle_tensors(tmp_path / "sharded")
    assert plain.keys() == sharded.keys() and len(plain) > 10
    for key, value in plain.items():
        assert torch.equal(value, sharded[key]), key

