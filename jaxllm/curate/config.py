"""Curation settings: one flat dataclass, settable from a YAML file (`--config`) and the CLI.

A filter's keys are `<prefix>_<argument>`, where <argument> is the datatrove constructor
argument it sets, with datatrove's default (`c4_min_num_sentences` is C4QualityFilter's
`min_num_sentences`; `gopher_` covers GopherQualityFilter and GopherRepetitionFilter,
`fineweb_` FineWebQualityFilter, `minhash_` MinhashConfig, `decontam_` NGramsDecontConfig).
`language` is the word-tokenizer language every datatrove step takes. A Gopher or C4 threshold
set to null switches that rule off. A YAML key that is not a field is an error naming the key;
a key of the hand-written filters this replaced is an error naming its datatrove name.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import yaml

from jaxllm.errors import ConfigError

FILTER_NAMES = ("c4", "c4_badwords", "gopher_quality", "gopher_repetition", "fineweb_quality", "language")
FILTER_ALIASES = {"gopher": ("gopher_quality", "gopher_repetition")}
DEDUP_NAMES = ("exact", "minhash")
EXECUTORS = ("local", "slurm", "ray")
OUTPUT_FORMATS = ("jsonl", "jsonl.gz", "parquet")

RENAMED = {  # keys of the hand-written filters -> the datatrove-named key that replaces them
    "c4_citations": "c4_remove_citations", "c4_terminal_punctuation": "c4_filter_no_terminal_punct",
    "c4_lorem_ipsum": "c4_filter_lorem_ipsum", "c4_javascript": "c4_filter_javascript",
    "c4_curly_braces": "c4_filter_curly_bracket", "c4_policy": "c4_filter_policy",
    "c4_min_sentences": "c4_min_num_sentences", "c4_bad_words": "filters: [..., c4_badwords]",
    "c4_bad_words_path": "c4_badwords_path", "gopher_min_words": "gopher_min_doc_words",
    "gopher_max_words": "gopher_max_doc_words", "gopher_min_mean_word_length": "gopher_min_avg_word_length",
    "gopher_max_mean_word_length": "gopher_max_avg_word_length",
    "gopher_max_hash_ratio": "gopher_max_symbol_word_ratio", "gopher_max_ellipsis_ratio": "gopher_max_symbol_word_ratio",
    "gopher_max_bullet_lines": "gopher_max_bullet_lines_ratio",
    "gopher_max_ellipsis_lines": "gopher_max_ellipsis_lines_ratio",
    "gopher_min_alpha_words": "gopher_max_non_alpha_words_ratio", "gopher_max_dup_line_frac": "gopher_dup_line_frac",
    "gopher_max_dup_para_frac": "gopher_dup_para_frac", "gopher_max_dup_line_char_frac": "gopher_dup_line_char_frac",
    "gopher_max_dup_para_char_frac": "gopher_dup_para_char_frac", "gopher_top_ngram_char_frac": "gopher_top_n_grams",
    "gopher_dup_ngram_char_frac": "gopher_dup_n_grams", "minhash_ngram": "minhash_n_grams",
    "minhash_num_perm": "minhash_num_buckets x minhash_hashes_per_bucket", "minhash_bands": "minhash_num_buckets",
    "minhash_rows": "minhash_hashes_per_bucket", "minhash_threshold": "minhash_num_buckets / minhash_hashes_per_bucket",
    "minhash_shingle": "nothing (datatrove shingles word n-grams)", "minhash_shard_docs": "nothing",
    "decontam_ngram": "decontam_n_grams", "decontam_min_matches": "nothing (one shared n-gram removes a document)",
}


def _list(*items):
    return dataclasses.field(default_factory=lambda: list(items))


def _dict(items=None):
    return dataclasses.field(default_factory=lambda: dict(items or {}))


@dataclasses.dataclass
class CurateConfig:
    # ---- input / output
    input: list = _list()
    output: str | None = None               # a folder (one file per task) or one .jsonl / .jsonl.gz / .parquet file
    output_format: str | None = None        # jsonl, jsonl.gz or parquet; default: from output's suffix, else jsonl
    text_field: str = "text"
    id_field: str = "id"
    strict: bool = False                    # fail on a malformed line or a record without text instead of skipping it
    report: str | None = None               # report JSON path
    removed: str | None = None              # removed.jsonl: one line per removed document and why
    work_dir: str | None = None             # intermediate files and logs; default <output>.work
    keep_work: bool = False                 # keep work_dir after a successful local / ray run
    filters: list = _list("c4", "gopher")
    dedup: list = _list("exact", "minhash")
    code: bool = False                      # the corpus is code: sets c4_filter_curly_bracket false
    language: str = "en"                    # datatrove's `language`: word tokenizer of every step

    # ---- C4QualityFilter (Raffel et al. 2020)
    c4_split_paragraph: bool = True
    c4_remove_citations: bool = True
    c4_filter_no_terminal_punct: bool = True
    c4_min_num_sentences: int | None = 5
    c4_min_words_per_line: int | None = 3
    c4_max_word_length: int | None = 1000
    c4_filter_lorem_ipsum: bool = True
    c4_filter_javascript: bool = True
    c4_filter_curly_bracket: bool = True
    c4_filter_policy: bool = True
    # ---- C4BadWordsFilter, with a local list instead of its download (default: the small list shipped here)
    c4_badwords_path: str | None = None
    c4_badwords_keep_fraction: float = 0.0
    c4_badwords_seed: int | None = None

    # ---- GopherQualityFilter (Rae et al. 2021, appendix A.1.1)
    gopher_min_doc_words: int | None = 50
    gopher_max_doc_words: int | None = 100_000
    gopher_min_avg_word_length: float | None = 3
    gopher_max_avg_word_length: float | None = 10
    gopher_max_symbol_word_ratio: float | None = 0.1
    gopher_max_bullet_lines_ratio: float | None = 0.9
    gopher_max_ellipsis_lines_ratio: float | None = 0.3
    gopher_max_non_alpha_words_ratio: float | None = 0.8   # minimum share of words with a letter
    gopher_min_stop_words: int | None = 2
    gopher_stop_words: list | None = None                 # null: datatrove's eight English stop words
    # ---- GopherRepetitionFilter (Rae et al. 2021, table A1)
    gopher_dup_line_frac: float | None = 0.3
    gopher_dup_para_frac: float | None = 0.3
    gopher_dup_line_char_frac: float | None = 0.2
    gopher_dup_para_char_frac: float | None = 0.2
    gopher_top_n_grams: dict = _dict({2: 0.2, 3: 0.18, 4: 0.16})
    gopher_dup_n_grams: dict = _dict({5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})

    # ---- FineWebQualityFilter (Penedo et al. 2024)
    fineweb_line_punct_thr: float = 0.12
    fineweb_line_punct_exclude_zero: bool = False
    fineweb_stop_chars: list | None = None                # null: datatrove's terminal punctuation
    fineweb_short_line_thr: float = 0.67
    fineweb_short_line_length: int = 30
    fineweb_char_duplicates_ratio: float = 0.01
    fineweb_new_line_ratio: float = 0.3

    # ---- LanguageFilter (fastText language ID), with a local model file instead of its download
    language_model: str | None = None       # lid.176.bin (ft176) or GlotLID's model_v3.bin (glotlid)
    language_backend: str = "ft176"
    languages: list | None = _list("en")    # null: keep any language scoring above the threshold
    language_threshold: float = 0.65

    # ---- exact dedup (ExactDedupSignature / ExactFindDedups / ExactDedupFilter)
    exact_normalize: bool = True            # compare lowercased text with whitespace runs collapsed
    exact_finder_workers: int = 1

    # ---- MinHash dedup (MinhashConfig; datatrove's defaults find pairs above Jaccard ~0.72)
    minhash_n_grams: int = 5
    minhash_num_buckets: int = 14
    minhash_hashes_per_bucket: int = 8
    minhash_seed: int = 1
    minhash_precision: int = 64
    minhash_workers_per_bucket: int = 1

    # ---- decontamination (NGramsDecontFilter against an index of local evaluation files)
    decontaminate: list = _list()           # evaluation sources (any format jaxllm.data reads)
    decontam_text_field: str | None = None  # default: text_field
    decontam_n_grams: int = 12

    # ---- model-based quality (a scorer step; see jaxllm/curate/scoring.py)
    quality_model: str | None = None
    quality_threshold: float | None = None  # keep if P(high quality) >= it; a rating run: its score >= it
    quality_tau: float | None = None        # or sample without replacement with P ∝ exp(logit / tau)
    quality_keep_fraction: float = 0.5      # share of documents the tau sampling keeps
    quality_seed: int = 0

    # ---- executor
    executor: str = "local"
    tasks: int | None = None                # default: one per input file
    workers: int | None = None              # tasks at once; default: CPUs (local), tasks (ray), no limit (slurm)
    slurm_partition: str | None = None
    slurm_time: str | None = None           # e.g. "20:00:00"
    slurm_cpus_per_task: int = 1
    slurm_mem_per_cpu_gb: float = 2
    slurm_qos: str = "normal"
    slurm_job_name: str = "curate"
    slurm_env_command: str | None = None    # e.g. "source ~/venv/bin/activate"
    slurm_sbatch_args: dict = _dict()
    slurm_max_array_size: int = 1001
    slurm_dry_run: bool = False             # write the job scripts; submit nothing
    ray_address: str | None = None          # null: start a local Ray; "auto": join the running cluster
    ray_cpus_per_task: int = 1
    ray_mem_per_cpu_gb: float = 2

    def __post_init__(self):
        validate(self)


FIELDS = {f.name: f for f in dataclasses.fields(CurateConfig)}
_POSITIVE = ("c4_badwords_keep_fraction", "exact_finder_workers", "minhash_n_grams", "minhash_num_buckets",
             "minhash_hashes_per_bucket", "minhash_workers_per_bucket", "decontam_n_grams", "slurm_cpus_per_task",
             "slurm_max_array_size", "ray_cpus_per_task")


def _type_ok(name: str, value: Any) -> bool:
    kind = str(FIELDS[name].type)
    if value is None:
        return "None" in kind
    if kind.startswith("bool"):
        return isinstance(value, bool)
    if kind.startswith("float"):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind.startswith("int"):
        return isinstance(value, int) and not isinstance(value, bool)
    if kind.startswith("str"):
        return isinstance(value, str)
    if kind.startswith("list"):
        return isinstance(value, list)
    if kind.startswith("dict"):
        return isinstance(value, dict)
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


def ngram_thresholds(name: str, table: dict) -> tuple[tuple[int, float], ...]:
    """{n: fraction} (YAML may give n as a string) -> datatrove's ((n, fraction), ...), by n."""
    out = []
    for n, frac in table.items():
        try:
            n = int(n)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: n-gram size {n!r} is not an integer") from None
        if n < 1 or not isinstance(frac, (int, float)) or isinstance(frac, bool):
            raise ConfigError(f"{name}: expected {{n >= 1: fraction}}, got {n!r}: {frac!r}")
        out.append((n, float(frac)))
    return tuple(sorted(out))


