"""Answers: extraction from model outputs (GSM8K `#### n`, last number, `\\boxed{}`, "The answer
is"), number/LaTeX normalization and equality, and the answer kinds (`ANSWER_KINDS`: numeric,
math) that bundle them with the key majority voting groups by. A task names its kind."""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Callable
from decimal import Decimal, localcontext
from fractions import Fraction

from underpar.registry import Registry

# ---------------------------------------------------------------- numbers

# A number as written in prose: optional sign and `$`, thousands separators, decimals,
# an optional `/denominator`.
_NUMBER = (r"(?P<sign>-)?(?:\$\s?)?(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
           r"(?:\s?/\s?(?P<den>\d+(?:\.\d+)?))?")
_NUMBER_RE = re.compile(_NUMBER)
_DIGIT_RE = re.compile(r"\d")  # the digits _NUMBER_RE's \d takes (any Unicode digit)
_LETTER_RE = re.compile(r"[A-Za-z]")  # characters no number match holds
_STRICT_RE = re.compile(r"####\s*(" + _NUMBER + r")")
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*(-?[\d.,]+)\s*\}\s*\{\s*(-?[\d.,]+)\s*\}")
# What may follow a number in a gold or extracted answer: nothing, a percent sign, or a unit
# ("9 apples", "5 (apples)", "5\text{ cm}", "6th") - never another number, a `;` or a `:`.
_UNIT_TAIL_RE = re.compile(r"\s*(?:%|\\%|[(A-Za-z\\][^\d;:]*)?")


def _clean_number_text(match: re.Match) -> str:
    """The matched number without `$`, thousands commas and spaces."""
    text = ("-" if match["sign"] else "") + match["num"].replace(",", "")
    if match["den"]:
        text += "/" + match["den"]
    return text


def _sign_is_minus(text: str, match: re.Match) -> bool:
    # "3-5" is a range or a subtraction, not the number -5.
    start = match.start()
    return not (start > 0 and (text[start - 1].isalnum() or text[start - 1] in ").]}"))


def extract_gsm8k_strict(text: str | None) -> str | None:
    """The number after the last `#### ` (lm-eval's strict-match pattern; RandOpt takes the last
    match), without `,`, `$` or a trailing `.`; None if there is none."""
    if not text:
        return None
    matches = list(_STRICT_RE.finditer(text))
    if not matches:
        return None
    match = _NUMBER_RE.match(matches[-1].group(1))
    return _clean_number_text(match) if match else None


def extract_last_number(text: str | None) -> str | None:
    """The last number in the text (lm-eval's flexible-extract idea): handles `1,234`, `-5`,
    `$3.50`, `3/4`; returned without `,` and `$` (e.g. "1234", "-5", "3.50", "3/4").

    The last of `_NUMBER_RE`'s left-to-right matches, found without scanning the whole text: it
    holds the text's last digit (every digit is in some match), and no match holds a letter, so
    it is the last match of a scan started right after the last letter before that digit (the
    matches after a letter do not depend on the text before it)."""
    if not text:
        return None
    text = text.replace("\u2212", "-")
    backwards = text[::-1]
    digit = _DIGIT_RE.search(backwards)
    if digit is None:
        return None
    letter = _LETTER_RE.search(backwards, digit.end())
    return _last_number(text, 0 if letter is None else len(text) - letter.start())


def extract_last_number_reference(text: str | None) -> str | None:
    """extract_last_number by a scan of the whole text (what tests and benchmarks hold it to)."""
    return _last_number(text.replace("\u2212", "-"), 0) if text else None


def _last_number(text: str, start: int) -> str | None:
    """The last number match of a scan from `start`, cleaned."""
    last = None
    for match in _NUMBER_RE.finditer(text, start):
        last = match
    if last is None:
        return None
    cleaned = _clean_number_text(last)
    if last["sign"] and not _sign_is_minus(text, last):
        cleaned = cleaned[1:]
    return cleaned


def _to_fraction(text: str | None, strict: bool = False) -> Fraction | None:
    """The exact value of a number-like answer; `strict` demands nothing but the number."""
    if text is None:
        return None
    text = str(text).strip().replace("\u2212", "-").replace("\\$", "$").replace("\\!", "")
    text = _LATEX_FRAC_RE.sub(lambda m: f"{m.group(1)}/{m.group(2)}", text)
    text = text.strip().strip("$").strip().rstrip(".").strip()
    if text.startswith("+"):
        text = text[1:]
    match = _NUMBER_RE.match(text)
    if match is None:
        return None
    tail = text[match.end():]
    if strict and tail.strip():
        return None
    if not _UNIT_TAIL_RE.fullmatch(tail):
        return None
    try:
        value = Fraction(match["num"].replace(",", ""))
        if match["den"]:
            value /= Fraction(match["den"])
    except (ValueError, ZeroDivisionError):
        return None
    return -value if match["sign"] else value


