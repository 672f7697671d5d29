"""Stand-ins for the evaluation tests: a hashing sentence encoder and a scripted judge."""

from __future__ import annotations

import zlib

import torch


class HashEncoder:
    """Bag-of-words hashed into ``dim`` buckets and L2-normalised: deterministic, no model."""

    def __init__(self, dim: int = 64):
        self.dim = dim

    def __call__(self, texts):
        out = torch.zeros(len(texts), self.dim)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                out[i, zlib.crc32(word.encode()) % self.dim] += 1
        return torch.nn.functional.normalize(out, dim=-1)


class ScriptedJudge:
    """A ChatGenerator whose replies come from ``answer(conversation)``; records what it was asked."""

    def __init__(self, answer):
        self.answer, self.asked = answer, []

    def generate(self, conversations, **sampling):
        self.asked.extend(conversations)
        return [self.answer(c) for c in conversations]
