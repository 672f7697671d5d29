"""The paper's single-sequence discriminator inputs (Peng & Shang, 2024, ``prompt.py`` of their release).

The relevance and NLI discriminators read one text each; keeping the published wording lets
discriminators distilled elsewhere with the same templates be used here unchanged.
"""

from __future__ import annotations

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
