"""Documents: the sources of pretraining, random-access sequences of `str` documents that grain
reads by index, and `Tokenize` (document -> token ids).

`open_source(specs)` reads the files that `files.resolve_files` finds for each spec:
  * a text file (`.txt`, `.py`, `.md`): one document per file;
  * a `.jsonl` file (also `.jsonl.gz` / `.jsonl.zst`, read through a decompressed copy, see
    jaxllm.data.files): one JSON object per line, text in the field `text_field`;
  * a `.parquet` file: one document per row, text in the column `text_field`;
  * an ArrayRecord file: one document per record, each record a UTF-8 JSON object with the text
    in `text_field`, exactly like a jsonl line (so a jsonl file converts record for record;
    plain text must be wrapped as `{"text": ...}`);
  * token shards (`prepared:DIR`, or a folder holding `manifest.json`): their documents are
    int32 token arrays, not str (`shards.PreparedSource`); `check_prepared` checks them against
    the tokenizer.

Sources hold an index (see jaxllm.data.records), never the text, so memory does not grow with
the corpus. The index is built by one validating pass: bad documents (malformed JSON, invalid
UTF-8, missing field, empty text, the cut-off end of a truncated compressed file) are left out
and counted in `source.skipped`, with one warning per source, or raise `SourceError` naming file
and line when `strict`. Every document a text source returns is therefore a non-empty str.
`file_ids[i]` is the index into `files` of document i's file.
"""

from __future__ import annotations

import collections
import json
from typing import Protocol, Sequence

import numpy as np

from jaxllm.data.files import SourceError, file_kind, prepared_dir, resolve_files
from jaxllm.data.records import ArrayRecords, JsonLines, ParquetRows, Skips, describe, locate
from jaxllm.data.shards import PreparedSource


class DocumentSource(Protocol):
    """What grain's `MapDataset.source` needs, plus the skip counts and the files read."""

    files: list[str]
    skipped: collections.Counter

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> str: ...


def _is_empty(text: str) -> bool:
    return not text.strip()


class TextFileSource:
    """One document per file; the whole file is the document."""

    def __init__(self, paths: Sequence[str], *, strict: bool = False, name: str | None = None):
        skips = Skips(strict)
        self.files = []
        for path in paths:
            with open(path, "rb") as f:
                raw = f.read()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                skips("invalid UTF-8", path, f"byte {e.start}")
                continue
            if _is_empty(text):
                skips("empty document", path)
                continue
            self.files.append(path)
        self.skipped = skips.counts
        skips.report(name or describe(paths), len(self.files))

    @property
    def file_ids(self) -> np.ndarray:
        return np.arange(len(self.files), dtype=np.int32)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> str:
        with open(self.files[index], encoding="utf-8", newline="") as f:  # keep \r\n as is
            return f.read()

    def where(self, index: int) -> str:
        return self.files[index]


def _json_text(line: bytes, field: str, where: str, skips: Skips) -> str | None:
    """The record's text, or None after counting (or, strict, raising for) why it is bad."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        skips("invalid UTF-8", where, f"byte {e.start}")
        return None
    except ValueError as e:
        skips("malformed JSON", where, str(e))
        return None
    text = obj.get(field) if isinstance(obj, dict) else None
    if text is None:
        skips(f"missing field {field!r}", where)
    elif not isinstance(text, str):
        skips(f"field {field!r} is not a string", where)
    elif _is_empty(text):
        skips("empty document", where)
    else:
        return text
    return None


def _good_rows(table, where: str, field: str, skips: Skips) -> np.ndarray:
    """Rows of one row group's text column that hold a non-empty string; counts the others."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = table.column(0)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        # Vectorised check (arrow strings are valid UTF-8); Python only sees the bad rows.
        null = column.is_null().to_numpy(zero_copy_only=False)
        blank = pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0), False)
        blank = blank.to_numpy(zero_copy_only=False)
        for row in np.flatnonzero(null | blank):
            skips(f"missing field {field!r}" if null[row] else "empty document", f"{where}, row {row}")
        return np.flatnonzero(~(null | blank)).astype(np.int32)
    good = []
    for row, value in enumerate(column.to_pylist()):
        if isinstance(value, bytes):  # a binary column: the text must be UTF-8
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as e:
                skips("invalid UTF-8", f"{where}, row {row}", f"byte {e.start}")
                continue
        if value is None:
            skips(f"missing field {field!r}", f"{where}, row {row}")
        elif not isinstance(value, str):
            skips(f"field {field!r} is not a string", f"{where}, row {row}")
        elif _is_empty(value):
            skips("empty document", f"{where}, row {row}")
        else:
            good.append(row)
    return np.asarray(good, np.int32)


class _FieldDocuments:
    """Documents that are one text field of the records of a reader (jaxllm.data.records)."""

    def __init__(self, reader, text_field: str, skips: Skips):
        self._reader, self.text_field = reader, text_field
        self.files, self.file_ids = reader.files, reader.file_ids
        self.skipped = skips.counts
        skips.report(describe(self.files), len(self))

    def __len__(self) -> int:
        return len(self._reader)

    def __getitem__(self, index: int) -> str:
        value = self._reader.record(index)[self.text_field]
        return value.decode("utf-8") if isinstance(value, bytes) else value  # a parquet binary column

    def where(self, index: int) -> str:
        return self._reader.where(index)


