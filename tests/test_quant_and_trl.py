"""QLoRA bases and TRL trainers on top of a PersonaFuse stack."""

import pytest
import torch

from personafuse import PersonaFuseConfig, PersonaFuseModel
from personafuse.bnb import MoELoraLinear4bit
from tests.tiny_models import VOCAB, randomize_experts, tiny_llama, tiny_llama_4bit


def test_qlora_4bit_base_trains_one_step(tmp_path):
    pytest.importorskip("bitsandbytes")
    base = tiny_llama_4bit(tmp_path / "base")
    pf = PersonaFuseModel.from_base(base, PersonaFuseConfig(r=4, alpha=8.0, dropout=0.0))
    assert all(isinstance(layer, MoELoraLinear4bit) for layer in pf.moe_layers.values())
    randomize_experts(pf)
    x = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in pf.parameters() if p.requires_grad], lr=1e-2)
    before = pf(input_ids=x, labels=x).loss
    before.backward()
    optimizer.step()
    after = pf(input_ids=x, labels=x).loss
    assert torch.isfinite(before) and after < before


def test_trl_sft_trainer_trains_the_stack_and_adds_aux_loss(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tests.tiny import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    base = tiny_llama(0)
    base.resize_token_embeddings(len(tok))
    pf = PersonaFuseModel.from_base(base, PersonaFuseConfig(r=4, alpha=8.0))
    randomize_experts(pf)
    router_before = pf.router.head.weight.detach().clone()
    rows = [{"prompt": [{"role": "user", "content": "hello there"}],
             "completion": [{"role": "assistant", "content": "hello friend"}]}] * 8
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                     use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1, seed=0)
    trainer = SFTTrainer(model=pf, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    assert trainer.aux_loss_enabled
    trainer.train()
    assert not torch.equal(router_before, pf.router.head.weight)
    assert any(log.get("aux_loss", 0) > 0 for log in trainer.state.log_history)
