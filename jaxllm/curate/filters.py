"""Heuristic document filters: C4 (Raffel et al. 2020) and Gopher quality + repetition
(Rae et al. 2021), following the rules as DataTrove implements them, every rule counted.

A filter maps a document to a `Verdict`: the (possibly edited) text, or None with the rule
that dropped it, plus which line-level rules edited it. Thresholds come from `CurateConfig`;
a threshold of None (YAML null) switches that rule off.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import string

import numpy as np

from jaxllm.curate.config import CurateConfig
from jaxllm.curate.text import ngram_hashes, word_hashes

BAD_WORDS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "badwords_en.txt")


@dataclasses.dataclass
class Verdict:
    text: str | None                    # None: the document is dropped
    rule: str | None = None             # the rule that dropped it
    detail: str = ""                    # the measured value, for the report
    lines_removed: dict = dataclasses.field(default_factory=dict)  # line rule -> lines it removed
    edited: set = dataclasses.field(default_factory=set)           # rules that edited text in place


# ----------------------------------------------------------------------------- C4

_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
_END_MARKS = (".", "?", "!", '"')
_ELLIPSIS = "..."
# A sentence ends at a run of . ! ? (optionally closed by a quote or bracket) before whitespace or
# the end of line; C4 used nltk's punkt here, this regex over-counts abbreviations like "e.g. ".
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


def load_bad_words(path: str | None = None) -> tuple[frozenset, tuple]:
    """(single words, multi-word phrases), lowercased; '#' lines are comments."""
    with open(path or BAD_WORDS_PATH, encoding="utf-8") as f:
        entries = [line.strip().lower() for line in f if line.strip() and not line.lstrip().startswith("#")]
    return frozenset(e for e in entries if " " not in e), tuple(" " + e + " " for e in entries if " " in e)


class C4Filter:
    name = "c4"
    rules = ("long_word", "terminal_punctuation", "too_few_words", "lorem_ipsum", "javascript", "curly_brace",
             "policy", "too_few_sentences", "no_lines_left", "bad_words", "citations")

    def __init__(self, cfg: CurateConfig):
        self.cfg = cfg
        self.bad_words, self.bad_phrases = load_bad_words(cfg.c4_bad_words_path) if cfg.c4_bad_words else ((), ())

    def __call__(self, text: str) -> Verdict:
        cfg = self.cfg
        removed: collections.Counter = collections.Counter()
        edited = set()
        kept, sentences = [], 0
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue  # blank lines separate paragraphs; they are not content lines to count
            words = line.split()
            if cfg.c4_max_word_length is not None and any(len(w) > cfg.c4_max_word_length for w in words):
                removed["long_word"] += 1
                continue
            if cfg.c4_citations:
                stripped = _CITATION.sub("", line)
                if stripped != line:
                    edited.add("citations")
                    line = stripped
            if cfg.c4_terminal_punctuation and (not line.endswith(_END_MARKS) or line.endswith(_ELLIPSIS)):
                removed["terminal_punctuation"] += 1
                continue
            if cfg.c4_min_words_per_line is not None and len(words) < cfg.c4_min_words_per_line:
                removed["too_few_words"] += 1
                continue
            lower = line.lower()
            # As in C4, the document-level rules look only at lines that survived the rules above.
            if cfg.c4_lorem_ipsum and "lorem ipsum" in lower:
                return Verdict(None, "lorem_ipsum", line[:80])
            if cfg.c4_javascript and "javascript" in lower:
                removed["javascript"] += 1
                continue
            if cfg.c4_curly_braces and "{" in line:
                return Verdict(None, "curly_brace", line[:80])
            if cfg.c4_policy and any(p in lower for p in _POLICY):
                removed["policy"] += 1
                continue
            sentences += max(1, len(_SENTENCE_END.findall(line)))
            kept.append(line)
        if cfg.c4_min_sentences is not None and sentences < cfg.c4_min_sentences:
            return Verdict(None, "too_few_sentences", f"{sentences} < {cfg.c4_min_sentences}")
        if not kept:
            return Verdict(None, "no_lines_left")
        out = "\n".join(kept)
        if self.bad_words or self.bad_phrases:
            tokens = re.findall(r"\w+", out.lower())
            hit = next((w for w in tokens if w in self.bad_words), None)
            if hit is None and self.bad_phrases:
                joined = " " + " ".join(tokens) + " "
                hit = next((p.strip() for p in self.bad_phrases if p in joined), None)
            if hit is not None:
                return Verdict(None, "bad_words", hit)
        return Verdict(out, lines_removed=dict(removed), edited=edited)


# ----------------------------------------------------------------------------- Gopher quality

_PUNCT = string.punctuation + "“”‘’«»…–—•·"
_BULLETS = ("•", "-", "*", "‣", "◦", "·", "–", "▪")


class GopherQualityFilter:
    name = "gopher_quality"
    rules = ("min_words", "max_words", "mean_word_length", "hash_ratio", "ellipsis_ratio", "bullet_lines",
             "ellipsis_lines", "alpha_words", "stop_words")

    def __init__(self, cfg: CurateConfig):
        self.cfg = cfg
        self.stop_words = frozenset(w.lower() for w in cfg.gopher_stop_words)

    def __call__(self, text: str) -> Verdict:
        cfg = self.cfg
        words = text.split()
        n = max(len(words), 1)
        # Length rules ignore pure-symbol tokens ("-", "|", "==") and the punctuation around words.
        core = [c for c in (w.strip(_PUNCT) for w in words) if c]
        if cfg.gopher_min_words is not None and len(core) < cfg.gopher_min_words:
            return Verdict(None, "min_words", f"{len(core)} < {cfg.gopher_min_words}")
        if cfg.gopher_max_words is not None and len(core) > cfg.gopher_max_words:
            return Verdict(None, "max_words", f"{len(core)} > {cfg.gopher_max_words}")
        mean = sum(map(len, core)) / max(len(core), 1)
        lo, hi = cfg.gopher_min_mean_word_length, cfg.gopher_max_mean_word_length
        if (lo is not None and mean < lo) or (hi is not None and mean > hi):
            return Verdict(None, "mean_word_length", f"{mean:.2f}")
        if cfg.gopher_max_hash_ratio is not None and text.count("#") / n > cfg.gopher_max_hash_ratio:
            return Verdict(None, "hash_ratio", f"{text.count('#') / n:.3f}")
        ellipses = text.count("...") + text.count("…")
        if cfg.gopher_max_ellipsis_ratio is not None and ellipses / n > cfg.gopher_max_ellipsis_ratio:
            return Verdict(None, "ellipsis_ratio", f"{ellipses / n:.3f}")
        lines = [line.strip() for line in text.splitlines() if line.strip()] or [""]
        bullets = sum(line.startswith(_BULLETS) for line in lines) / len(lines)
        if cfg.gopher_max_bullet_lines is not None and bullets > cfg.gopher_max_bullet_lines:
            return Verdict(None, "bullet_lines", f"{bullets:.3f}")
        trailing = sum(line.endswith(("...", "…")) for line in lines) / len(lines)
        if cfg.gopher_max_ellipsis_lines is not None and trailing > cfg.gopher_max_ellipsis_lines:
            return Verdict(None, "ellipsis_lines", f"{trailing:.3f}")
        alpha = sum(any(c.isalpha() for c in w) for w in words) / n
        if cfg.gopher_min_alpha_words is not None and alpha < cfg.gopher_min_alpha_words:
            return Verdict(None, "alpha_words", f"{alpha:.3f}")
        if cfg.gopher_min_stop_words is not None:
            # "at least two of the following English words" (distinct words, as the paper reads)
            found = self.stop_words.intersection(c.lower() for c in core)
            if len(found) < cfg.gopher_min_stop_words:
                return Verdict(None, "stop_words", ",".join(sorted(found)) or "none")
        return Verdict(text)


# ----------------------------------------------------------------------------- Gopher repetition

_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items that repeat an earlier one, their characters)."""
    seen, count, chars = set(), 0, 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


