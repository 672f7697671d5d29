from fractions import Fraction

import pytest

from personafuse.answers import (
    answers_match,
    extract_answer,
    extract_boxed,
    is_correct,
    normalize_answer,
    parse_number,
    reference_answer,
)


@pytest.mark.parametrize(("solution", "reference"), [
    ("She has 1,234 apples in total.\n#### 1,234", "1234"),                       # GSM8K marker, commas
    ("12 + 30 = 42, then 42 * 2 = 84 and 84 - 10 = 74. The answer is 74.", "74"),  # several numbers
    ("3 bags of 4 is 12 apples; she gives away 5, leaving 7 apples.", "7"),         # last number fallback
    ("The answer is 7, not 8.", "7"),
    ("So the total is \\boxed{\\frac{3}{4}}.", "0.75"),                              # latex fraction vs decimal
    ("\\boxed{\\dfrac{12}{16}}", "3/4"),                                             # unreduced fraction
    ("$\\boxed{1{,}000}$", "1000"),                                                  # latex thousands separator
    ("\\boxed{12} is wrong, the right value is \\boxed{13}", "13"),                 # the last box wins
    ("\\boxed{x = 5}", "5"),
    ("The answer is $18.00.", "18"),                                                 # currency, trailing zeros
    ("The final answer: $1,234.50", "1234.5"),
    ("The answer is 18 dollars per day.", "18"),                                     # units
    ("Answer: 5 km", "5 km"),
    ("It rose to 12.5%", "12.5"),                                                    # percent
    ("The answer is −3", "-3"),                                                      # unicode minus
    ("answer: 2 1/2", "2.5"),                                                        # mixed number
    ("\\boxed{-\\frac{1}{2}}", "-0.5"),
    ("The answer is 0.3333333333", "1/3"),                                           # within tolerance
    ("The answer is \\boxed{\\text{Paris}}.", "paris"),                              # text, case
    ("The answer is (B).", "B"),                                                     # choice letter
    ("The answer is New  York.", "new york"),
])
def test_correct_solutions(solution, reference):
    assert is_correct(solution, reference), (extract_answer(solution), reference)


@pytest.mark.parametrize(("solution", "reference"), [
    ("The answer is 12", "13"),
    ("The answer is 0.33", "1/3"),               # rounding is not the same number
    ("\\boxed{13} but I first thought \\boxed{12}", "13"),
    ("I am not sure how to solve this.", "3"),   # no answer at all
    ("The answer is Paris.", "London"),
    ("The answer is 1, 2 or 3", "123"),          # a list is not a thousands separator
])
def test_incorrect_solutions(solution, reference):
    assert not is_correct(solution, reference)


def test_boxed_with_nested_braces_and_unbalanced():
    assert extract_boxed("so \\boxed{\\dfrac{\\sqrt{2}}{2}} done") == "\\dfrac{\\sqrt{2}}{2}"
    assert extract_boxed("\\boxed 5$.") == "5"
    assert extract_boxed("\\boxed{12") is None
    assert extract_answer("\\boxed{12") == "12"  # falls back to the last number
    assert extract_boxed("no box") is None


def test_numbers_and_normal_forms():
    assert parse_number("$1,234.50") == Fraction(2469, 2)
    assert parse_number("1,5") is None and parse_number("7 (seven)") is None and parse_number("1/0") is None
    assert parse_number("12 cm^2") == 12
    assert normalize_answer("\\frac{6}{8}") == "3/4"
    assert normalize_answer(" The Eiffel  Tower. ") == "the eiffel tower"
    assert reference_answer("Half is 36.\n#### 36") == "36" and reference_answer(" 42 ") == "42"
    assert not answers_match(None, "3")
