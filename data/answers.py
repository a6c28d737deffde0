"""Final-answer extraction and normalisation: turn a free-form solution into a comparable answer key.

Every extractor maps a completion to a *normalised* key (``""`` when it finds nothing), so two
solutions agree exactly when their keys are equal: ``"$1,250.00"`` and ``"1250"`` both become ``"1250"``,
``"(b)"`` and ``"B"`` both become ``"B"``.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from fractions import Fraction

CURRENCY = "$€£¥₹"
# A number not glued to a preceding word or digit: -1,234.5  12  3/4  $5  50%  (thousands groups must be 3 digits)
NUMBER_RE = re.compile(
    rf"(?<![\w./])(?:-|−)?(?:[{CURRENCY}]\s?)?(?:\d{{1,3}}(?:,\d{{3}})+|\d+)(?:\.\d+)?(?:/\d+)?%?(?![\w/])"
)
GSM8K_RE = re.compile(r"####\s*([^\n]+)")
ANSWER_IS_RE = re.compile(
    r"(?:final\s+answer|answer)\s*(?:is|was|would\s+be|will\s+be|=|:)\s*:?\s*(.+?)(?:\.(?:\s|$)|\n|$)",
    re.IGNORECASE,
)
# "The answer is N, where ..." echoed from an instruction: a placeholder, not an answer
PLACEHOLDER_RE = re.compile(r"\W*[NnXx](?:[\s,.;:'\"*)].*)?", re.DOTALL)
CHOICE_LETTERS = "ABCDEFGHIJ"
_LETTER = rf"[{CHOICE_LETTERS}]"
CHOICE_PATTERNS = (
    re.compile(rf"(?i:answer)\s*(?:(?i:is)|:)?\s*:?\s*\**\(?({_LETTER})\)?\**(?![\w'])"),
    re.compile(rf"\(({_LETTER})\)"),
    re.compile(rf"^\s*\**({_LETTER})(?:[.):]|\**\s*$)", re.MULTILINE),
)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def _to_fraction(s: str) -> Fraction | None:
    s = s.strip().replace("−", "-").replace(",", "").replace(" ", "")
    s = s.strip(CURRENCY).rstrip("%").rstrip(".")
    if s.startswith("-") and s[1:2] in tuple(CURRENCY):
        s = "-" + s[2:]
    if not re.fullmatch(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?", s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _format_fraction(value: Fraction) -> str:
    """Integers as integers, terminating decimals as decimals, anything else as ``p/q``."""
    if value.denominator == 1:
        return str(value.numerator)
    d, twos, fives = value.denominator, 0, 0
    while d % 2 == 0:
        d, twos = d // 2, twos + 1
    while d % 5 == 0:
        d, fives = d // 5, fives + 1
    if d != 1:
        return f"{value.numerator}/{value.denominator}"
    digits = max(twos, fives)
    scaled = abs(value.numerator) * 10**digits // value.denominator
    sign = "-" if value < 0 else ""
    return f"{sign}{scaled // 10**digits}.{scaled % 10**digits:0{digits}d}"


def normalize_number(s: str) -> str:
    """Canonical form of a numeric string (``"$1,000.50"`` -> ``"1000.5"``, ``"18.0"`` -> ``"18"``); ``""`` if
    ``s`` is not a number."""
    value = _to_fraction(str(s))
    return "" if value is None else _format_fraction(value)


def normalize_text(s: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD-style)."""
    s = str(s).lower().translate(_PUNCT_TABLE)
    return " ".join(_ARTICLES_RE.sub(" ", s).split())


def normalize_answer(s: str) -> str:
    """Number -> canonical number, a lone choice letter -> upper-case letter, anything else -> normalised text."""
    s = _strip_latex(str(s)).strip().rstrip(".").strip()
    if number := normalize_number(s):
        return number
    if m := re.fullmatch(rf"\(?({_LETTER})\)?[.:]?", s):
        return m.group(1)
    return normalize_text(s)


def answers_match(a: str, b: str) -> bool:
    """Whether two answers are the same after normalisation (numbers compare by value; empty matches nothing)."""
    a, b = normalize_answer(a), normalize_answer(b)
    if not a or not b:
        return False
    fa, fb = _to_fraction(a), _to_fraction(b)
    if fa is not None and fb is not None:
        return fa == fb
    return a == b