class GopherRepetitionFilter:
    name = "gopher_repetition"

    def __init__(self, cfg: CurateConfig):
        self.cfg = cfg
        top = {int(k): v for k, v in cfg.gopher_top_ngram_char_frac.items() if v is not None}
        dup = {int(k): v for k, v in cfg.gopher_dup_ngram_char_frac.items() if v is not None}
        self.top, self.dup = sorted(top.items()), sorted(dup.items())
        self.rules = ("dup_para_frac", "dup_para_char_frac", "dup_line_frac", "dup_line_char_frac",
                      *(f"top_{n}gram" for n, _ in self.top), *(f"dup_{n}gram" for n, _ in self.dup))

    def __call__(self, text: str) -> Verdict:
        cfg = self.cfg
        stripped = text.strip()
        size = max(len(stripped), 1)
        paragraphs = _PARAGRAPHS.split(stripped)
        count, chars = _duplicates(paragraphs)
        if cfg.gopher_max_dup_para_frac is not None and count / len(paragraphs) > cfg.gopher_max_dup_para_frac:
            return Verdict(None, "dup_para_frac", f"{count / len(paragraphs):.3f}")
        if cfg.gopher_max_dup_para_char_frac is not None and chars / size > cfg.gopher_max_dup_para_char_frac:
            return Verdict(None, "dup_para_char_frac", f"{chars / size:.3f}")
        lines = _LINES.split(stripped)
        count, chars = _duplicates(lines)
        if cfg.gopher_max_dup_line_frac is not None and count / len(lines) > cfg.gopher_max_dup_line_frac:
            return Verdict(None, "dup_line_frac", f"{count / len(lines):.3f}")
        if cfg.gopher_max_dup_line_char_frac is not None and chars / size > cfg.gopher_max_dup_line_char_frac:
            return Verdict(None, "dup_line_char_frac", f"{chars / size:.3f}")
        words = stripped.split()
        if not (self.top or self.dup) or not words:
            return Verdict(text)
        hashes = word_hashes(words)
        cum = np.concatenate([[0], np.cumsum([len(w) for w in words])])  # characters of words[:i]
        for n, frac in self.top:
            grams = ngram_hashes(hashes, n)
            if len(grams) == 0:
                continue
            uniq, first, counts = np.unique(grams, return_index=True, return_counts=True)
            best = int(np.argmax(counts))
            if counts[best] < 2:
                continue  # a most common n-gram that occurs once is no repetition
            start = int(first[best])
            gram_chars = int(cum[start + n] - cum[start]) + n - 1  # words joined by single spaces
            value = gram_chars * int(counts[best]) / size
            if value > frac:
                return Verdict(None, f"top_{n}gram", f"{value:.3f}")
        for n, frac in self.dup:
            grams = ngram_hashes(hashes, n)
            if len(np.unique(grams)) == len(grams):
                continue  # nothing repeats: skip the Python loop below
            grams = grams.tolist()
            # Characters inside n-grams that repeat an earlier one, each word counted at most once:
            # after a repeat, jump past it (DataTrove's find_all_duplicate).
            seen, repeated, i = set(), 0, 0
            while i < len(grams):
                if grams[i] in seen:
                    repeated += int(cum[i + n] - cum[i])
                    i += n
                else:
                    seen.add(grams[i])
                    i += 1
            if repeated / size > frac:
                return Verdict(None, f"dup_{n}gram", f"{repeated / size:.3f}")
        return Verdict(text)


FILTERS = {"c4": C4Filter, "gopher_quality": GopherQualityFilter, "gopher_repetition": GopherRepetitionFilter}


def build_filters(cfg: CurateConfig) -> list:
    return [FILTERS[name](cfg) for name in cfg.filters]
