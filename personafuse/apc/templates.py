"""The paper's single-sequence discriminator inputs (Peng & Shang, 2024, ``prompt.py`` of their release).

The relevance and NLI discriminators read one text each; keeping the published wording lets
discriminators distilled elsewhere with the same templates be used here unchanged.
"""

from __future__ import annotations

import re

RELEVANCE_LABELS = ("no", "yes")
NLI_LABELS = ("contradicted", "neutral", "entailed")


def relevance_text(character: str, statement: str, query: str) -> str:
    return (f"Character: {character}\n    \nPersona Statement: {statement}\n\nUser Utterance: {query}\n\n"
            "Does this user utterance should be responded by including the information in the given persona "
            'statement? Only answer "yes" or "no" without any explanation.')


def nli_text(character: str, statement: str, query: str, response: str) -> str:
    return (f"Character: {character}\n    \nPersona Statement: {statement}\n\nUser Utterance: {query}\n\n"
            f"Response: {response}\n\n"
            "For this response, is the given persona entailed, neutral, or contradict to it in natural language "
            'inference? Only answer "entailed", "neutral" or "contradict" without any explanation.')


_FIELDS = {"relevance": ("character", "statement", "query"), "nli": ("character", "statement", "query", "response")}
_PATTERNS = {kind: re.compile("(.*)".join(map(re.escape, render(*["\0"] * len(_FIELDS[kind])).split("\0"))), re.DOTALL)
             for kind, render in (("relevance", relevance_text), ("nli", nli_text))}


def parse_text(kind: str, text: str) -> dict[str, str]:
    """The fields a ``relevance_text`` / ``nli_text`` was built from (for discriminators that read them apart)."""
    match = _PATTERNS[kind].fullmatch(text)
    if match is None:
        raise ValueError(f"not a {kind} discriminator input (templates.{kind}_text): {text[:80]!r}...")
    return dict(zip(_FIELDS[kind], match.groups(), strict=True))
