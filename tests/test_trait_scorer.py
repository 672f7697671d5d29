"""The offline trait scorer: its L2 penalty is cross-validated, so the [-1, 1] scale means what it says."""

import torch

from personafuse.data import Situation
from personafuse.eval.trait_expression import L2_GRID, TraitClassifier
from personafuse.traits import BIG_FIVE


class _DirectionEncoder:
    """Each reply's embedding is a fixed random vector plus ``signal`` times +-e0 by its pole word."""

    def __init__(self, signal: float):
        self.signal, self.cache, self.generator = signal, {}, torch.Generator().manual_seed(0)

    def __call__(self, texts):
        for text in texts:
            if text not in self.cache:
                pole = 1.0 if text.startswith("high") else -1.0
                self.cache[text] = torch.randn(16, generator=self.generator) * 0.3 + self.signal * pole * torch.eye(16)[0]
        return torch.stack([self.cache[t] for t in texts])


def _pole_situations(n: int, flip_every: int | None = None) -> list[Situation]:
    """``n`` situations with both poles of every Big Five trait; ``flip_every`` swaps that many situations' labels."""
    out = []
    for i in range(n):
        flip = flip_every is not None and i % flip_every == 0
        responses = {f"{t}_{p}": f"{('low' if p == 'high' else 'high') if flip else p} reply {i} {t}"
                     for t in BIG_FIVE.traits for p in ("high", "low")}
        out.append(Situation(id=f"s{i}", domain="d", split="heldout", situation=[{"role": "user", "content": f"q{i}"}],
                             responses=responses))
    return out


def test_trait_classifier_cross_validates_its_penalty():
    """A clean pole signal earns the weakest penalty (scores near +-1); pure noise earns the strongest (near 0)."""
    clean = TraitClassifier.fit(_pole_situations(20), encoder=_DirectionEncoder(signal=1.0))
    assert clean.fit_info["cross_validated"] and clean.fit_info["l2"] == min(L2_GRID)
    assert min(float(v.mean()) for v in clean.pole_scores(_pole_situations(20)).values()) > 0.9
    noise = TraitClassifier.fit(_pole_situations(20, flip_every=2), encoder=_DirectionEncoder(signal=1.0))
    assert noise.fit_info["l2"] == max(L2_GRID)
    assert max(abs(float(v.mean())) for v in noise.pole_scores(_pole_situations(20)).values()) < 0.2
    fixed = TraitClassifier.fit(_pole_situations(4), encoder=_DirectionEncoder(signal=1.0), l2=1e-3)
    assert fixed.fit_info == {"l2": 1e-3, "cross_validated": False}
