"""IFEval instruction-following constraints (Zhou et al. 2023) as verifiable rewards.

Reference followed: google-research `instruction_following_eval/instructions.py` (the `check_following`
of each class) and `instructions_registry.py` (the instruction ids); kwargs keep IFEval's names
(`num_words`, `relation` in ("less than", "at least"), `let_relation`, `capital_relation`,
`section_spliter`, ...). Tülu 3's RLVR IFEval subset names a constraint by open-instruct's
`if_functions.py` `func_name` (`validate_word_constraint`, N, quantifier, ...): `FUNC_NAMES` maps
each to the IFEval check, keeping open-instruct's relations where the instruction differs
("around" N: within max(1, round(N / 10)); keyword/letter frequency: exactly N).

Deliberate differences from IFEval:
- no language detection (no langdetect): english_lowercase / english_capital check only the case,
  and `language:response_language` is not supported (a ValueError names it);
- sentences are counted by a regex splitter (abbreviations, decimals and ellipses kept whole)
  instead of NLTK punkt; capital words are regex words (hyphenated words count once, as IFEval
  says) instead of NLTK tokens;
- keywords, starters and section splitters are matched literally (IFEval puts them unescaped
  into a regex);
- the paragraph divider is `***` or `* * *` (IFEval: `***`; open-instruct's prompt: `* * *`);
- func_name records use IFEval's word counting (regex words, not str.split) and forbidden words on
  word boundaries (open-instruct: substrings).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
from collections.abc import Callable, Mapping


def _around(count: int, n: int) -> bool:
    # open-instruct's tolerance for "around N" (IFEval itself has no "around").
    return abs(count - n) <= max(round(n * 0.1), 1)


RELATIONS: dict[str, Callable[[int, int], bool]] = {
    "less than": lambda count, n: count < n,
    "at least": lambda count, n: count >= n,
    "at most": lambda count, n: count <= n,
    "exactly": lambda count, n: count == n,
    "around": _around,
}


def compare(count: int, n: int, relation: str) -> bool:
    """`count` against the threshold `n` under an IFEval relation (or open-instruct's quantifier)."""
    return RELATIONS[relation](count, int(n))


def count_words(text: str) -> int:
    """IFEval's word count: runs of word characters (so "don't" is two words)."""
    return len(re.findall(r"\w+", text))


# Full stops that do not end a sentence: titles, company suffixes, initials, decimals, ellipses.
_NOT_A_STOP = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|Inc|Ltd|Co|Capt|Lt|vs|etc|e\.g|i\.e)\."
                         r"|\b[A-Za-z]\.(?=[A-Za-z]\.)|(?<=\b[A-Z])\.(?=\s)|(?<=\d)\.(?=\d)|\.{2,}")


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`: split after . ! ? (and closing quotes) followed by space or the end."""
    masked = _NOT_A_STOP.sub(lambda m: "\0" * len(m.group(0)), text)
    pieces, start = [], 0
    for m in re.finditer(r"[.!?][\"'”’)]*(?=\s|$)", masked):
        pieces.append(text[start:m.end()])
        start = m.end()
    pieces.append(text[start:])
    return [p.strip() for p in pieces if p.strip()]


# --- the checks: (response, **IFEval kwargs) -> bool ---

def number_words(text: str, num_words: int, relation: str) -> bool:
    return compare(count_words(text), num_words, relation)


def number_sentences(text: str, num_sentences: int, relation: str) -> bool:
    return compare(len(split_sentences(text)), num_sentences, relation)


def number_paragraphs(text: str, num_paragraphs: int) -> bool:
    """Paragraphs split by the markdown divider; an empty paragraph between two dividers fails."""
    paragraphs = re.split(r"\s?\*\s?\*\s?\*\s?", text)
    count = len(paragraphs)
    for i, paragraph in enumerate(paragraphs):
        if not paragraph.strip():
            if 0 < i < len(paragraphs) - 1:
                return False
            count -= 1  # nothing before the first divider or after the last is not a paragraph
    return count == int(num_paragraphs)


def nth_paragraph_first_word(text: str, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    """Paragraphs split by blank lines ("\\n\\n"): the count matches and paragraph n (1-based) starts
    with `first_word`, case-insensitively, ignoring leading quotes and trailing punctuation."""
    paragraphs = text.split("\n\n")
    count = sum(1 for p in paragraphs if p.strip())
    nth = int(nth_paragraph)
    if not 1 <= nth <= count or not paragraphs[nth - 1].strip():
        return False
    word = paragraphs[nth - 1].split()[0].lstrip("'\"")
    word = re.split(r"[.,?!'\"]", word)[0].lower()
    return count == int(num_paragraphs) and word == first_word.lower()


def keyword_existence(text: str, keywords: list[str]) -> bool:
    return all(re.search(re.escape(k), text, flags=re.IGNORECASE) for k in keywords)


def keyword_frequency(text: str, keyword: str, frequency: int, relation: str, whole_words: bool = False) -> bool:
    """Occurrences of `keyword`, case-insensitively: substrings as IFEval, or whole words
    (open-instruct's `verify_keyword_frequency`)."""
    pattern = re.escape(keyword.strip())
    if whole_words:
        pattern = rf"(?<!\w){pattern}(?!\w)"
    return compare(len(re.findall(pattern, text, flags=re.IGNORECASE)), frequency, relation)


def forbidden_words(text: str, forbidden_words: list[str]) -> bool:
    return not any(re.search(rf"\b{re.escape(w)}\b", text, flags=re.IGNORECASE) for w in forbidden_words)


def letter_frequency(text: str, letter: str, let_frequency: int, let_relation: str) -> bool:
    return compare(text.lower().count(letter.strip().lower()), let_frequency, let_relation)


def english_lowercase(text: str) -> bool:
    return text.islower()


def english_capital(text: str) -> bool:
    return text.isupper()


def capital_word_frequency(text: str, capital_frequency: int, capital_relation: str) -> bool:
    words = re.findall(r"\w+(?:[-']\w+)*", text)
    return compare(sum(w.isupper() for w in words), capital_frequency, capital_relation)


def json_format(text: str) -> bool:
    """The whole response parses as JSON, optionally inside a ``` / ```json fence."""
    body = text.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        body = body.removeprefix(fence)
    body = body.removesuffix("```").strip()
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def title(text: str) -> bool:
    return any(t.strip("<>").strip() for t in re.findall(r"<<[^\n]+>>", text))


