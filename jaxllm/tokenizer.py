"""Tokenizer command line.

  python -m jaxllm.tokenizer train --input stdlib:train data/*.jsonl --vocab-size 4096 --output tok/sp
  python -m jaxllm.tokenizer encode --model tok/sp.model --text "def f(x):"
  python -m jaxllm.tokenizer decode --model tok/sp.model --ids 1 415 99
"""

from __future__ import annotations

import argparse
import sys
import time

from jaxllm.config import DataConfig
from jaxllm.data.documents import open_source
from jaxllm.data.tokenizer import Tokenizer, load_tokenizer, sample_texts, train_sentencepiece
from jaxllm.errors import UserError, run_cli


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxllm.tokenizer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a SentencePiece model")
    t.add_argument("--input", nargs="+", required=True,
                   help="files, folders, globs (.txt .py .md .jsonl .parquet) or stdlib:train / stdlib:eval")
    t.add_argument("--text-field", default="text", help="JSON field / parquet column holding the text")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--output", required=True, help="output prefix; writes PREFIX.model")
    t.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    t.add_argument("--max-chars", type=int, default=20_000_000, help="characters of text to train on")
    t.add_argument("--eval-fraction", type=float, default=0.02, help="held-out share of stdlib:*")
    t.add_argument("--strict", action="store_true", help="fail on bad input instead of skipping it")
    e = sub.add_parser("encode", help="print the token ids of a text")
    e.add_argument("--model", required=True, help="a SentencePiece .model or a tokenizer.json")
    e.add_argument("--text", required=True)
    e.add_argument("--pieces", action="store_true", help="print pieces instead of ids")
    d = sub.add_parser("decode", help="print the text of token ids")
    d.add_argument("--model", required=True, help="a SentencePiece .model or a tokenizer.json")
    d.add_argument("--ids", type=int, nargs="+", required=True)
    args = p.parse_args(argv)
    if args.command == "train" and args.vocab_size <= 0:
        p.error("--vocab-size must be > 0")
    return run_cli(lambda: _run(args))


def _run(args) -> int:
    if args.command == "train":
        start = time.perf_counter()
        source = open_source(args.input, text_field=args.text_field, strict=args.strict,
                             eval_fraction=args.eval_fraction)
        try:
            path = train_sentencepiece(sample_texts(source, args.max_chars), args.vocab_size, args.output,
                                       model_type=args.model_type, max_chars=args.max_chars)
        except RuntimeError as e:  # SentencePiece's trainer rejects settings the text cannot meet
            raise UserError(f"SentencePiece could not train on {' '.join(args.input)}: {_first_line(e)}") from e
        tok = Tokenizer(path)
        print(f"wrote {path}: {tok.vocab_size} pieces from {len(source)} documents "
              f"in {time.perf_counter() - start:.1f} s")
        return 0
    tok = open_tokenizer(args.model)
    if args.command == "encode":
        ids = tok.encode(args.text)
        print(" ".join(tok.id_to_piece(i) for i in ids) if args.pieces else " ".join(map(str, ids)))
    else:
        bad = [i for i in args.ids if not 0 <= i < tok.vocab_size]
        if bad:
            raise UserError(f"--ids {' '.join(map(str, bad))}: not ids of {args.model} (0 to {tok.vocab_size - 1})")
        print(tok.decode(args.ids))
    return 0


def open_tokenizer(path: str):
    """The SentencePiece .model or Hugging Face tokenizer.json at `path`; a missing file is a
    FileNotFoundError, a file neither library can read a UserError (one line, exit 2)."""
    try:
        return load_tokenizer(DataConfig(tokenizer=path), vocab_size=1 << 31)  # no model bounds the vocabulary
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such SentencePiece .model or tokenizer.json (or folder "
                                "holding one)") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


if __name__ == "__main__":
    sys.exit(main())
