"""Answer extraction, normalization, equality, vote keys, and the statistics helpers."""

import math
import random
import sys

import pytest
from scipy.stats import t as student_t

from underpar.errors import ConfigError
from underpar.data.answers import (
    ANSWER_KINDS, extract_answer_is, extract_boxed, extract_gsm8k_strict, extract_last_number,
    extract_last_number_reference, math_equal, normalize_number, numbers_equal, vote_key,
)
from underpar.eval.stats import accuracy_ci, mean_ci, welch_test

# text, gsm8k strict, last number, boxed, answer-is
OUTPUTS = [
    ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.\n#### 72",
     "72", "72", None, None),
    ("The total is 1,000 + 234 = 1,234.\n#### 1,234", "1234", "1234", None, None),
    ("She needs $1,234.50.\n#### $1,234.50", "1234.50", "1234.50", None, None),
    ("She pays $42 in total.\n#### 42.\nI hope this helps!", "42", "42", None, None),
    ("The answer is $42.", None, "42", None, "42"),
    ("Step 1: 3 + 4 = 7. Step 2: 7 * 6 = 42. So the answer is 42. Check: 6 * 7 = 42 in 2 steps.",
     None, "2", None, "42"),
    ("The temperature dropped to -5 degrees.\n#### -5", "-5", "-5", None, None),
    ("He loses $3.50 a day, so the change is -3.5.\n#### -3.5", "-3.5", "-3.5", None, None),
    ("The difference is 10 - 3 = 7", None, "7", None, None),
    ("The store is open 3-5", None, "5", None, None),
    ("Subtract: 10 - 3 leaves 7 - 0. So 10 - 3", None, "3", None, None),
    ("The change is -$4.", None, "-4", None, None),
    ("So x = -0.25", None, "-0.25", None, None),
    ("Half of it, 3/4 of a cup, remains.", None, "3/4", None, None),
    ("$\\boxed{\\frac{1}{2}}$", None, "2", "\\frac{1}{2}", None),
    ("Since $\\sqrt{x^2} = |x|$, the answer is \\boxed{\\sqrt{x^{2}}}.",
     None, "2", "\\sqrt{x^{2}}", "\\sqrt{x^{2}}"),
    ("First \\boxed{3}, but correcting the sign: \\boxed{4}", None, "4", "4", None),
    ("Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.",
     None, "4", None, "\\frac{3}{4}"),
    ("I am not sure how to solve this problem.", None, None, None, None),
    ("", None, None, None, None),
    ("9 (apples)", None, "9", None, None),
    ("The answer is 9 apples.", None, "9", None, "9 apples"),
    ("\\fbox{12}", None, "12", "12", None),
    ("The area is \\boxed{2\\pi r^{2}} square units.", None, "2", "2\\pi r^{2}", None),
    ("\\boxed{\\left\\{1, 2\\right\\}}", None, "2", "\\left\\{1, 2\\right\\}", None),
    ("We get \\boxed{5}. Then \\boxed{6", None, "6", "5", None),  # generation cut off
    ("The answer is: 1,234,567", None, "1234567", None, "1,234,567"),
    ("#### 5\nWait, I made an error.\n#### 7", "7", "7", None, None),
    ("Total: 12,345,678 dollars", None, "12345678", None, None),
    ("2 + 2 = 4.0000", None, "4.0000", None, None),
    ("Adding them up, the final answer is 18", None, "18", None, "18"),
    ("so the answer is \\boxed 5$.", None, "5", "5", "5"),
    ("The loss is #### -1,200", "-1200", "-1200", None, None),
    ("It is .5 of the whole", None, ".5", None, None),
]


@pytest.mark.parametrize("text,strict,last,boxed,answer_is", OUTPUTS)
def test_extractors_on_model_outputs(text, strict, last, boxed, answer_is):
    assert extract_gsm8k_strict(text) == strict
    assert extract_last_number(text) == last
    assert extract_boxed(text) == boxed
    assert extract_answer_is(text) == answer_is


