"""Verifiers behind the verifiable rewards (Tülu 3 RLVR, GRPO): (response, ground truth) -> reward.

`VERIFIERS` maps a name to a `Verifier`; calling one returns the reward as a float in [0, 1]:

    name            gives  needs a ground truth  what it checks
    math            bool   yes   the final answer equals the truth (numerically when both are numbers)
    exact           bool   yes   the final text equals the truth, whitespace collapsed, case-sensitive
    format          bool   no    re.search(pattern, response): `pattern=` given, else the ground truth
    ifeval          bool   yes   every IFEval constraint the ground truth names holds (jaxllm.rl.ifeval)
    ifeval_partial  float  yes   the fraction of them that hold (open-instruct's IFEvalVerifier score)
    knights_knaves  bool   yes   every person's role is right (jaxllm.rl.knights_knaves)

`score(name, response, ground_truth, **params)` is `get_verifier(name)(response, ground_truth, **params)`.
`get_verifier` raises UnknownVerifierError for a name not listed; a verifier that needs a ground
truth raises MissingGroundTruthError when the record has none (None, "", [] or {}): the caller
counts the record as skipped. A ground truth the verifier cannot read raises BadGroundTruthError.

math, after open-instruct's `ground_truth_utils.py` (MathVerifier, GSM8KVerifier) and veRL's
`reward_score/math.py` / `gsm8k.py`. The final answer is, in this order of precedence:
  1. the content of the last \\boxed{...} / \\fbox{...} (braces balanced, nesting allowed);
  2. else what follows the last "the answer is" / "final answer:" / "answer:" / "#### " (to the end
     of that line; the inside of $...$ if present; just the number if a number opens it as a word,
     so "42 apples" gives 42);
  3. else the last number in the text ("1,234" is one number, "3/4" a fraction).
A wrong number after a boxed answer therefore does not matter. Both sides are normalised (strip $,
\\left/\\right, LaTeX spaces, \\text{} (dropped when it is a trailing unit), spaces, trailing periods,
a leading "+", "x =", thousands separators, %, trailing ".0"), then compared as numbers when both
read as one (integers and fractions such as \\frac{a}{b}, \\dfrac, \\frac12, a/b, nested, exactly
via fractions.Fraction; decimals to a relative 1e-6, so 0.5 == 1/2), else as strings. The ground
truth may be "\\boxed{..}", a GSM8K solution ending "#### 42", plain, or a list of acceptable answers.
Deliberate differences: no sympy (so "x+1" and "1+x" differ), no unit word lists, a % is dropped on
both sides (50% == 50, but 50% != 0.5).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from fractions import Fraction

from jaxllm.errors import UserError
from jaxllm.rl import ifeval, knights_knaves


class UnknownVerifierError(UserError, ValueError):
    """A verifier name that VERIFIERS does not have."""


class MissingGroundTruthError(UserError, ValueError):
    """A record whose verifier needs a ground truth has none (the caller skips the record)."""


class BadGroundTruthError(UserError, ValueError):
    """A ground truth the verifier cannot read (malformed JSON, unknown constraint, bad regex...)."""


def final_text(response: str) -> str:
    """The response without its reasoning: what follows the last </think>, <answer> tags removed."""
    text = response.split("</think>")[-1]
    return text.replace("<answer>", "").replace("</answer>", "").strip()


# --- math ---

def _group(text: str, start: int) -> tuple[str, int] | None:
    """(content, index after the closing brace) of the brace group opening at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1:i], i + 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...}; None if there is none or it never closes."""
    opens = list(re.finditer(r"\\(?:boxed|fbox)\s*\{", text))
    if not opens:
        bare = re.findall(r"\\boxed\s+([^\s$]+)", text)  # "\boxed 5", as in $\boxed 5$
        return bare[-1] if bare else None
    group = _group(text, opens[-1].end() - 1)
    return group[0] if group else None


_ANSWER_PHRASE = re.compile(r"(?:final answer|the answer)\s*(?:is|:)\s*:?\s*(.+)|\banswer\s*:\s*(.+)|####\s*(.+)",
                            flags=re.IGNORECASE)
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+"
_LEADING_NUMBER = re.compile(r"[-+]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?%?(?=\s|$|[.,;!)])")


def _phrase_answer(text: str) -> str | None:
    matches = list(_ANSWER_PHRASE.finditer(text))
    if not matches:
        return None
    candidate = next(g for g in matches[-1].groups() if g is not None).strip().rstrip(".").strip()
    dollars = re.search(r"\$([^$]+)\$", candidate)
    if dollars:
        return dollars.group(1)
    leading = _LEADING_NUMBER.match(candidate)
    if leading and parse_number(normalize_answer(candidate)) is None:
        return leading.group(0)  # "42 apples" -> 42, but "2x+1" stays whole
    return candidate


def extract_answer(response: str) -> str | None:
    """The final answer of a response (precedence: last boxed, answer phrase, last number)."""
    for found in (last_boxed(response), _phrase_answer(response)):
        if found is not None:
            return found
    numbers = re.findall(_NUMBER, response)
    return numbers[-1] if numbers else None


_REMOVE = ("\\left", "\\right", "\\displaystyle", "\\!", "\\,", "\\;", "\\:", "\\ ", "^{\\circ}", "^\\circ",
           "\\$", "$", "\\(", "\\)", "\\[", "\\]")
_TEXT = r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\{([^{}]*)\}"


def normalize_answer(text: str) -> str:
    """A canonical string for an answer (see the module docstring for the steps)."""
    s = str(text).strip().replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\%", "%")
    for token in _REMOVE:
        s = s.replace(token, "")
    unit = re.search(_TEXT + r"\s*$", s)
    if unit and s[:unit.start()].strip():
        s = s[:unit.start()]  # "10 \text{ cm}" -> "10"
    s = re.sub(_TEXT, r"\1", s)
    s = re.sub(r"\s+", "", s).strip("*").rstrip(".").removeprefix("+")
    if s.count("=") == 1 and len(s.split("=")[0]) <= 2:
        s = s.split("=")[1]  # "x=5" -> "5"
    s = s.replace("{,}", ",")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?%?", s):
        s = s.replace(",", "")
    s = re.sub(r"^(-?\d+)\.0+$", r"\1", s.removesuffix("%"))
    while s.startswith("{") and _group(s, 0) == (s[1:-1], len(s)):
        s = s[1:-1]
    return s


def _frac_parts(rest: str) -> tuple[str, str] | None:
    """Numerator and denominator of \\frac<rest>: each a {group} or a single character (\\frac12)."""
    parts = []
    for _ in range(2):
        if rest.startswith("{"):
            group = _group(rest, 0)
            if group is None:
                return None
            parts.append(group[0])
            rest = rest[group[1]:]
        elif rest:
            parts.append(rest[0])
            rest = rest[1:]
    return (parts[0], parts[1]) if len(parts) == 2 and not rest else None


def parse_number(s: str) -> tuple[Fraction, bool] | None:
    """(value, exact) of a normalised answer that is one number; exact unless a decimal is involved."""
    sign, body = (-1, s[1:]) if s.startswith("-") else (1, s)
    value = None
    if re.fullmatch(r"\d+", body):
        value = (Fraction(int(body)), True)
    elif re.fullmatch(r"(?:\d+\.\d*|\.\d+)(?:e[-+]?\d+)?|\d+e[-+]?\d+", body):
        value = (Fraction(body), False)
    else:
        parts = _frac_parts(body[5:]) if body.startswith("\\frac") else (
            body.split("/") if body.count("/") == 1 else None)
        num, den = [parse_number(normalize_answer(p)) for p in parts] if parts else (None, None)
        if num and den and den[0] != 0:
            value = (num[0] / den[0], num[1] and den[1])
    return (sign * value[0], value[1]) if value else None


def answers_equal(answer: str, truth: str) -> bool:
    """Numeric equality when both read as numbers (exact for integers and fractions, relative 1e-6
    with a decimal), else equality of the normalised strings."""
    a, t = normalize_answer(answer), normalize_answer(truth)
    na, nt = parse_number(a), parse_number(t)
    if na is None or nt is None:
        return a == t
    if na[1] and nt[1]:
        return na[0] == nt[0]
    return na[0] == nt[0] or math.isclose(float(na[0]), float(nt[0]), rel_tol=1e-6)


def truth_answer(ground_truth) -> str:
    """The answer a math ground truth states: its last \\boxed{}, else what follows its last "####",
    else all of it."""
    text = str(ground_truth)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    return text.rsplit("####", 1)[1].strip() if "####" in text else text.strip()


def verify_math(response: str, ground_truth) -> bool:
    """Whether the response's final answer equals the ground truth (or one of a list of them)."""
    answer = extract_answer(response)
    truths = ground_truth if isinstance(ground_truth, (list, tuple)) else [ground_truth]
    return answer is not None and any(answers_equal(answer, truth_answer(t)) for t in truths)


