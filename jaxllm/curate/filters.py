"""The heuristic filters are datatrove's own: C4QualityFilter, C4BadWordsFilter,
GopherQualityFilter, GopherRepetitionFilter, FineWebQualityFilter and LanguageFilter, built from
`CurateConfig` (`kwargs_for` maps `<prefix>_<argument>` keys onto constructor arguments).

Three thin subclasses change where things come from, never a decision:
* `C4Filter` counts the documents it edits (lines dropped, citations stripped) as `modified`;
* `LocalBadWordsFilter` reads its word list from a local file (the shipped small English list by
  default) instead of downloading LDNOOBW's; the regex is datatrove's;
* `LocalLanguageFilter` loads the fastText model from a local file instead of downloading it.
"""

from __future__ import annotations

import inspect
import os
import re

from datatrove.pipeline.filters import (C4BadWordsFilter, C4QualityFilter, FineWebQualityFilter,
                                        GopherQualityFilter, GopherRepetitionFilter, LanguageFilter)
from datatrove.utils.lid import FastTextLID

from jaxllm.curate.config import CurateConfig, ngram_thresholds

BAD_WORDS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "badwords_en.txt")


class C4Filter(C4QualityFilter):
    name = "C4 quality"

    def filter(self, doc):
        before = doc.text
        result = super().filter(doc)
        if result is True and doc.text != before:
            self.stat_update("modified")
        return result


class LocalBadWordsFilter(C4BadWordsFilter):
    name = "C4 bad words"

    def __init__(self, path: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.path = path or BAD_WORDS_PATH

    def _get_badwords(self, lang: str):
        if lang not in self._badwords_regex:
            with open(self.path, encoding="utf-8") as f:  # '#' lines are comments, blank lines nothing
                badwords = {w.strip() for w in f if w.strip() and not w.lstrip().startswith("#")}
            words = [re.escape(w) for w in badwords]
            self._badwords_regex[lang] = (re.compile("|".join(words)) if lang in ("ja", "th", "zh") else
                                          re.compile(r"(?:\W|^)({})(?:\W|$)".format("|".join(words))))
        return self._badwords_regex[lang]


class LocalFastTextLID(FastTextLID):
    """datatrove's fastText language ID with the model read from `path`."""

    def __init__(self, path: str, languages=None):
        super().__init__(languages)
        self.path = path

    @property
    def model(self):
        if self._model is None:
            from fasttext.FastText import _FastText

            self._model = _FastText(self.path)
        return self._model


class LocalLanguageFilter(LanguageFilter):
    name = "language ID"

    def __init__(self, model_path: str, **kwargs):
        super().__init__(**kwargs)
        self.model = LocalFastTextLID(model_path, self.languages)


def kwargs_for(cls, prefix: str, cfg: CurateConfig) -> dict:
    """The constructor arguments of `cls` that `cfg` sets as `<prefix><argument>` (and `language`)."""
    out = {}
    for arg in inspect.signature(cls.__init__).parameters:
        if arg == "language":
            out[arg] = cfg.language
        elif hasattr(cfg, prefix + arg):
            value = getattr(cfg, prefix + arg)
            if cls is C4QualityFilter and value is None:
                value = -1  # C4QualityFilter's "rule off"
            out[arg] = value
    return out


def build_filter(name: str, cfg: CurateConfig, exclusion_writer):
    """The datatrove filter `name` (one of config.FILTER_NAMES) with cfg's settings."""
    if name == "c4":
        return C4Filter(exclusion_writer=exclusion_writer, **kwargs_for(C4QualityFilter, "c4_", cfg))
    if name == "c4_badwords":
        return LocalBadWordsFilter(cfg.c4_badwords_path, keep_fraction=cfg.c4_badwords_keep_fraction,
                                   seed=cfg.c4_badwords_seed, default_language=cfg.language,
                                   exclusion_writer=exclusion_writer)
    if name == "gopher_quality":
        return GopherQualityFilter(exclusion_writer=exclusion_writer, **kwargs_for(GopherQualityFilter, "gopher_", cfg))
    if name == "gopher_repetition":
        kwargs = kwargs_for(GopherRepetitionFilter, "gopher_", cfg)
        kwargs["top_n_grams"] = ngram_thresholds("gopher_top_n_grams", cfg.gopher_top_n_grams)
        kwargs["dup_n_grams"] = ngram_thresholds("gopher_dup_n_grams", cfg.gopher_dup_n_grams)
        return GopherRepetitionFilter(exclusion_writer=exclusion_writer, **kwargs)
    if name == "fineweb_quality":
        kwargs = kwargs_for(FineWebQualityFilter, "fineweb_", cfg)
        if kwargs["stop_chars"] is not None:
            kwargs["stop_chars"] = tuple(kwargs["stop_chars"])
        return FineWebQualityFilter(exclusion_writer=exclusion_writer, **kwargs)
    if name == "language":
        return LocalLanguageFilter(cfg.language_model, languages=cfg.languages,
                                   language_threshold=cfg.language_threshold, backend=cfg.language_backend,
                                   exclusion_writer=exclusion_writer)
    raise ValueError(f"unknown filter {name!r}")  # config.expand_filters lets only known names through