def _format_fraction(value: Fraction) -> str:
    """Integers as integers, terminating decimals as decimals, other rationals as `p/q`."""
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    for prime in (2, 5):
        while den % prime == 0:
            den //= prime
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    with localcontext() as ctx:
        ctx.prec = 2 * len(str(value.denominator)) + len(str(abs(value.numerator))) + 10
        text = format(Decimal(value.numerator) / Decimal(value.denominator), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def normalize_number(text: str | None) -> str | None:
    """Canonical form of a numeric answer, or None: "1,000" -> "1000", "3.50" -> "3.5",
    "-0" -> "0", "$5" -> "5", "5 (apples)" -> "5", "3/4" and "0.75" -> "0.75",
    "\\frac{1}{3}" -> "1/3", "50%" -> "50". Exact (no floats)."""
    value = _to_fraction(text)
    return None if value is None else _format_fraction(value)


def numbers_equal(pred: str | None, gold: str | None, rel_tol: float = 1e-6) -> bool:
    """Numeric equality: exact for integers (so a 17-digit sum off by one is wrong), within
    `rel_tol` otherwise. False when either side is not a number."""
    a, b = _to_fraction(pred), _to_fraction(gold)
    if a is None or b is None:
        return False
    if a == b:
        return True
    if a.denominator == 1 and b.denominator == 1:
        return False
    return abs(a - b) <= rel_tol * max(abs(a), abs(b))


# ---------------------------------------------------------------- LaTeX answers

def _boxed_content(text: str, start: int) -> str | None:
    """The argument of the `\\boxed`/`\\fbox` command starting at `start` (brace matched), or
    None if the braces never close."""
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] != "{":  # "\boxed 5" form: up to the next `$` or space
        match = re.match(r"[^\s$]+", text[i:])
        return match.group(0) if match else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def extract_boxed(text: str | None) -> str | None:
    """The content of the last complete `\\boxed{...}` (or `\\fbox{...}`), nested braces
    matched; None if there is none or it is empty."""
    if not text:
        return None
    starts = [m.start() for m in re.finditer(r"\\boxed|\\fbox", text)]
    for start in reversed(starts):  # an unclosed last box (cut generation) falls back
        content = _boxed_content(text, start)
        if content is not None:
            return content.strip() or None
    return None


_ANSWER_IS_RE = re.compile(r"(?:final answer is|the answer is|answer is|final answer:)\s*:?\s*",
                           re.IGNORECASE)


def extract_answer_is(text: str | None) -> str | None:
    """The answer after the last "The answer is" / "Final Answer: The final answer is X"
    (Minerva, gsm8k_cot, mgsm cot), up to the end of the sentence or line."""
    if not text:
        return None
    matches = list(_ANSWER_IS_RE.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end():]
    boxed = extract_boxed(rest)
    if boxed is not None:
        return boxed
    rest = rest.split("\n", 1)[0]
    rest = re.split(r"\.\s|\. ?I hope", rest, maxsplit=1)[0].strip().rstrip(".").strip()
    if len(rest) >= 2 and rest.startswith("$") and rest.endswith("$"):  # inline math
        rest = rest.strip("$").strip()
    elif re.fullmatch(r"-?\$\s?-?[\d.,]+", rest):  # a dollar amount
        rest = rest.replace("$", "").replace(" ", "")
    return rest or None


def normalize_latex(text: str) -> str:
    """A plain-string canonical form for LaTeX answers when sympy parsing fails: no spaces,
    `$`, `\\left`/`\\right`, `\\!`, `\\,`, `\\text{}` wrappers; `\\dfrac` -> `\\frac`."""
    text = text.strip().strip("$").strip()
    text = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", text)
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""),
                     ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("^\\circ", ""),
                     ("^{\\circ}", ""), ("\\%", ""), ("%", "")):
        text = text.replace(old, new)
    text = re.sub(r"\s+", "", text).rstrip(".")
    return text