class JsonlSource(_FieldDocuments):
    """One JSON object per line; documents are addressed by (file, byte offset, length).

    `.jsonl.gz` / `.jsonl.zst` files are read through their uncompressed copy in `cache_dir`
    (default `data_cache_dir()/decompressed`); messages still name the original file and line.
    """

    def __init__(self, paths: Sequence[str], text_field: str, *, strict: bool = False,
                 cache_dir: str | None = None):
        skips = Skips(strict)
        accept = lambda line, where, skips: _json_text(line, text_field, where, skips) is not None
        super().__init__(JsonLines(paths, accept, skips, cache_dir=cache_dir), text_field, skips)


class ParquetSource(_FieldDocuments):
    """One document per row of column `text_field`, read one row group at a time (see
    `records.ParquetRows`)."""

    def __init__(self, paths: Sequence[str], text_field: str, *, strict: bool = False,
                 cache_row_groups: int = 8):
        skips = Skips(strict)
        good_rows = lambda table, where, skips: _good_rows(table, where, text_field, skips)
        reader = ParquetRows(paths, [text_field], [], good_rows, skips, cache_row_groups=cache_row_groups)
        super().__init__(reader, text_field, skips)


class ArrayRecordSource(_FieldDocuments):
    """One document per ArrayRecord record: a UTF-8 JSON object with the text in `text_field`
    (see `records.ArrayRecords`)."""

    def __init__(self, paths: Sequence[str], text_field: str, *, strict: bool = False,
                 read_batch: int = 1024):
        skips = Skips(strict)
        accept = lambda record, where, skips: _json_text(record, text_field, where, skips) is not None
        super().__init__(ArrayRecords(paths, accept, skips, read_batch=read_batch), text_field, skips)


class ConcatSource:
    """Several sources read as one, in order."""

    def __init__(self, sources: Sequence[DocumentSource]):
        self.sources = list(sources)
        self._ends = np.cumsum([len(s) for s in self.sources], dtype=np.int64)
        self.files = [f for s in self.sources for f in s.files]
        self.skipped = sum((collections.Counter(s.skipped) for s in self.sources), collections.Counter())

    @property
    def file_ids(self) -> np.ndarray:
        ids, offset = [np.zeros(0, np.int32)], 0
        for s in self.sources:
            ids.append(np.asarray(s.file_ids, np.int32) + offset)
            offset += len(s.files)
        return np.concatenate(ids)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index: int) -> str:
        if not 0 <= index < len(self):
            raise IndexError(index)
        part, local = locate(self._ends, index)
        return self.sources[part][local]


def open_source(specs: Sequence[str], *, text_field: str = "text", strict: bool = False,
                eval_fraction: float = 0.02, cache_dir: str | None = None) -> DocumentSource:
    """All documents of `specs`, in spec order, as one random-access source.

    `cache_dir`: where compressed jsonl files are decompressed (default: see jaxllm.data.files).
    """
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise SourceError("no data sources given")
    parts: list[DocumentSource] = []
    for spec in specs:
        folder = prepared_dir(spec)
        if folder is not None:
            parts.append(PreparedSource(folder))
            continue
        by_kind = collections.defaultdict(list)
        for f in resolve_files(spec, eval_fraction=eval_fraction):
            by_kind[file_kind(f)].append(f)
        # A folder may mix kinds; keep each kind's files in order (text, jsonl, parquet, array_record).
        if by_kind["text"]:
            parts.append(TextFileSource(by_kind["text"], strict=strict, name=spec))
        if by_kind["jsonl"]:
            parts.append(JsonlSource(by_kind["jsonl"], text_field, strict=strict, cache_dir=cache_dir))
        if by_kind["parquet"]:
            parts.append(ParquetSource(by_kind["parquet"], text_field, strict=strict))
        if by_kind["array_record"]:
            parts.append(ArrayRecordSource(by_kind["array_record"], text_field, strict=strict))
    source = parts[0] if len(parts) == 1 else ConcatSource(parts)
    if len(source) == 0:
        raise SourceError(f"{', '.join(specs)}: no usable documents (skipped: {dict(source.skipped)})")
    return source


def check_prepared(tokens: np.ndarray, tokenizer, add_bos: bool, add_eos: bool) -> np.ndarray:
    """`tokens` unchanged, after checking that token shards it came from (a `PreparedSource`
    document) were made with this tokenizer and these BOS/EOS settings; raises SourceError naming
    the manifest otherwise. Token arrays from elsewhere pass unchecked."""
    origin = getattr(tokens, "origin", None)
    if origin is not None:
        origin.check(tokenizer, add_bos, add_eos)
    return tokens


class Tokenize:
    """Document -> int32 token array with BOS/EOS as configured (a picklable grain map function).
    Prepared documents (already token arrays) are checked and passed through."""

    def __init__(self, tokenizer, add_bos: bool, add_eos: bool):
        for flag, name, i in ((add_bos, "bos", tokenizer.bos_id), (add_eos, "eos", tokenizer.eos_id)):
            if flag and i < 0:
                raise ValueError(f"data.add_{name} is true but the tokenizer has no {name} piece")
        self.tokenizer = tokenizer
        self.prefix = [tokenizer.bos_id] if add_bos else []
        self.suffix = [tokenizer.eos_id] if add_eos else []

    def __call__(self, text: str | np.ndarray) -> np.ndarray:
        if isinstance(text, np.ndarray):
            return check_prepared(text, self.tokenizer, bool(self.prefix), bool(self.suffix))
        return np.asarray(self.prefix + self.tokenizer.encode(text) + self.suffix, dtype=np.int32)
