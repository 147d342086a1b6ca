"""Command line of `python -m jaxllm.curate`.

  python -m jaxllm.curate --input data/ --output clean.jsonl --report report.json \\
      [--filters c4,gopher,fineweb_quality] [--dedup exact,minhash] [--decontaminate eval.jsonl ...] \\
      [--quality-model q.json (--quality-threshold 0.5 | --quality-tau 2)] [--config curate.yaml] \\
      [--executor local|slurm|ray] [--tasks N] [--workers N] [--set gopher_min_doc_words=20 ...]
  python -m jaxllm.curate train-quality (--labelled ex.jsonl | --positive good/ --negative bad/) --out q.json
  python -m jaxllm.curate prepare --input data/ --tokenizer tok.model --output shards/ [--executor ...]

Inputs are jsonl (also .gz / .zst), parquet and .txt/.py/.md files, folders and globs (as
jaxllm.data reads them), or a URL with a file pattern (s3://bucket/crawl/*.jsonl.gz). The output
is one file (.jsonl, .jsonl.gz, .parquet) or a folder of one file per task. Settings: defaults <
--config YAML < flags; `--set key=value` sets any config key (see jaxllm/curate/config.py).
Exit status 2 on a bad setting or bad input, in one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import numpy as np
import yaml

from jaxllm.curate.cli_args import executor_flags
from jaxllm.curate.config import ConfigError, check_key, load_config
from jaxllm.data.documents import open_source
from jaxllm.errors import UserError, run_cli


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _curate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxllm.curate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)  # only flags given override the config
    p.add_argument("--config", help="YAML file of curate settings")
    p.add_argument("--input", nargs="+", help="files, folders, globs, stdlib:train, or URL patterns")
    p.add_argument("--output", help="kept records: a .jsonl / .jsonl.gz / .parquet file, or a folder")
    p.add_argument("--output-format", dest="output_format", help="jsonl, jsonl.gz or parquet")
    p.add_argument("--text-field", dest="text_field", help="JSON field / parquet column with the text")
    p.add_argument("--id-field", dest="id_field", help="JSON field / parquet column with the record's id")
    p.add_argument("--filters", type=_csv, help="comma list of c4, c4_badwords, gopher, gopher_quality, "
                   "gopher_repetition, fineweb_quality, language; none")
    p.add_argument("--dedup", type=_csv, help="comma list of exact, minhash; none")
    p.add_argument("--decontaminate", nargs="+", help="evaluation sources whose n-grams training must not share")
    p.add_argument("--decontam-n-grams", dest="decontam_n_grams", type=int, help="n of the word n-grams (12)")
    p.add_argument("--quality-model", dest="quality_model", help="model from train-quality (.json / .npz)")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--quality-threshold", dest="quality_threshold", type=float,
                   help="keep documents with P(high quality) >= this")
    q.add_argument("--quality-tau", dest="quality_tau", type=float,
                   help="sample documents with P proportional to exp(logit / tau)")
    p.add_argument("--quality-keep-fraction", dest="quality_keep_fraction", type=float,
                   help="share of documents --quality-tau sampling keeps (0.5)")
    p.add_argument("--code", action="store_const", const=True, help="the corpus is code: no C4 curly-bracket rule")
    p.add_argument("--report", help="report JSON: counts per stage and rule, examples, timings")
    p.add_argument("--removed", help="removed.jsonl: every removed document, stage, rule and why")
    p.add_argument("--keep-work", dest="keep_work", action="store_const", const=True,
                   help="keep the work folder after a successful run")
    p.add_argument("--strict", action="store_const", const=True, help="fail on bad input instead of skipping it")
    p.add_argument("--set", dest="sets", action="append", metavar="KEY=VALUE", help="any config key")
    executor_flags(p)
    return p


def _overrides(args: argparse.Namespace) -> dict:
    values = vars(args)
    values.pop("config", None)
    for item in values.pop("sets", []):
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item}: expected KEY=VALUE")
        check_key(key, "--set: ")
        values[key] = yaml.safe_load(raw) if raw.strip() else None
    return values


def _summary(cfg, result: dict) -> str:
    if "submitted" in result:
        what = "submitted" if result["submitted"] else f"dry run: job scripts in {result['job_scripts']} for"
        return (f"curate: {what} {len(result['stages'])} SLURM stages ({', '.join(result['stages'])}); "
                f"report -> {result['report']}, output -> {result['output']}")
    removed = ", ".join(f"{name} {s['removed']}" for name, s in result["stages"].items())
    t = result["totals"]
    return (f"curate: {t['documents_in']} documents in, {t['documents_out']} out (removed: {removed or 'none'}) "
            f"in {t['seconds']:.1f} s -> {cfg.output}" + (f", report {cfg.report}" if cfg.report else ""))


def curate_main(argv: list[str]) -> int:
    args = _curate_parser().parse_args(argv)
    cfg = load_config(getattr(args, "config", None), _overrides(args))
    for key in ("input", "output"):
        if not getattr(cfg, key):
            raise ConfigError(f"{key}: required (--{key} or the config's {key}:)")
    try:
        from jaxllm.curate.pipeline import curate
    except ImportError as e:
        if (e.name or "").split(".")[0] not in ("datatrove", "spacy", "orjson", "xxhash"):
            raise
        raise UserError(f"curation runs on datatrove ({e.name} is missing): pip install 'jaxllm[curate]'") from None
    result = curate(cfg)
    print(_summary(cfg, result), file=sys.stderr)
    return 0


def _read_labelled(path: str, text_field: str) -> tuple[list[str], list[int]]:
    """A labelled jsonl: one {text_field: str, "label": 0 or 1} object per line."""
    texts, labels = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ConfigError(f"{path}:{lineno}: malformed JSON ({e})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str) or obj.get("label") not in (0, 1):
                raise ConfigError(f"{path}:{lineno}: expected {{{text_field!r}: str, 'label': 0 or 1}}")
            texts.append(obj[text_field])
            labels.append(int(obj["label"]))
    return texts, labels


def train_main(argv: list[str]) -> int:
    from jaxllm.curate import quality

    p = argparse.ArgumentParser(prog="python -m jaxllm.curate train-quality",
                                description="train the hashed uni+bigram logistic-regression quality model")
    p.add_argument("--labelled", nargs="+", default=[], help="jsonl files of {text, label: 0|1}")
    p.add_argument("--positive", nargs="+", default=[], help="sources of high-quality examples (label 1)")
    p.add_argument("--negative", nargs="+", default=[], help="sources of low-quality examples (label 0)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--out", required=True, help="model path (.json, or .npz)")
    p.add_argument("--holdout", type=float, default=0.1, help="share of examples held out to report accuracy")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--l2", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    texts, labels = [], []
    for path in args.labelled:
        t, y = _read_labelled(path, args.text_field)
        texts += t
        labels += y
    for specs, label in ((args.positive, 1), (args.negative, 0)):
        if specs:
            src = open_source(specs, text_field=args.text_field)
            texts += [src[i] for i in range(len(src))]
            labels += [label] * len(src)
    if len(set(labels)) < 2:
        raise ConfigError("train-quality: need examples of both labels (--labelled, or --positive and --negative)")
    order = np.random.default_rng(args.seed).permutation(len(texts))
    n_hold = int(round(args.holdout * len(texts)))
    hold, fit = order[:n_hold], order[n_hold:]
    model = quality.train([texts[i] for i in fit], [labels[i] for i in fit], epochs=args.epochs, l2=args.l2)
    model.save(args.out)
    msg = f"train-quality: {len(fit)} examples ({sum(labels[i] for i in fit)} positive) -> {args.out}"
    if n_hold:
        acc = np.mean([(model.logit(texts[i]) >= 0) == labels[i] for i in hold])
        msg += f"; held-out accuracy {acc:.3f} on {n_hold}"
    print(msg, file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] == "train-quality":
        return run_cli(lambda: train_main(argv[1:]))
    if argv and argv[0] == "prepare":
        from jaxllm.curate.prepare_step import main as prepare_main

        return run_cli(lambda: prepare_main(argv[1:]))
    return run_cli(lambda: curate_main(argv))
