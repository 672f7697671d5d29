"""Answer checking for reasoning data: pull the final answer out of a solution and compare it to a reference.

Used by the persona augmentation pipeline (keep only verified solutions) and by math evaluation.

Extraction (:func:`extract_answer`) tries, in order: the last ``\\boxed{...}`` (nested braces allowed),
the last GSM8K ``#### x`` line, the last "final answer is / the answer is / answer:" phrase, and
finally the last number in the text. Comparison (:func:`answers_match`) is numeric when both sides
read as numbers (``1,234``, ``$18.00``, ``\\frac{3}{4}``, ``2 1/2``, ``50%``, ``5 km``, ``x = 5``) and
an exact match of normalised text otherwise (case, spaces, ``\\text{}``, end punctuation ignored).
"""

from __future__ import annotations

import re
from fractions import Fraction

_BOX = re.compile(r"\\(?:boxed|fbox)\b")
_GSM8K = re.compile(r"####\s*([^\n]+)")
_PHRASE = re.compile(r"(?:final answer|the answer|answer)\s*(?:is|:|=)\s*:?\s*([^\n]+)", re.IGNORECASE)
# Thousands separators only in groups of three, so "1,5" or a list "1, 2, 3" is not one number.
_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_FRACTION = re.compile(rf"^({_NUMBER})\s*/\s*({_NUMBER})$")
_MIXED = re.compile(r"^([-+]?\d+)\s+(\d+)\s*/\s*(\d+)$")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_LATEX_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_ASSIGNMENT = re.compile(r"^[a-zA-Z]\w*\s*=\s*(?!=)")
# Trailing words after a number are units or nouns ("18 dollars", "5 km", "12 apples per day").
_UNIT_TAIL = re.compile(r"^[a-zA-Z][a-zA-Z .\-/²³^{}0-9]*$")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (braces may nest); ``None`` if there is none."""
    for match in reversed(list(_BOX.finditer(text))):
        start = match.end()
        while start < len(text) and text[start] == " ":
            start += 1
        if start < len(text) and text[start] != "{":
            token = re.match(r"\S+", text[start:])  # \boxed 5
            return token.group(0).rstrip("$.") if token else None
        depth = 0
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start + 1:i].strip()
    return None


def extract_answer(text: str) -> str | None:
    """The final answer a solution states, as written (normalise it with :func:`normalize_answer`)."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in (_GSM8K, _PHRASE):
        matches = pattern.findall(text)
        if matches:
            return _first_clause(matches[-1])
    numbers = _NUMBER_RE.findall(_clean_latex(text))
    return numbers[-1] if numbers else None


def reference_answer(answer: str) -> str:
    """The answer part of a reference: what follows ``####`` in GSM8K solutions, else the whole string."""
    matches = _GSM8K.findall(answer)
    return matches[-1].strip() if matches else answer.strip()


def parse_number(answer: str) -> Fraction | None:
    """The exact value of an answer that is a number (possibly with a currency sign, unit or ``%``)."""
    text = _clean_latex(answer).strip().rstrip(".").strip()
    text = _ASSIGNMENT.sub("", text)
    text = text.replace("$", "").replace("€", "").replace("£", "").replace("%", "").strip()
    text = re.sub(r"^(?:about|approximately|exactly|only|total(?: of)?)\s+", "", text, flags=re.IGNORECASE)
    if match := _MIXED.match(text):
        whole, num, den = (int(g) for g in match.groups())
        if den == 0:
            return None
        sign = -1 if match.group(1).startswith("-") else 1
        return whole + sign * Fraction(num, den)
    if match := _FRACTION.match(text):
        num, den = _to_fraction(match.group(1)), _to_fraction(match.group(2))
        return None if den == 0 else num / den
    match = re.match(rf"^({_NUMBER})(.*)$", text)
    if not match:
        return None
    tail = match.group(2).strip()
    if tail and not _UNIT_TAIL.match(tail):
        return None
    return _to_fraction(match.group(1))


def normalize_answer(answer: str) -> str:
    """Canonical text of an answer: numbers in lowest terms (``"3/4"``, ``"1234"``), else lowercased words."""
    number = parse_number(answer)
    if number is not None:
        return str(number)
    text = _clean_latex(answer).lower()
    text = " ".join(text.replace("$", "").split()).strip(" .,;:!")
    if re.fullmatch(r"\(\w\)|\[\w\]", text):  # "(B)" is the choice "b"
        text = text[1:-1]
    return text


def answers_match(predicted: str | None, reference: str, rel_tol: float = 1e-6) -> bool:
    """Whether an extracted answer equals the reference: numerically if both are numbers, else as text."""
    if predicted is None:
        return False
    a, b = parse_number(predicted), parse_number(reference)
    if a is not None and b is not None:
        return a == b or abs(a - b) <= rel_tol * max(abs(a), abs(b))
    return normalize_answer(predicted) == normalize_answer(reference)


def is_correct(solution: str, reference: str) -> bool:
    """Whether ``solution``'s final answer matches ``reference`` (a bare answer or a ``#### x`` solution)."""
    return answers_match(extract_answer(solution), reference_answer(reference))


def _first_clause(span: str) -> str:
    """"18 dollars. Then she..." -> "18 dollars"; "$\\frac{1}{2}$." -> "$\\frac{1}{2}$"."""
    span = span.strip()
    cut = re.search(r"(?<!\d)[.;!?](?:\s|$)|\.(?=\s)|,\s(?!\d{3}\b)", span)
    return (span[:cut.start()] if cut else span).strip().rstrip(".").strip()


def _clean_latex(text: str) -> str:
    text = text.replace("{,}", ",").replace("\\!", "").replace("\\,", "").replace("\\%", "%").replace("\\$", "$")
    text = text.replace("−", "-").replace("\\left", "").replace("\\right", "")
    text = re.sub(r"\^\s*\{?\\circ\}?", "", text)
    for _ in range(3):  # wrappers may nest: \text{\textbf{x}}
        text = _LATEX_WRAPPERS.sub(r"\1", text)
    text = _LATEX_FRAC.sub(r"(\1)/(\2)", text)
    text = re.sub(r"\((" + _NUMBER + r")\)/\((" + _NUMBER + r")\)", r"\1/\2", text)
    return text.replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "")


def _to_fraction(number: str) -> Fraction:
    return Fraction(number.replace(",", "").replace("+", ""))