def constrained_start(text: str, starter: str) -> bool:
    """Some line starts with `starter` (IFEval's regex is multiline)."""
    return re.search(rf"^\s*{re.escape(starter.strip())}", text, flags=re.MULTILINE) is not None


def number_bullet_lists(text: str, num_bullets: int) -> bool:
    stars = re.findall(r"^\s*\*[^*].*$", text, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", text, flags=re.MULTILINE)
    return len(stars) + len(dashes) == int(num_bullets)


def number_highlighted_sections(text: str, num_highlights: int) -> bool:
    """*italic* and **bold** spans on one line with non-blank content (IFEval counts both kinds)."""
    single = [h for h in re.findall(r"\*[^\n*]*\*", text) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n*]*\*\*", text) if h[2:-2].strip()]
    return len(single) + len(double) >= int(num_highlights)


def multiple_sections(text: str, section_spliter: str, num_sections: int) -> bool:
    """At least `num_sections` headers "<spliter> <number>" (e.g. "Section 1")."""
    pattern = rf"\s?{re.escape(section_spliter.strip())}\s?\d+\s?"
    return len(re.split(pattern, text)) - 1 >= int(num_sections)


def constrained_response(text: str, options: tuple[str, ...] = (
        "My answer is yes.", "My answer is no.", "My answer is maybe.")) -> bool:
    return any(option in text.strip() for option in options)


def postscript(text: str, postscript_marker: str) -> bool:
    """A postscript starting with the marker ("P.S." and "P.P.S" allow spaces between letters)."""
    marker = postscript_marker.strip()
    pattern = {"P.P.S": r"\s*p\.\s?p\.\s?s", "P.S.": r"\s*p\.\s?s\."}.get(marker, r"\s*" + re.escape(marker.lower()))
    return re.search(pattern + r".*$", text.lower(), flags=re.MULTILINE) is not None


def number_placeholders(text: str, num_placeholders: int) -> bool:
    return len(re.findall(r"\[.*?\]", text)) >= int(num_placeholders)


def end_checker(text: str, end_phrase: str) -> bool:
    return text.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def quotation(text: str) -> bool:
    body = text.strip()
    return len(body) > 1 and body[0] == '"' and body[-1] == '"'


def no_comma(text: str) -> bool:
    return "," not in text


def two_responses(text: str) -> bool:
    """Exactly two different non-empty responses separated by "******"."""
    parts = text.split("******")
    kept = []
    for i, part in enumerate(parts):
        if part.strip():
            kept.append(part.strip())
        elif 0 < i < len(parts) - 1:
            return False
    return len(kept) == 2 and kept[0] != kept[1]


def repeat_prompt(text: str, prompt_to_repeat: str) -> bool:
    return text.strip().lower().startswith(prompt_to_repeat.strip().lower())


CHECKS: dict[str, Callable[..., bool]] = {
    "length_constraints:number_words": number_words,
    "length_constraints:number_sentences": number_sentences,
    "length_constraints:number_paragraphs": number_paragraphs,
    "length_constraints:nth_paragraph_first_word": nth_paragraph_first_word,
    "keywords:existence": keyword_existence,
    "keywords:frequency": keyword_frequency,
    "keywords:forbidden_words": forbidden_words,
    "keywords:letter_frequency": letter_frequency,
    "change_case:english_lowercase": english_lowercase,
    "change_case:english_capital": english_capital,
    "change_case:capital_word_frequency": capital_word_frequency,
    "detectable_format:json_format": json_format,
    "detectable_format:title": title,
    "detectable_format:number_bullet_lists": number_bullet_lists,
    "detectable_format:number_highlighted_sections": number_highlighted_sections,
    "detectable_format:multiple_sections": multiple_sections,
    "detectable_format:constrained_response": constrained_response,
    "detectable_content:postscript": postscript,
    "detectable_content:number_placeholders": number_placeholders,
    "multi-turn:constrained_start": constrained_start,
    "startend:end_checker": end_checker,
    "startend:quotation": quotation,
    "punctuation:no_comma": no_comma,
    "combination:two_responses": two_responses,
    "combination:repeat_prompt": repeat_prompt,
}

# open-instruct func_name -> (IFEval id, {their kwarg: IFEval kwarg}, fixed kwargs).
FUNC_NAMES: dict[str, tuple[str, dict[str, str], dict]] = {
    "verify_keywords": ("keywords:existence", {"keyword_list": "keywords"}, {}),
    "verify_keyword_frequency": ("keywords:frequency", {"word": "keyword", "N": "frequency"},
                                 {"relation": "exactly", "whole_words": True}),
    "validate_forbidden_words": ("keywords:forbidden_words", {}, {}),
    "verify_letter_frequency": ("keywords:letter_frequency", {"N": "let_frequency"}, {"let_relation": "exactly"}),
    "verify_paragraph_count": ("length_constraints:number_paragraphs", {"N": "num_paragraphs"}, {}),
    "validate_word_constraint": ("length_constraints:number_words", {"N": "num_words", "quantifier": "relation"}, {}),
    "verify_sentence_constraint": ("length_constraints:number_sentences",
                                   {"N": "num_sentences", "quantifier": "relation"}, {}),
    "validate_paragraphs": ("length_constraints:nth_paragraph_first_word",
                            {"N": "num_paragraphs", "i": "nth_paragraph"}, {}),
    "verify_postscript": ("detectable_content:postscript", {}, {}),
    "validate_placeholders": ("detectable_content:number_placeholders", {"N": "num_placeholders"}, {}),
    "verify_bullet_points": ("detectable_format:number_bullet_lists", {"N": "num_bullets"}, {}),
    "validate_title": ("detectable_format:title", {}, {}),
    "validate_choice": ("detectable_format:constrained_response", {}, {}),
    "validate_highlighted_sections": ("detectable_format:number_highlighted_sections", {"N": "num_highlights"}, {}),
    "validate_sections": ("detectable_format:multiple_sections",
                          {"N": "num_sections", "section_splitter": "section_spliter"}, {}),
    "validate_json_format": ("detectable_format:json_format", {}, {}),
    "validate_repeat_prompt": ("combination:repeat_prompt", {"original_prompt": "prompt_to_repeat"}, {}),
    "validate_two_responses": ("combination:two_responses", {}, {}),
    "validate_uppercase": ("change_case:english_capital", {}, {}),
    "validate_lowercase": ("change_case:english_lowercase", {}, {}),
    "validate_frequency_capital_words": ("change_case:capital_word_frequency",
                                         {"N": "capital_frequency", "quantifier": "capital_relation"}, {}),
    "validate_end": ("startend:end_checker", {}, {}),
    "validate_quotation": ("startend:quotation", {}, {}),
    "validate_no_commas": ("punctuation:no_comma", {}, {}),
}


@dataclasses.dataclass(frozen=True)
class Constraint:
    """One IFEval instruction: its id (a key of CHECKS) and the kwargs of its check."""

    instruction_id: str
    kwargs: Mapping

    def check(self, response: str) -> bool:
        return CHECKS[self.instruction_id](response, **self.kwargs)


def make_constraint(instruction_id: str, kwargs: Mapping | None) -> Constraint:
    """A Constraint with its kwargs checked against the check's signature (None values dropped,
    as IFEval and open-instruct do); ValueError names what is wrong."""
    if instruction_id not in CHECKS:
        raise ValueError(f"unsupported IFEval instruction {instruction_id!r}; supported: {', '.join(CHECKS)}")
    kwargs = {k: v for k, v in (kwargs or {}).items() if v is not None}
    if isinstance(kwargs.get("options"), list):
        kwargs["options"] = tuple(kwargs["options"])
    try:
        inspect.signature(CHECKS[instruction_id]).bind("", **kwargs)
    except TypeError as e:
        raise ValueError(f"IFEval {instruction_id}: {e}") from None
    for key, value in kwargs.items():
        if key.endswith("relation") and value not in RELATIONS:
            raise ValueError(f"IFEval {instruction_id}: {key} {value!r} is not one of {', '.join(RELATIONS)}")
    return Constraint(instruction_id, kwargs)


def _from_func_name(record: Mapping) -> Constraint:
    kwargs = dict(record)
    name = kwargs.pop("func_name")
    if name not in FUNC_NAMES:
        raise ValueError(f"unsupported IFEval func_name {name!r}; supported: {', '.join(FUNC_NAMES)}")
    instruction_id, renames, fixed = FUNC_NAMES[name]
    return make_constraint(instruction_id, {renames.get(k, k): v for k, v in kwargs.items()} | fixed)


def _from_instruction_ids(record: Mapping) -> list[Constraint]:
    ids, kwargs = record["instruction_id"], record.get("kwargs")
    if isinstance(ids, str):
        return [make_constraint(ids, kwargs)]
    kwargs = kwargs if kwargs is not None else [{}] * len(ids)
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        raise ValueError(f"IFEval ground truth: {len(ids)} instruction ids need a list of as many kwargs")
    return [make_constraint(i, k) for i, k in zip(ids, kwargs)]


def _decode(ground_truth):
    # Records hold JSON; open-instruct's newer IFEval labels are Python reprs of a list of dicts.
    if not isinstance(ground_truth, str):
        return ground_truth
    try:
        return json.loads(ground_truth)
    except ValueError:
        pass
    try:
        return ast.literal_eval(ground_truth)
    except (ValueError, SyntaxError):
        raise ValueError(f"IFEval ground truth is neither JSON nor a Python literal: {ground_truth[:80]!r}") from None


def parse_constraints(ground_truth) -> list[Constraint]:
    """The constraints a ground truth names: a dict (or its JSON string) {"func_name": ..., **kwargs}
    or {"instruction_id": id or [ids], "kwargs": kwargs or [kwargs]}, or a list of such dicts (a
    JSON string inside the list is decoded too). ValueError if malformed or unsupported."""
    decoded = _decode(ground_truth)
    records = decoded if isinstance(decoded, list) else [decoded]
    constraints = []
    for record in records:
        record = _decode(record)
        if isinstance(record, Mapping) and "func_name" in record:
            constraints.append(_from_func_name(record))
        elif isinstance(record, Mapping) and "instruction_id" in record:
            constraints.extend(_from_instruction_ids(record))
        else:
            raise ValueError(f"IFEval ground truth needs func_name or instruction_id, got {str(record)[:80]!r}")
    if not constraints:
        raise ValueError("IFEval ground truth names no constraint")
    return constraints


def check_constraints(response: str, constraints: list[Constraint]) -> list[bool]:
    """Whether `response` follows each constraint; an empty response follows none (as open-instruct)."""
    if not response.strip():
        return [False] * len(constraints)
    return [c.check(response) for c in constraints]