def test_last_number_equals_a_scan_of_the_whole_text():
    """extract_last_number starts its scan after the last letter before the last digit: on
    random texts of digits, separators, signs, spaces, letters and Unicode digits and minus
    signs it finds what a scan of the whole text finds."""
    rng = random.Random(0)
    alphabet = "0123456789" * 3 + ",./-$ \n\tabxyZ()%\u2212\u0663"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(5000)]
    texts += [text for text, *_ in OUTPUTS if text]
    assert sum(extract_last_number_reference(t) is not None for t in texts) > 4000  # most hold a number
    assert [extract_last_number(t) for t in texts] == [extract_last_number_reference(t) for t in texts]


def test_extractors_and_answer_kinds_take_none():
    for fn in (extract_gsm8k_strict, extract_last_number, extract_boxed, extract_answer_is):
        assert fn(None) is None
    assert list(ANSWER_KINDS) == ["numeric", "math"]
    assert ANSWER_KINDS["numeric"].extract_all("#### 71\nActually 72") == {"strict": "71", "flexible": "72"}
    assert ANSWER_KINDS["math"].extract("The answer is 3/4.") == "3/4"  # no box: "the answer is"


@pytest.mark.parametrize("raw,canonical", [
    ("1,000", "1000"), ("3.50", "3.5"), ("-0", "0"), ("$5", "5"), ("5 (apples)", "5"),
    ("9 apples", "9"), ("3/4", "0.75"), ("0.75", "0.75"), ("1/3", "1/3"), ("-1/3", "-1/3"),
    ("\\frac{2}{4}", "0.5"), ("\\dfrac{1}{3}", "1/3"), ("+7", "7"), ("50%", "50"),
    ("4.0000", "4"), ("0.10", "0.1"), ("\u22125", "-5"), ("12586100868344725", "12586100868344725"),
    ("$\\frac{1}{8}$", "0.125"), ("42.", "42"),
    ("5 years old; 15 years old", None), ("3:30", None), ("1.2.3", None), ("abc", None),
    ("", None), (None, None),
])
def test_normalize_number(raw, canonical):
    assert normalize_number(raw) == canonical


def test_numbers_equal():
    assert numbers_equal("1,234", "1234")
    assert numbers_equal("3.50", "3.5")
    assert numbers_equal("0.5", "1/2")
    assert numbers_equal("$5", "5 (dollars)")
    assert numbers_equal("0.3333333", "1/3")            # within rel_tol
    assert not numbers_equal("0.33", "1/3")
    assert not numbers_equal("12586100868344725", "12586100868344726")  # integers: exact
    assert not numbers_equal("abc", "5")
    assert not numbers_equal(None, "5")


def test_math_equal_equivalences_and_junk():
    for a, b in [("\\frac{1}{2}", "0.5"), ("\\frac{1}{2}", "1/2"), ("0.5", "1/2"),
                 ("x^2", "x^{2}"), ("\\frac{\\pi}{2}", "\\pi/2"), ("\\dfrac{3}{4}", "0.75"),
                 ("1,000", "1000")]:
        assert math_equal(a, b) and math_equal(b, a), (a, b)
    for a, b in [("3", "4"), ("x^2", "x^3"), ("{{{", "}}"), ("", "5"), (None, "5"),
                 ("\\boxed{", "1"), ("\\frac{1}{", "\\frac{1}{2}"), ("(1,2)", "1/2")]:
        assert not math_equal(a, b), (a, b)


