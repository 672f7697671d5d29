"""A run prints what the user needs: no bitsandbytes import (and its backend warnings) unless a model is
quantized, no deprecation warnings from our own trainer configs, one line of ours for a new classifier head."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import get_class

from personafuse import PersonaFuseConfig, PersonaFuseModel
from personafuse.training.runs import checkpointing_names, trainer_kwargs
from tests.tiny_models import tiny_llama

TRAINER_CONF = Path(__file__).resolve().parents[1] / "conf" / "trainer"


class RefuseImport:
    """A meta-path finder that fails the test on any attempt to import ``name``."""

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name or fullname.startswith(self.name + "."):
            raise AssertionError(f"{fullname} was imported although nothing asked for quantization")
        return None


def test_a_plain_model_never_imports_bitsandbytes(monkeypatch):
    for name in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [RefuseImport("bitsandbytes"), *sys.meta_path])
    from personafuse.export import blend_gates, merged_state_dict

    pf = PersonaFuseModel.from_base(tiny_llama(seed=0), PersonaFuseConfig(r=2, alpha=4.0, dropout=0.0))
    merged = merged_state_dict(pf, blend_gates(pf, gates=[1.0] + [0.0] * 9), torch.float32, dequantize=False)
    assert merged and "bitsandbytes" not in sys.modules


def test_the_bitsandbytes_kernels_hub_message_is_dropped_and_other_warnings_kept(caplog):
    import personafuse  # noqa: F401  (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...",
                       "No module named 'kernels'")
        logger.warning("some other bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes warning"]


def trainer_blocks():
    for path in sorted(TRAINER_CONF.glob("*.yaml")):
        for name, block in yaml.safe_load(path.read_text()).items():
            if isinstance(block, dict) and "_target_" in block:
                yield pytest.param(block, id=f"{path.stem}.{name}")


@pytest.mark.parametrize("block", list(trainer_blocks()))
def test_our_trainer_configs_use_current_names(block, tmp_path):
    cls = get_class(block["_target_"])
    kwargs = checkpointing_names(cls, trainer_kwargs(block, str(tmp_path), distributed=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = cls(**kwargs)
    default = cls.__dataclass_fields__["gradient_checkpointing"].default
    expected = block.get("activation_checkpointing", default) or False
    assert args.activation_checkpointing is expected and args.gradient_checkpointing is expected


def test_old_checkpointing_name_maps_onto_the_new_one():
    from trl import SFTConfig

    kwargs = checkpointing_names(SFTConfig, {"gradient_checkpointing": False, "gradient_checkpointing_kwargs": {"a": 1}})
    assert kwargs == {"activation_checkpointing": False, "gradient_checkpointing": None,
                      "activation_checkpointing_kwargs": {"a": 1}, "gradient_checkpointing_kwargs": None}


def test_new_classifier_head_is_one_line_of_ours(tmp_path, capfd):
    from transformers import AutoTokenizer, BertConfig, BertModel

    from personafuse.apc.distill import init_discriminator
    from personafuse.context import bundled_sentence_encoder_path

    tokenizer = AutoTokenizer.from_pretrained(bundled_sentence_encoder_path())
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    capfd.readouterr()
    lines = []
    model, _ = init_discriminator(tmp_path, "nli", log=lines.append)
    captured = capfd.readouterr()
    assert "LOAD REPORT" not in captured.out + captured.err, captured.err[-2000:]
    assert lines == [f"[discriminator] nli: new 3-label head (contradicted, neutral, entailed) on {tmp_path}; "
                     "initialised fresh: classifier.bias, classifier.weight"], lines
    assert model.config.num_labels == 3
