"""Command line of `python -m jaxllm.select`.

  python -m jaxllm.select sample --input POOL.jsonl --fraction 0.05 --out warmup.jsonl [--seed 0]
  python -m jaxllm.select less --train POOL.jsonl --target VAL.jsonl --checkpoints RUN_DIR \\
      [--config CFG] [--fraction 0.05] [--dims 8192] --out selected.jsonl [key=value ...]
  python -m jaxllm.select doremi --config CFG [--reference RUN_DIR] --out weights.yaml [key=value ...]
  python -m jaxllm.select train-rater --config CFG --pairs judgments.jsonl [--criterion C] --out RUN_DIR
  python -m jaxllm.select train-edu --config CFG --annotations scores.jsonl --out RUN_DIR
  python -m jaxllm.select rate --model RUN_DIR --input docs.jsonl --out rated.jsonl \\
      [--threshold T | --tau T --keep-fraction F]

A bad flag or bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

from jaxllm.errors import run_cli
from jaxllm.select.records import SelectError, read_annotations, read_jsonl, read_judgments

COMMANDS = ("sample", "less", "doremi", "train-rater", "train-edu", "rate")


def _parser(command: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"python -m jaxllm.select {command}", description=description)


def _write_jsonl(path: str, records) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _split(n: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) indices: a seeded random eval_fraction (at least one) held out."""
    if not 0 < eval_fraction < 1:
        raise SelectError(f"--eval-fraction must be in (0, 1), got {eval_fraction}")
    k = max(1, round(eval_fraction * n))
    if n - k < 1:
        raise SelectError(f"{n} examples are too few to hold {k} out for evaluation")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[k:]), np.sort(order[:k])


