"""Curation settings: one flat dataclass, settable from a YAML file (`--config`) and the CLI.

Keys are prefixed by the stage they tune (`c4_`, `gopher_`, `minhash_`, `decontam_`,
`quality_`). A numeric threshold set to null switches that one rule off; a YAML key that is
not a field here is an error naming the key.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml

FILTER_NAMES = ("c4", "gopher_quality", "gopher_repetition")
FILTER_ALIASES = {"gopher": ("gopher_quality", "gopher_repetition")}
DEDUP_NAMES = ("exact", "minhash")


class ConfigError(ValueError):
    """A bad setting; the message is one line naming the key."""


def _list(*items):
    return dataclasses.field(default_factory=lambda: list(items))


@dataclasses.dataclass
class CurateConfig:
    # ---- input / output
    input: list = _list()
    output: str | None = None
    text_field: str = "text"
    strict: bool = False              # fail on bad input lines instead of skipping them
    report: str | None = None         # report JSON path
    removed: str | None = None        # removed.jsonl path: one line per removed document and why
    work_dir: str | None = None       # temporary files (signature shards, survivors); default next to output
    filters: list = _list("c4", "gopher")
    dedup: list = _list("exact", "minhash")
    code: bool = False                # the corpus is code: turns the C4 curly-brace rule off

    # ---- C4 (Raffel et al. 2020; the TF-datasets c4_utils / DataTrove C4QualityFilter rules)
    c4_max_word_length: int | None = 1000   # drop lines with a longer "word" (minified junk)
    c4_citations: bool = True                # strip [1], [edit], [citation needed]
    c4_terminal_punctuation: bool = True     # keep only lines ending in . ! ? " (not ...)
    c4_min_words_per_line: int | None = 3
    c4_lorem_ipsum: bool = True              # drop the document
    c4_javascript: bool = True               # drop lines mentioning javascript
    c4_curly_braces: bool = True             # drop the document ("{" marks code); off for code
    c4_policy: bool = True                   # drop "terms of use", "privacy policy", cookie lines
    c4_min_sentences: int | None = 5         # counted after line filtering
    c4_bad_words: bool = True
    c4_bad_words_path: str | None = None     # default: the small list shipped in this package

    # ---- Gopher quality (Rae et al. 2021, appendix A.1.1)
    gopher_min_words: int | None = 50
    gopher_max_words: int | None = 100_000
    gopher_min_mean_word_length: float | None = 3
    gopher_max_mean_word_length: float | None = 10
    gopher_max_hash_ratio: float | None = 0.1        # "#" per word
    gopher_max_ellipsis_ratio: float | None = 0.1    # "..." / "…" per word
    gopher_max_bullet_lines: float | None = 0.9      # fraction of lines starting with a bullet
    gopher_max_ellipsis_lines: float | None = 0.3    # fraction of lines ending with an ellipsis
    gopher_min_alpha_words: float | None = 0.8       # fraction of words with a letter
    gopher_min_stop_words: int | None = 2            # distinct stop words present
    gopher_stop_words: list = _list("the", "be", "to", "of", "and", "that", "have", "with")

    # ---- Gopher repetition (Rae et al. 2021, table A1)
    gopher_max_dup_line_frac: float | None = 0.3
    gopher_max_dup_para_frac: float | None = 0.3
    gopher_max_dup_line_char_frac: float | None = 0.2
    gopher_max_dup_para_char_frac: float | None = 0.2
    gopher_top_ngram_char_frac: dict = dataclasses.field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    gopher_dup_ngram_char_frac: dict = dataclasses.field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})

    # ---- exact and MinHash-LSH near dedup
    minhash_shingle: str = "word"            # "word" or "char" n-grams
    minhash_ngram: int = 5
    minhash_num_perm: int = 128
    minhash_bands: int | None = None         # bands x rows <= num_perm; null: derived from threshold
    minhash_rows: int | None = None
    minhash_threshold: float = 0.8           # estimated Jaccard a candidate pair must reach
    minhash_shard_docs: int = 100_000        # signatures per on-disk shard
    minhash_seed: int = 42

    # ---- decontamination
    decontaminate: list = _list()            # evaluation sources (any format open_source reads)
    decontam_text_field: str | None = None   # default: text_field
    decontam_ngram: int = 13
    decontam_min_matches: int = 1            # distinct shared n-grams that make a document contaminated

    # ---- model-based quality
    quality_model: str | None = None
    quality_threshold: float | None = None   # keep if P(high quality) >= threshold
    quality_tau: float | None = None         # or sample without replacement with P ∝ exp(logit / tau)
    quality_keep_fraction: float = 0.5       # share of documents the tau sampling keeps
    quality_seed: int = 0

    def __post_init__(self):
        validate(self)


FIELDS = {f.name: f for f in dataclasses.fields(CurateConfig)}


def _type_ok(name: str, value: Any) -> bool:
    optional = "None" in str(FIELDS[name].type)
    if value is None:
        return optional
    if FIELDS[name].type == "bool":
        return isinstance(value, bool)
    if "float" in str(FIELDS[name].type):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if "int" in str(FIELDS[name].type):
        return isinstance(value, int) and not isinstance(value, bool)
    if "str" in str(FIELDS[name].type):
        return isinstance(value, str)
    if FIELDS[name].type == "list":
        return isinstance(value, list)
    if FIELDS[name].type == "dict":
        return isinstance(value, dict) and all(isinstance(k, int) and isinstance(v, (int, float, type(None)))
                                               for k, v in value.items())
    return True


def expand_filters(names) -> list[str]:
    out = []
    for name in names:
        for n in FILTER_ALIASES.get(name, (name,)):
            if n not in FILTER_NAMES:
                raise ConfigError(f"filters: unknown filter {name!r}; choose from "
                                  f"{', '.join(FILTER_NAMES + tuple(FILTER_ALIASES))}, none")
            if n not in out:
                out.append(n)
    return out


def validate(cfg: CurateConfig) -> None:
    for name in ("input", "decontaminate", "filters", "dedup"):  # a lone string means a one-item list
        if isinstance(getattr(cfg, name), str):
            setattr(cfg, name, [getattr(cfg, name)])
    for name in FIELDS:
        if not _type_ok(name, getattr(cfg, name)):
            raise ConfigError(f"{name}: bad value {getattr(cfg, name)!r} (expected {FIELDS[name].type})")
    cfg.filters = expand_filters([f for f in cfg.filters if f != "none"])
    cfg.dedup = [d for d in cfg.dedup if d != "none"]
    for d in cfg.dedup:
        if d not in DEDUP_NAMES:
            raise ConfigError(f"dedup: unknown method {d!r}; choose from {', '.join(DEDUP_NAMES)}, none")
    if cfg.minhash_shingle not in ("word", "char"):
        raise ConfigError(f"minhash_shingle: {cfg.minhash_shingle!r} is neither 'word' nor 'char'")
    if (cfg.minhash_bands is None) != (cfg.minhash_rows is None):
        raise ConfigError("minhash_bands: set both minhash_bands and minhash_rows, or neither")
    if cfg.minhash_bands is not None and cfg.minhash_bands * cfg.minhash_rows > cfg.minhash_num_perm:
        raise ConfigError(f"minhash_bands: {cfg.minhash_bands} x {cfg.minhash_rows} rows exceeds "
                          f"minhash_num_perm={cfg.minhash_num_perm}")
    if not 0 < cfg.minhash_threshold <= 1:
        raise ConfigError(f"minhash_threshold: {cfg.minhash_threshold} is not in (0, 1]")
    if cfg.quality_threshold is not None and cfg.quality_tau is not None:
        raise ConfigError("quality_threshold: set quality_threshold or quality_tau, not both")
    if (cfg.quality_threshold is not None or cfg.quality_tau is not None) and not cfg.quality_model:
        raise ConfigError("quality_model: quality_threshold / quality_tau need a quality_model")
    if cfg.quality_model and cfg.quality_threshold is None and cfg.quality_tau is None:
        raise ConfigError("quality_model: set quality_threshold or quality_tau to filter with it")
    if cfg.quality_tau is not None and cfg.quality_tau <= 0:
        raise ConfigError(f"quality_tau: {cfg.quality_tau} must be > 0")
    if not 0 < cfg.quality_keep_fraction <= 1:
        raise ConfigError(f"quality_keep_fraction: {cfg.quality_keep_fraction} is not in (0, 1]")
    for name in ("minhash_ngram", "minhash_num_perm", "minhash_shard_docs", "decontam_ngram", "decontam_min_matches"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}: {getattr(cfg, name)} must be >= 1")
    if cfg.code:
        cfg.c4_curly_braces = False


def read_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of curate settings")
    for key in raw:
        if key not in FIELDS:
            raise ConfigError(f"{path}: unknown key {key!r}")
    return raw


def load_config(path: str | None, overrides: dict) -> CurateConfig:
    """Defaults, then the YAML file's keys, then the CLI's (only the flags actually given)."""
    values = read_yaml(path) if path else {}
    values.update(overrides)
    try:
        return CurateConfig(**values)
    except TypeError as e:  # only reachable with a bad override name: a programming error
        raise ConfigError(str(e)) from None
