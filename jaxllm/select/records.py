"""The inputs of the selection tools, read and checked: jsonl records, QuRating judgments,
educational-value annotations, and the rows a rating model reads.

Every problem with what the user gave is a `SelectError`: one line naming the file and line.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from jaxllm.data.rows import padding_row
from jaxllm.errors import UserError


class SelectError(UserError, ValueError):
    """A problem with a selection tool's input, said in one line."""


def read_jsonl(path: str, what: str) -> list[tuple[str, dict]]:
    """(where, record) of every non-empty line of a jsonl file (`what` names the flag)."""
    if not os.path.isfile(path):
        raise SelectError(f"{what} {path}: no such file")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except ValueError as e:
                raise SelectError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(record, dict):
                raise SelectError(f"{where}: expected a JSON object, got {type(record).__name__}")
            out.append((where, record))
    if not out:
        raise SelectError(f"{what} {path}: no records")
    return out


def _text(record: dict, field: str, where: str) -> str:
    value = record.get(field)
    if not isinstance(value, str):
        raise SelectError(f"{where}: needs {field!r}, a string (has {', '.join(sorted(record)) or 'no fields'})")
    return value


def _number(record: dict, field: str, where: str) -> float:
    value = record.get(field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SelectError(f"{where}: {field} must be a finite number, got {value!r}")
    return float(value)


def _records(paths, what: str):
    for path in [paths] if isinstance(paths, str) else paths:
        yield from read_jsonl(path, what)


def read_judgments(paths, criterion: str | None = None, what: str = "--pairs"):
    """QuRating judgments (text_a, text_b, p_b_over_a, criterion): (texts_a, texts_b, p float64
    [N], criterion) of the records of `criterion` (None: the files must hold one criterion, or
    records without one)."""
    a, b, p, seen = [], [], [], set()
    for where, r in _records(paths, what):
        c = r.get("criterion")
        if c is not None and not isinstance(c, str):
            raise SelectError(f"{where}: criterion must be a string, got {c!r}")
        seen.add(c)
        if criterion is not None and c != criterion:
            continue
        prob = _number(r, "p_b_over_a", where)
        if not 0.0 <= prob <= 1.0:
            raise SelectError(f"{where}: p_b_over_a {prob:g} is outside [0, 1]")
        a.append(_text(r, "text_a", where))
        b.append(_text(r, "text_b", where))
        p.append(prob)
    if criterion is None and len(seen) > 1:
        raise SelectError(f"{what} holds criteria {', '.join(sorted(map(str, seen)))}: choose one with --criterion")
    if not p:
        raise SelectError(f"{what}: no judgments of criterion {criterion!r} (criteria there: "
                          f"{', '.join(sorted(map(str, seen)))})")
    return a, b, np.asarray(p, np.float64), criterion if criterion is not None else next(iter(seen))


def read_annotations(paths, text_field: str = "text", score_field: str = "score", what: str = "--annotations"):
    """Educational-value annotations: (texts, scores float64 [N])."""
    texts, scores = [], []
    for where, r in _records(paths, what):
        texts.append(_text(r, text_field, where))
        scores.append(_number(r, score_field, where))
    return texts, np.asarray(scores, np.float64)


class TextRows:
    """Text -> one row for a rating model: [BOS] + the text's tokens (+ EOS), cut to seq_len
    tokens keeping the start, segment 1; the scalar head reads the last real position."""

    def __init__(self, tokenizer, seq_len: int, add_bos: bool = True, add_eos: bool = True):
        self.tokenizer, self.seq_len, self.add_bos, self.add_eos = tokenizer, seq_len, add_bos, add_eos
        self.truncated = 0

    def __call__(self, text: str) -> dict[str, np.ndarray]:
        ids = ([self.tokenizer.bos_id] if self.add_bos else []) + list(self.tokenizer.encode(text))
        if self.add_eos:
            ids.append(self.tokenizer.eos_id)
        if not ids:  # an empty text without BOS / EOS: one padding token still gives a score
            ids = [self.tokenizer.pad_id]
        self.truncated += len(ids) > self.seq_len
        ids = ids[:self.seq_len]
        row = padding_row(self.seq_len, self.tokenizer.pad_id)
        n = len(ids)
        row["tokens"][:n] = ids
        row["positions"][:n] = np.arange(n, dtype=np.int32)
        row["segment_ids"][:n] = 1
        return row

    def stack(self, texts) -> dict[str, np.ndarray]:
        """tokens, positions, segment_ids int32 [N, seq_len] of many texts."""
        rows = [self(t) for t in texts]
        return {k: np.stack([r[k] for r in rows]) for k in ("tokens", "positions", "segment_ids")}
