"""Shared fixtures: a tiny random chat model saved as a local checkpoint the recipes can load."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama resized to the byte-level test tokenizer (which has a chat template), saved
    with that tokenizer, so recipes load it with ``model.path=<dir>``."""
    from tiny import make_tiny_tokenizer
    from tiny_models import tiny_llama

    tokenizer = make_tiny_tokenizer()
    model = tiny_llama(seed=0)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    path = tmp_path_factory.mktemp("tiny_chat_llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