def _check_stages(cfg: CurateConfig) -> None:
    cfg.filters = expand_filters([f for f in cfg.filters if f != "none"])
    cfg.dedup = [d for d in cfg.dedup if d != "none"]
    for d in cfg.dedup:
        if d not in DEDUP_NAMES:
            raise ConfigError(f"dedup: unknown method {d!r}; choose from {', '.join(DEDUP_NAMES)}, none")
    ngram_thresholds("gopher_top_n_grams", cfg.gopher_top_n_grams)
    ngram_thresholds("gopher_dup_n_grams", cfg.gopher_dup_n_grams)
    if "language" in cfg.filters and not cfg.language_model:
        raise ConfigError("language_model: the language filter needs a local fastText model file "
                          "(lid.176.bin or GlotLID's model_v3.bin); nothing is downloaded")
    if cfg.language_backend not in ("ft176", "glotlid"):
        raise ConfigError(f"language_backend: {cfg.language_backend!r} is neither 'ft176' nor 'glotlid'")
    if cfg.minhash_precision not in (32, 64):
        raise ConfigError(f"minhash_precision: {cfg.minhash_precision} is neither 32 nor 64")
    if cfg.quality_threshold is not None and cfg.quality_tau is not None:
        raise ConfigError("quality_threshold: set quality_threshold or quality_tau, not both")
    if (cfg.quality_threshold is not None or cfg.quality_tau is not None) and not cfg.quality_model:
        raise ConfigError("quality_model: quality_threshold / quality_tau need a quality_model")
    if cfg.quality_model and cfg.quality_threshold is None and cfg.quality_tau is None:
        raise ConfigError("quality_model: set quality_threshold or quality_tau to filter with it")
    rating_run = cfg.quality_model and os.path.isdir(os.path.expanduser(cfg.quality_model))  # a raw-score threshold
    if cfg.quality_threshold is not None and not rating_run and not 0 <= cfg.quality_threshold <= 1:
        raise ConfigError(f"quality_threshold: {cfg.quality_threshold} is not in [0, 1]")
    if cfg.quality_tau is not None and cfg.quality_tau <= 0:
        raise ConfigError(f"quality_tau: {cfg.quality_tau} must be > 0")
    if not 0 < cfg.quality_keep_fraction <= 1:
        raise ConfigError(f"quality_keep_fraction: {cfg.quality_keep_fraction} is not in (0, 1]")


