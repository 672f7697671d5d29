"""The Active-Passive-Constraint score (Peng & Shang, NeurIPS 2024), exactly as published:

    APC(q, r | S) = Σ_s [ P_rel(s, q) · P_nli(entailed | s, q, r) + (1 − P_rel(s, q)) · (1 − P_nli(contradicted | s, q, r)) ]

A statement relevant to the query (an active constraint) must be entailed by the response; an
irrelevant one (a passive constraint) must only not be contradicted. The total ranges over
[0, |S|]; each term is one statement's contribution, reported for explanations.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from personafuse.apc.discriminators import Discriminator, DiscriminatorError
from personafuse.apc.personas import Persona
from personafuse.apc.templates import NLI_LABELS, RELEVANCE_LABELS, nli_text, relevance_text


def apc_terms(p_relevant: torch.Tensor, p_entailed: torch.Tensor, p_contradicted: torch.Tensor) -> torch.Tensor:
    """Per-statement APC contributions; inputs broadcast (e.g. ``[S]`` with ``[R, S]``)."""
    return p_relevant * p_entailed + (1 - p_relevant) * (1 - p_contradicted)


@dataclass(frozen=True)
class StatementScore:
    statement: str
    relevance: float  # P_rel(s, q): the statement is an active constraint
    entailed: float  # P_nli(entailed | s, q, r)
    contradicted: float  # P_nli(contradicted | s, q, r)
    score: float  # this statement's term of the sum

    @property
    def active(self) -> bool:
        return self.relevance >= 0.5


@dataclass(frozen=True)
class APCResult:
    query: str
    response: str
    total: float
    statements: tuple[StatementScore, ...]

    @property
    def mean(self) -> float:
        """The total over |S| (in [0, 1]), comparable across personas of different sizes."""
        return self.total / len(self.statements) if self.statements else 0.0

    def explain(self) -> str:
        lines = [f"APC {self.total:.3f} / {len(self.statements)}"]
        for s in sorted(self.statements, key=lambda s: s.score):
            kind = "active " if s.active else "passive"
            lines.append(f"  {s.score:.2f} {kind} P_rel={s.relevance:.2f} P_ent={s.entailed:.2f} "
                         f"P_con={s.contradicted:.2f}  {s.statement}")
        return "\n".join(lines)


class APCScorer:
    """APC with a relevance discriminator (labels no, yes) and an NLI one (contradicted, neutral, entailed).

    Relevance depends only on (character, statement, query), so it is computed once per query and
    kept in an LRU cache of ``cache_size`` statement-query pairs: scoring n responses to one query
    costs one relevance pass over S statements and one NLI pass over n·S texts.
    """

    def __init__(self, relevance: Discriminator, nli: Discriminator, cache_size: int = 65536):
        for disc, labels, role in ((relevance, RELEVANCE_LABELS, "relevance"), (nli, NLI_LABELS, "NLI")):
            if len(disc.labels) != len(labels):
                raise DiscriminatorError(f"the {role} discriminator needs labels {list(labels)}, got {list(disc.labels)}")
        self.relevance_model, self.nli_model, self.cache_size = relevance, nli, cache_size
        self._cache: OrderedDict[tuple[str, str, str], float] = OrderedDict()

    @classmethod
    def from_pretrained(cls, relevance_path, nli_path, device: str | None = None, batch_size: int = 32) -> APCScorer:
        return cls(Discriminator.from_pretrained(relevance_path, RELEVANCE_LABELS, device, batch_size),
                   Discriminator.from_pretrained(nli_path, NLI_LABELS, device, batch_size))

    def relevance(self, persona: Persona, query: str) -> torch.Tensor:
        """``[S]`` P_rel(s, q) for every statement, from the cache where possible."""
        keys = [(persona.character, s, query) for s in persona.statements]
        missing = [k for k in dict.fromkeys(keys) if k not in self._cache]
        if missing:
            probs = self.relevance_model.probabilities([relevance_text(*k) for k in missing])[:, 1]
            for key, p in zip(missing, probs.tolist(), strict=True):
                self._cache[key] = p
        for key in keys:
            self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return torch.tensor([self._cache[k] for k in keys], dtype=torch.float32)

    def score(self, persona: Persona, query: str, responses: Sequence[str]) -> list[APCResult]:
        """APC of each response to ``query``, with the per-statement breakdown."""
        statements = persona.statements
        if not statements or not responses:
            return [APCResult(query, r, 0.0, ()) for r in responses]
        p_rel = self.relevance(persona, query)
        texts = [nli_text(persona.character, s, query, r) for r in responses for s in statements]
        nli = self.nli_model.probabilities(texts).view(len(responses), len(statements), len(NLI_LABELS))
        p_ent, p_con = nli[..., 2], nli[..., 0]
        terms = apc_terms(p_rel, p_ent, p_con)
        results = []
        for i, response in enumerate(responses):
            breakdown = tuple(StatementScore(s, p_rel[j].item(), p_ent[i, j].item(), p_con[i, j].item(), terms[i, j].item())
                              for j, s in enumerate(statements))
            results.append(APCResult(query, response, terms[i].sum().item(), breakdown))
        return results

    def score_one(self, persona: Persona, query: str, response: str) -> APCResult:
        return self.score(persona, query, [response])[0]

    def retrieve(self, persona: Persona, query: str, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` statements most relevant to ``query`` with P_rel, highest first (ties keep file order):
        the paper's RAG baseline puts the top 4-6 in the system prompt."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        p_rel = self.relevance(persona, query).tolist()
        order = sorted(range(len(p_rel)), key=lambda j: (-p_rel[j], j))[:k]
        return [(persona.statements[j], p_rel[j]) for j in order]


def persona_system_prompt(persona: Persona, statements: Sequence[str] | None = None) -> str:
    """The role-playing system prompt: the character and the statements to follow (default: all)."""
    chosen = persona.statements if statements is None else statements
    facts = "\n".join(f"- {s}" for s in chosen)
    return f"You are {persona.character}. Stay in character and answer as {persona.character} would.\n{facts}"