def _strip_latex(s: str) -> str:
    s = re.sub(r"\\[dt]?frac\{\s*(-?\d+)\s*\}\{\s*(\d+)\s*\}", r"\1/\2", s)
    s = re.sub(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", s)
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\^\{?\\circ\}?", "", s)
    s = s.replace("\\$", "$").replace("\\%", "%").replace("\\!", "").replace("\\,", "")
    return s.strip("$ ")


def _span_answer(span: str) -> str:
    """Key of a short span that states an answer: the number in it (after the last '='), else the span itself."""
    span = _strip_latex(span).strip().strip("*").strip()
    if "=" in span:
        span = span.rsplit("=", 1)[1]
    if m := NUMBER_RE.search(span):
        return normalize_number(m.group(0))
    return normalize_answer(span)


def extract_gsm8k(text: str) -> str:
    """The number after the first ``#### `` (GSM8K's marker)."""
    m = GSM8K_RE.search(text)
    number = NUMBER_RE.search(_strip_latex(m.group(1))) if m else None
    return normalize_number(number.group(0)) if number else ""


def _boxed_contents(text: str) -> list[str]:
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end():i - 1])
    return out


def extract_boxed(text: str) -> str:
    """The contents of the last ``\\boxed{...}`` (nested braces allowed)."""
    contents = _boxed_contents(text)
    return _span_answer(contents[-1]) if contents else ""


def extract_answer_is(text: str) -> str:
    """What follows the first "the answer is" / "answer:" (to the end of the sentence) that states a number, else
    the first one. The first, because small models repeat themselves or ramble on after their answer; one with
    a number, because they also echo a placeholder ("The answer is N")."""
    matches = [m.group(1) for m in ANSWER_IS_RE.finditer(text) if m.group(1).strip()]
    numeric = [span for span in matches if NUMBER_RE.search(_strip_latex(span))]
    matches = numeric or [span for span in matches if not PLACEHOLDER_RE.fullmatch(span)]
    return _span_answer(matches[0]) if matches else ""


def extract_last_number(text: str) -> str:
    """The last number in the text."""
    numbers = NUMBER_RE.findall(text)
    return normalize_number(numbers[-1]) if numbers else ""


def extract_choice(text: str) -> str:
    """A multiple-choice letter A-J: after "answer is", else the last "(X)", else a line starting with "X."."""
    for pattern in CHOICE_PATTERNS:
        found = pattern.findall(text)
        if found:
            return found[-1].upper()
    return ""


def extract_text(text: str) -> str:
    """Free-text answer: what follows "the answer is", else the last non-empty line, normalised."""
    matches = [m.group(1) for m in ANSWER_IS_RE.finditer(text) if m.group(1).strip()]
    if matches:
        return normalize_text(matches[0])
    lines = [line for line in text.splitlines() if line.strip()]
    return normalize_text(lines[-1]) if lines else ""


EXTRACTORS: dict[str, Callable[[str], str]] = {
    "gsm8k": extract_gsm8k,
    "boxed": extract_boxed,
    "answer_is": extract_answer_is,
    "last_number": extract_last_number,
    "choice": extract_choice,
    "text": extract_text,
}
AUTO_ORDER = ("gsm8k", "boxed", "answer_is", "last_number")


def closed_answers(method: str) -> tuple[str, ...] | None:
    """The allowed answers of a closed-answer extractor spec (``"positive|negative"``), or None for a named one."""
    if "|" not in method:
        return None
    options = tuple(normalize_text(o) for o in method.split("|"))
    if not all(options) or len(set(options)) != len(options):
        raise ValueError(f"a closed-answer extractor needs distinct non-empty options, got '{method}'")
    return options


def whole_word(word: str) -> re.Pattern[str]:
    """``word`` as a whole word, in any case."""
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)


def extract_closed(text: str, options: tuple[str, ...]) -> str:
    """The allowed answer that ``text`` states first (whole words, any case); ``""`` when it states none."""
    text = normalize_text(text)
    found = [(m.start(), o) for o in options if (m := whole_word(o).search(text))]
    return min(found)[1] if found else ""


def check_extractor(method: str) -> None:
    """Raise ValueError unless ``method`` is ``auto``, a named extractor or a closed-answer spec ``"a|b|..."``."""
    if method != "auto" and method not in EXTRACTORS and closed_answers(method) is None:
        raise ValueError(f"unknown extractor '{method}' (auto, {', '.join(EXTRACTORS)}, or allowed answers "
                         "separated by '|', e.g. 'positive|negative')")


def extract_answer(text: str, method: str = "auto") -> str:
    """Normalised final answer of ``text`` by the named extractor; ``"auto"`` tries gsm8k, boxed, answer_is,
    last_number in turn; ``"a|b|..."`` is a closed answer set (:func:`extract_closed`). Returns ``""`` when
    nothing is found."""
    if options := closed_answers(method):
        return extract_closed(text, options)
    if method == "auto":
        for name in AUTO_ORDER:
            if answer := EXTRACTORS[name](text):
                return answer
        return ""
    check_extractor(method)
    return EXTRACTORS[method](text)