def _check_executor(cfg: CurateConfig) -> None:
    if cfg.executor not in EXECUTORS:
        raise ConfigError(f"executor: {cfg.executor!r}; choose from {', '.join(EXECUTORS)}")
    for name in ("tasks", "workers"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ConfigError(f"{name}: {getattr(cfg, name)} must be >= 1")
    if cfg.executor == "slurm":
        for name in ("slurm_partition", "slurm_time"):
            if not getattr(cfg, name):
                raise ConfigError(f"{name}: required with executor slurm")
    if cfg.output_format is not None and cfg.output_format not in OUTPUT_FORMATS:
        raise ConfigError(f"output_format: {cfg.output_format!r}; choose from {', '.join(OUTPUT_FORMATS)}")


def validate(cfg: CurateConfig) -> None:
    for name in ("input", "decontaminate", "filters", "dedup", "languages"):  # a lone string means a one-item list
        if isinstance(getattr(cfg, name), str):
            setattr(cfg, name, [getattr(cfg, name)])
    for name in FIELDS:
        if not _type_ok(name, getattr(cfg, name)):
            raise ConfigError(f"{name}: bad value {getattr(cfg, name)!r} (expected {FIELDS[name].type})")
    for name in _POSITIVE:
        if getattr(cfg, name) < (0 if name == "c4_badwords_keep_fraction" else 1):
            raise ConfigError(f"{name}: {getattr(cfg, name)} is out of range")
    _check_stages(cfg)
    _check_executor(cfg)
    if cfg.code:
        cfg.c4_filter_curly_bracket = False


def check_key(key: str, where: str) -> None:
    if key in RENAMED:
        raise ConfigError(f"{where}{key}: renamed to {RENAMED[key]} (datatrove's argument name)")
    if key not in FIELDS:
        raise ConfigError(f"{where}unknown key {key!r}")


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
        check_key(key, f"{path}: ")
    return raw


def load_config(path: str | None, overrides: dict) -> CurateConfig:
    """Defaults, then the YAML file's keys, then the CLI's (only the flags actually given)."""
    values = read_yaml(path) if path else {}
    values.update(overrides)
    for key in values:
        check_key(key, "")
    return CurateConfig(**values)