def test_math_equal_without_math_verify(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # makes the import fail
    assert math_equal("\\dfrac{1}{2}", "\\frac{1}{2}")        # normalized strings
    assert math_equal("0.5", "1/2")                            # numbers
    assert not math_equal("x^2", "x^{2}")                      # needs sympy
    assert vote_key("x^{2}", "math") == "x^{2}"


def test_vote_key_groups_equivalent_answers():
    def keys(answers, kind):
        return {vote_key(a, kind) for a in answers}
    assert len(keys(["\\frac{1}{2}", "0.5", "1/2", "\\dfrac12", "$\\frac{1}{2}$"], "math")) == 1
    assert len(keys(["x^2", "x^{2}"], "math")) == 1
    assert vote_key("(1,2)", "math") != vote_key("1/2", "math")
    assert len(keys(["1,000", "1000", "$1,000.00", "1000 dollars"], "numeric")) == 1
    assert vote_key("5 (apples)", "numeric") == vote_key("5", "numeric") == "5"
    assert vote_key("blue", "numeric") == "blue"
    assert vote_key(None, "numeric") is None and vote_key("  ", "math") is None
    with pytest.raises(ConfigError, match="numeric"):
        vote_key("5", "text")


# ---------------------------------------------------------------- stats

def test_wilson_interval_known_values():
    ci = accuracy_ci([True] * 50 + [False] * 50)
    assert ci["n"] == 100 and ci["mean"] == 0.5
    assert ci["lo"] == pytest.approx(0.4038, abs=1e-4) and ci["hi"] == pytest.approx(0.5962, abs=1e-4)
    zero = accuracy_ci([0] * 10)  # Wilson: upper bound z^2/n / (1 + z^2/n)
    assert zero["lo"] == 0.0 and zero["hi"] == pytest.approx(0.27753, abs=1e-4)
    assert accuracy_ci([1] * 10)["hi"] == pytest.approx(1.0)
    # exactly 0 and 1 at the ends (computed, the bound can round to 2.8e-17 or 0.9999999999999999)
    assert all(accuracy_ci([0] * n)["lo"] == 0.0 and accuracy_ci([1] * n)["hi"] == 1.0 for n in range(1, 300))
    assert accuracy_ci([1, 0], confidence=0.99)["lo"] < accuracy_ci([1, 0])["lo"]
    empty = accuracy_ci([])
    assert empty["n"] == 0 and math.isnan(empty["mean"])


def test_mean_ci_t_interval():
    ci = mean_ci([1, 2, 3, 4, 5])
    # t(0.975, 4) = 2.776445; half width = 2.776445 * sqrt(2.5) / sqrt(5)
    assert ci["mean"] == 3 and ci["std"] == pytest.approx(math.sqrt(2.5))
    assert ci["lo"] == pytest.approx(3 - 2.776445 * math.sqrt(0.5), abs=1e-5)
    assert ci["hi"] == pytest.approx(3 + 2.776445 * math.sqrt(0.5), abs=1e-5)
    one = mean_ci([0.7])
    assert one["mean"] == 0.7 and math.isnan(one["lo"]) and math.isnan(one["std"])


def test_welch_test_hand_example():
    a = [20.1, 19.8, 20.5, 20.3]          # mean 20.175, var 0.0891667
    b = [19.0, 19.4, 18.9, 19.6, 19.2]    # mean 19.22,  var 0.082
    va, vb = 0.0891667 / 4, 0.082 / 5
    t_hand = (20.175 - 19.22) / math.sqrt(va + vb)
    df_hand = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 4)
    two = welch_test(a, b)
    assert two["t"] == pytest.approx(t_hand, rel=1e-5) and two["df"] == pytest.approx(df_hand, rel=1e-5)
    assert two["t"] == pytest.approx(4.8551, abs=1e-3) and two["df"] == pytest.approx(6.4284, abs=1e-3)
    greater = welch_test(a, b, alternative="greater")
    assert greater["p"] == pytest.approx(student_t.sf(t_hand, df_hand), rel=1e-4)
    assert two["p"] == pytest.approx(2 * greater["p"])
    assert welch_test(a, b, alternative="less")["p"] == pytest.approx(1 - greater["p"])
    # With a margin the question is whether a beats b by more than 0.5.
    margin = welch_test(a, b, alternative="greater", margin=0.5)
    assert margin["t"] == pytest.approx((20.175 - 19.22 - 0.5) / math.sqrt(va + vb), rel=1e-5)
    assert greater["p"] < 0.01 < margin["p"] < 0.05
    with pytest.raises(ConfigError, match="alternative"):
        welch_test(a, b, alternative="bigger")
    with pytest.raises(ConfigError, match="at least 2"):
        welch_test([1.0], b)