def _mv_parse(text: str) -> list:
    """math_verify's parse of an extracted answer (wrapped in `$...$` so bare LaTeX parses);
    [] when math_verify is missing or cannot parse it."""
    try:
        from math_verify import parse
    except ImportError:
        return []
    # math_verify times out with signal.alarm, which only works in the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        parsed = parse(f"${text}$", parsing_timeout=timeout)
        return parsed or parse(text, parsing_timeout=timeout)
    except Exception:  # junk input must never crash scoring
        return []


def math_equal(pred: str | None, gold: str | None) -> bool:
    """Equivalence of two extracted math answers ("\\frac{1}{2}" == "0.5" == "1/2",
    "x^2" == "x^{2}"): numbers exactly, then math_verify's parse + verify when installed,
    else normalized strings. Never raises."""
    if pred is None or gold is None or not str(pred).strip() or not str(gold).strip():
        return False
    pred, gold = str(pred), str(gold)
    a, b = _to_fraction(pred, strict=True), _to_fraction(gold, strict=True)
    if a is not None and b is not None:
        return numbers_equal(pred, gold)
    if normalize_latex(pred) == normalize_latex(gold):
        return True
    gold_parsed, pred_parsed = _mv_parse(gold), _mv_parse(pred)
    if gold_parsed and pred_parsed:
        try:
            from math_verify import verify
            timeout = 5 if threading.current_thread() is threading.main_thread() else None
            return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
        except Exception:
            return False
    return False


# ---------------------------------------------------------------- answer kinds

Extractor = Callable[[str | None], str | None]


@dataclasses.dataclass(frozen=True)
class AnswerKind:
    """One kind of gold answer: how a completion states it, how to read it back, when two
    answers are equal, and the key equal answers share in a majority vote.

    `examples` are groups of answers: equal within a group, different across groups (the
    first of each is canonical); the registry check holds every kind to them."""

    strict: Extractor                       # the task format's extraction (lm-eval strict-match)
    flexible: Extractor                     # the fallback (lm-eval flexible-extract)
    equal: Callable[[str | None, str | None], bool]
    key: Callable[[str], str]               # vote key of a non-empty answer
    completion: Callable[[str], str]        # a canonical completion that states an answer
    examples: tuple[tuple[str, ...], ...] = ()

    def extract_all(self, text: str | None) -> dict[str, str | None]:
        """Both extractions, as lm-eval reports them."""
        return {"strict": self.strict(text), "flexible": self.flexible(text)}

    def extract(self, text: str | None) -> str | None:
        """The strict extraction, else the flexible one."""
        strict = self.strict(text)
        return strict if strict is not None else self.flexible(text)

    def vote_key(self, answer: str | None) -> str | None:
        """The key equivalent answers vote together under; None (no vote) for no answer."""
        if answer is None or not str(answer).strip():
            return None
        return self.key(str(answer))


ANSWER_KINDS: Registry[AnswerKind] = Registry("answer_kind")


def _math_key(answer: str) -> str:
    parsed = _mv_parse(answer)
    if parsed:
        try:
            import sympy
            expr = parsed[0]
            if isinstance(expr, sympy.Float):  # 0.5 and 1/2 should vote together
                expr = sympy.Rational(str(expr))
            return str(expr)
        except Exception:
            pass
    return normalize_latex(answer)


ANSWER_KINDS.register("numeric")(AnswerKind(
    strict=extract_gsm8k_strict, flexible=extract_last_number, equal=numbers_equal,
    key=lambda answer: normalize_number(answer) or answer.strip(),  # "1,000" and "1000.0" are one vote
    completion=lambda answer: f"The result follows.\n#### {answer}",
    examples=(("1000", "1,000", "1000.0", "$1,000"), ("-0.75", "-3/4", "-.75"), ("7", "7 apples")),
))

ANSWER_KINDS.register("math")(AnswerKind(
    strict=extract_boxed, flexible=lambda text: extract_answer_is(text) or extract_last_number(text),
    equal=math_equal,
    key=_math_key,  # sympy's string of math_verify's parse (floats made rational), else normalize_latex
    completion=lambda answer: f"So the answer is $\\boxed{{{answer}}}$.",
    examples=(("\\frac{1}{2}", "0.5", "1/2", "\\dfrac12"), ("x^{2}", "x^2"), ("3", "3.0")),
))


def vote_key(answer: str | None, kind: str) -> str | None:
    """`ANSWER_KINDS[kind].vote_key(answer)`: the key majority voting groups answers by, so
    "1/2", "0.5" and "\\frac{1}{2}" vote together (math), as do "1,000" and "1000" (numeric)."""
    return ANSWER_KINDS[kind].vote_key(answer)