# --- exact, format ---

def verify_exact(response: str, ground_truth) -> bool:
    """The final text (see final_text) equals the ground truth, whitespace runs collapsed to one space
    and ends stripped; case-sensitive ("Paris" != "paris")."""
    return " ".join(final_text(response).split()) == " ".join(str(ground_truth).split())


def verify_format(response: str, ground_truth=None, *, pattern: str | None = None) -> bool:
    """re.search(pattern, response) on the whole response (reasoning included); `pattern` is the
    keyword if given (the config's rl.format_pattern), else the record's ground truth."""
    pattern = pattern or ground_truth
    if is_missing(pattern):
        raise MissingGroundTruthError("verifier 'format' needs a pattern: pass pattern= or a ground truth")
    try:
        return re.search(str(pattern), response) is not None
    except re.error as e:
        raise BadGroundTruthError(f"format: bad regex {pattern!r}: {e}") from None


# --- ifeval, knights_knaves: the ground truth is parsed by the task's module ---

def _parsed(parse: Callable, ground_truth, name: str):
    try:
        return parse(ground_truth)
    except ValueError as e:
        raise BadGroundTruthError(f"{name}: {e}") from None


def ifeval_scores(response: str, ground_truth) -> list[bool]:
    """Whether the final text follows each constraint the ground truth names."""
    return ifeval.check_constraints(final_text(response), _parsed(ifeval.parse_constraints, ground_truth, "ifeval"))


