"""Tokenizer command line.

  python -m jaxllm.tokenizer train --input stdlib:train data/*.jsonl --vocab-size 4096 --output tok/sp
  python -m jaxllm.tokenizer encode --model tok/sp.model --text "def f(x):"
  python -m jaxllm.tokenizer decode --model tok/sp.model --ids 1 415 99
"""

from __future__ import annotations

import argparse
import sys
import time

from jaxllm.data.documents import open_source
from jaxllm.data.tokenizer import Tokenizer, sample_texts, train_sentencepiece


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
    e.add_argument("--model", required=True)
    e.add_argument("--text", required=True)
    e.add_argument("--pieces", action="store_true", help="print pieces instead of ids")
    d = sub.add_parser("decode", help="print the text of token ids")
    d.add_argument("--model", required=True)
    d.add_argument("--ids", type=int, nargs="+", required=True)
    args = p.parse_args(argv)

    try:
        if args.command == "train":
            start = time.perf_counter()
            source = open_source(args.input, text_field=args.text_field, strict=args.strict,
                                 eval_fraction=args.eval_fraction)
            path = train_sentencepiece(sample_texts(source, args.max_chars), args.vocab_size, args.output,
                                       model_type=args.model_type, max_chars=args.max_chars)
            tok = Tokenizer(path)
            print(f"wrote {path}: {tok.vocab_size} pieces from {len(source)} documents "
                  f"in {time.perf_counter() - start:.1f} s")
        elif args.command == "encode":
            tok = Tokenizer(args.model)
            ids = tok.encode(args.text)
            print(" ".join(tok.id_to_piece(i) for i in ids) if args.pieces else " ".join(map(str, ids)))
        else:
            print(Tokenizer(args.model).decode(args.ids))
    except (OSError, ValueError) as err:  # SourceError is a ValueError: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