def sample(argv) -> int:
    """A seeded random share of a jsonl file's records, unchanged and in file order: LESS's
    warm-up data (train a LoRA SFT run on it, then `less --checkpoints` that run)."""
    p = _parser("sample", sample.__doc__.splitlines()[0])
    p.add_argument("--input", required=True)
    p.add_argument("--fraction", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    def body():
        if not 0 < args.fraction <= 1:
            raise SelectError(f"--fraction must be in (0, 1], got {args.fraction}")
        records = read_jsonl(args.input, "--input")
        k = max(1, round(args.fraction * len(records)))
        keep = np.sort(np.random.default_rng(args.seed).permutation(len(records))[:k])
        _write_jsonl(args.out, (records[i][1] for i in keep))
        print(f"sample: {k} of {len(records)} records -> {args.out}", file=sys.stderr)

    return run_cli(body)


# ----------------------------------------------------------------------------- rating models


def _rating_parser(command: str) -> argparse.ArgumentParser:
    pairs = command == "train-rater"
    p = _parser(command, "train a QuRater (soft-label Bradley-Terry on judged pairs)" if pairs else
                "train an educational-value regressor on {text, score} annotations")
    p.add_argument("--config", required=True, help="model, tokenizer (model.init_from), optimizer, steps, mesh")
    if pairs:
        p.add_argument("--pairs", required=True, help="jsonl: text_a, text_b, p_b_over_a, criterion")
        p.add_argument("--eval-pairs", help="held-out judgments (default: --eval-fraction of --pairs)")
        p.add_argument("--criterion", help="the criterion to learn when the file holds several")
    else:
        p.add_argument("--annotations", required=True, help="jsonl: text and score (0-5)")
        p.add_argument("--eval-annotations", help="held-out annotations (default: --eval-fraction of them)")
        p.add_argument("--text-field", default="text")
        p.add_argument("--score-field", default="score")
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--out", required=True, help="the run directory of the rating model")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    return p


def _rating_records(args, pairs: bool):
    """(train records, eval records, criterion) in the task's own fields."""
    if pairs:
        def read(path, what):
            a, b, p, c = read_judgments(path, args.criterion, what)
            return [{"text_a": x, "text_b": y, "p_b_over_a": float(q), "criterion": c} for x, y, q in zip(a, b, p)], c
        records, criterion = read(args.pairs, "--pairs")
        held = read(args.eval_pairs, "--eval-pairs")[0] if args.eval_pairs else None
    else:
        def read(path, what):
            texts, scores = read_annotations(path, args.text_field, args.score_field, what)
            return [{"text": t, "score": float(s)} for t, s in zip(texts, scores)], None
        records, criterion = read(args.annotations, "--annotations")
        held = read(args.eval_annotations, "--eval-annotations")[0] if args.eval_annotations else None
    if held is None:
        train_idx, eval_idx = _split(len(records), args.eval_fraction, seed=0)
        records, held = [records[i] for i in train_idx], [records[i] for i in eval_idx]
    return records, held, criterion


def train_rating(argv, command: str) -> int:
    from jaxllm.train import configure, train

    pairs = command == "train-rater"
    args = _rating_parser(command).parse_args(argv)

    def body():
        records, held, criterion = _rating_records(args, pairs)
        data = os.path.join(os.path.abspath(args.out), "data")
        files = {split: os.path.join(data, f"{split}.jsonl") for split in ("train", "eval")}
        cfg = configure(args.config, [*args.overrides, f"task={'rater' if pairs else 'edu'}",
                                      f"data.train=[{files['train']}]", f"data.eval=[{files['eval']}]",
                                      "data.text_field=text", f"trainer.run_dir={args.out}"])
        if cfg is None:
            return 2
        if jax.process_index() == 0:
            _write_jsonl(files["train"], records)
            _write_jsonl(files["eval"], held)
            with open(os.path.join(args.out, "select.json"), "w") as f:
                json.dump({"kind": cfg.task, "criterion": criterion, "train_examples": len(records),
                           "eval_examples": len(held), "source": args.pairs if pairs else args.annotations}, f)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jaxllm.select data written")
        summary = train(cfg)
        metric = "eval_accuracy" if pairs else "eval_f1"
        print(f"{command}: {len(records)} training and {len(held)} held-out examples"
              f"{f' (criterion {criterion})' if criterion else ''}; held-out {metric[5:]} "
              f"{summary['final_eval'].get(metric, float('nan')):.4f} -> {args.out}", file=sys.stderr)
        return 0

    return run_cli(body)


# ----------------------------------------------------------------------------- rating documents


def rate(argv) -> int:
    p = _parser("rate", "score documents with a rating model; keep by threshold or exp(s / tau) sampling")
    p.add_argument("--model", required=True, help="a run of task rater or edu (train-rater / train-edu --out)")
    p.add_argument("--input", required=True, help="jsonl documents")
    p.add_argument("--out", required=True, help="jsonl: the kept documents with their score added")
    p.add_argument("--text-field", default="text")
    p.add_argument("--batch-size", type=int, default=64)
    how = p.add_mutually_exclusive_group()
    how.add_argument("--threshold", type=float, help="keep documents scoring at least this (edu: 2.5 = int score 3)")
    how.add_argument("--tau", type=float, help="sample documents without replacement with P ~ exp(score / tau)")
    p.add_argument("--keep-fraction", type=float, default=0.5, help="the share --tau sampling keeps")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    def body():
        from jaxllm.select.scorers import ModelScorer, int_scores, rating_model_info, sample_by_rating

        if rating_model_info(args.model) is None:
            raise SelectError(f"{args.model}: not a rating model (a run of task rater or edu)")
        if args.batch_size <= 0:
            raise SelectError("--batch-size must be > 0")
        if args.tau is not None and not 0 < args.keep_fraction <= 1:
            raise SelectError(f"--keep-fraction must be in (0, 1], got {args.keep_fraction}")
        records = read_jsonl(args.input, "--input")
        texts = [r.get(args.text_field) for _, r in records]
        bad = next((w for (w, _), t in zip(records, texts) if not isinstance(t, str)), None)
        if bad:
            raise SelectError(f"{bad}: needs {args.text_field!r}, a string")
        scorer = ModelScorer(args.model, batch_size=args.batch_size)
        scores = scorer.score_batch(texts)
        keep = np.arange(len(texts))
        if args.threshold is not None:
            keep = keep[scores >= args.threshold]
        elif args.tau is not None:
            keep = np.sort(sample_by_rating(scores, round(args.keep_fraction * len(texts)), args.tau, args.seed))
        extra = (lambda i: {"edu_int_score": int(int_scores(scores[i]))}) if scorer.kind == "edu" else (lambda i: {})
        _write_jsonl(args.out, ({**records[i][1], scorer.score_key: float(scores[i]), **extra(i)} for i in keep))
        print(f"rate: {len(keep)} of {len(texts)} documents kept -> {args.out} (mean {scorer.score_key} "
              f"{scores.mean():.4f})", file=sys.stderr)

    return run_cli(body)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        print(f"error: the first argument must be one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "sample":
        return sample(rest)
    if command in ("train-rater", "train-edu"):
        return train_rating(rest, command)
    if command == "rate":
        return rate(rest)
    if command == "less":
        from jaxllm.select.less import main as less_main

        return less_main(rest)
    from jaxllm.select.doremi import main as doremi_main

    return doremi_main(rest)