def verify_ifeval(response: str, ground_truth) -> bool:
    """Every constraint holds."""
    return all(ifeval_scores(response, ground_truth))


def verify_ifeval_partial(response: str, ground_truth) -> float:
    """The fraction of the constraints that hold."""
    scores = ifeval_scores(response, ground_truth)
    return sum(scores) / len(scores)


def verify_knights_knaves(response: str, ground_truth) -> bool:
    """Every person's role in the final answer is right (knights_knaves.verify_solution)."""
    roles = _parsed(knights_knaves.parse_solution, ground_truth, "knights_knaves")
    return knights_knaves.check_roles(response, roles)


# --- the registry ---

def is_missing(ground_truth) -> bool:
    """None, a blank string, or an empty list / dict."""
    if isinstance(ground_truth, str):
        return not ground_truth.strip()
    return ground_truth is None or (isinstance(ground_truth, (list, tuple, dict)) and not ground_truth)


@dataclasses.dataclass(frozen=True)
class Verifier:
    """A named check: `fn(response, ground_truth, **params)` gives a bool, or a float in [0, 1] when
    `partial_credit`."""

    name: str
    fn: Callable[..., bool | float]
    needs_ground_truth: bool = True
    partial_credit: bool = False

    def __call__(self, response: str, ground_truth=None, **params) -> float:
        """The reward in [0, 1]; MissingGroundTruthError if a needed ground truth is missing."""
        if self.needs_ground_truth and is_missing(ground_truth):
            raise MissingGroundTruthError(f"verifier {self.name!r} needs a ground truth and the record has none")
        return float(self.fn(response, ground_truth, **params))


VERIFIERS: dict[str, Verifier] = {v.name: v for v in (
    Verifier("math", verify_math),
    Verifier("exact", verify_exact),
    Verifier("format", verify_format, needs_ground_truth=False),
    Verifier("ifeval", verify_ifeval),
    Verifier("ifeval_partial", verify_ifeval_partial, partial_credit=True),
    Verifier("knights_knaves", verify_knights_knaves),
)}


def get_verifier(name: str) -> Verifier:
    """VERIFIERS[name]; UnknownVerifierError (one line, listing the valid names) if there is none."""
    if name not in VERIFIERS:
        raise UnknownVerifierError(f"unknown verifier {name!r}; valid: {', '.join(VERIFIERS)}")
    return VERIFIERS[name]


def score(name: str, response: str, ground_truth=None, **params) -> float:
    """The reward verifier `name` gives `response` against `ground_truth`."""
    return get_verifier(name)(response, ground_truth, **params)
