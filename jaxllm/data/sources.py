"""Document sources: random-access sequences of `str` documents that grain reads by index.

A source spec is one of
  * a text file (`.txt`, `.py`, `.md`): one document per file;
  * a `.jsonl` file: one JSON object per line, text in the field `text_field`;
  * a `.parquet` file: one document per row, text in the column `text_field`;
  * a folder (searched recursively for those suffixes, hidden entries skipped) or a glob
    (`**` allowed), e.g. a Hugging Face dataset's folder of parquet shards;
  * `stdlib:train` / `stdlib:eval`: the Python standard library's own `.py` files, split
    deterministically by a hash of each file's relative path.

Sources hold an index (paths, byte offsets, row-group positions), never the text, so memory
does not grow with the corpus. The index is built by one validating pass: bad documents
(malformed JSON, invalid UTF-8, missing field, empty text) are left out and counted in
`source.skipped`, with one warning per source, or raise `SourceError` naming file and line
when `strict`. Every document a source returns is therefore a non-empty str.
"""

from __future__ import annotations

import array
import collections
import glob
import hashlib
import json
import logging
import os
import sysconfig
import threading
from typing import Protocol, Sequence

import numpy as np

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".py", ".md")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
STDLIB_SPLITS = ("stdlib:train", "stdlib:eval")
# Standard-library folders left out of the built-in corpus: installed packages, and the test
# suites (19 MB of deliberately odd files: encodings, huge data tables, broken syntax).
_STDLIB_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


class SourceError(ValueError):
    """A source spec that matches nothing, or bad input in strict mode (names file and line)."""


class DocumentSource(Protocol):
    """What grain's `MapDataset.source` needs, plus the skip counts and the files read."""

    files: list[str]
    skipped: collections.Counter

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> str: ...


def _describe(files: Sequence[str]) -> str:
    return files[0] if len(files) == 1 else f"{len(files)} files ({files[0]}, ...)"


def _is_empty(text: str) -> bool:
    return not text.strip()


class _Skips:
    """Counts bad documents by reason; in strict mode the first one raises instead."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.counts: collections.Counter = collections.Counter()

    def __call__(self, reason: str, where: str, detail: str = "") -> None:
        if self.strict:
            raise SourceError(f"{where}: {reason}{': ' + detail if detail else ''} (data.strict is true)")
        self.counts[reason] += 1

    def report(self, name: str, kept: int) -> None:
        if self.counts:
            total = sum(self.counts.values())
            why = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items()))
            log.warning("%s: skipped %d of %d documents (%s)", name, total, total + kept, why)


class TextFileSource:
    """One document per file; the whole file is the document."""

    def __init__(self, paths: Sequence[str], *, strict: bool = False, name: str | None = None):
        skips = _Skips(strict)
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
        skips.report(name or _describe(paths), len(self.files))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> str:
        with open(self.files[index], encoding="utf-8", newline="") as f:  # keep \r\n as is
            return f.read()


class JsonlSource:
    """One JSON object per line; documents are addressed by (file, byte offset, length)."""

    def __init__(self, paths: Sequence[str], text_field: str, *, strict: bool = False):
        self.files = list(paths)
        self.text_field = text_field
        skips = _Skips(strict)
        # array.array, not lists: 8 bytes per document while indexing millions of lines.
        file_ids, offsets, lengths = array.array("i"), array.array("q"), array.array("q")
        for file_id, path in enumerate(self.files):
            offset = 0
            with open(path, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    start, offset = offset, offset + len(line)
                    if not line.strip():
                        continue  # blank lines (e.g. a trailing one) are not documents
                    if _jsonl_text(line, text_field, f"{path}:{lineno}", skips) is None:
                        continue
                    file_ids.append(file_id)
                    offsets.append(start)
                    lengths.append(len(line))
        self._file_ids = np.frombuffer(file_ids, np.int32) if file_ids else np.zeros(0, np.int32)
        self._offsets = np.frombuffer(offsets, np.int64) if offsets else np.zeros(0, np.int64)
        self._lengths = np.frombuffer(lengths, np.int64) if lengths else np.zeros(0, np.int64)
        self.skipped = skips.counts
        skips.report(_describe(self.files), len(self))

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> str:
        with open(self.files[self._file_ids[index]], "rb") as f:
            f.seek(int(self._offsets[index]))
            line = f.read(int(self._lengths[index]))
        return json.loads(line)[self.text_field]


def _jsonl_text(line: bytes, field: str, where: str, skips: _Skips) -> str | None:
    """The line's text, or None after counting (or, strict, raising for) why it is bad."""
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


class RowGroupCache:
    """A small LRU of parquet row groups (one column each), safe for grain's reader threads and
    picklable for worker processes (the copy starts empty)."""

    def __init__(self, files: Sequence[str], column: str, size: int):
        self.files, self.column, self.size = files, column, size
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, file_id: int, rg: int):
        key = (file_id, rg)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        import pyarrow.parquet as pq

        column = pq.ParquetFile(self.files[file_id]).read_row_group(rg, columns=[self.column]).column(0)
        with self._lock:
            self._cache[key] = column
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return column

    def __getstate__(self):
        return {"files": self.files, "column": self.column, "size": self.size}

    def __setstate__(self, state):
        self.__init__(state["files"], state["column"], state["size"])


class ParquetSource:
    """One document per row of column `text_field`, read one row group at a time.

    Random access decodes the row's whole row group (text column only); a small per-source
    cache keeps the last few, so reading in index order touches each row group once.
    """

    def __init__(self, paths: Sequence[str], text_field: str, *, strict: bool = False,
                 cache_row_groups: int = 8):
        import pyarrow.parquet as pq

        self.files = list(paths)
        self.text_field = text_field
        skips = _Skips(strict)
        file_ids, groups, rows = [np.zeros(0, np.int32)], [np.zeros(0, np.int32)], [np.zeros(0, np.int32)]
        for file_id, path in enumerate(self.files):
            pf = pq.ParquetFile(path)
            if text_field not in pf.schema_arrow.names:
                # A whole shard without the column means a wrong data.text_field, not bad data.
                names = ", ".join(pf.schema_arrow.names)
                raise SourceError(f"{path}: no column {text_field!r} (columns: {names})")
            for rg in range(pf.num_row_groups):
                column = pf.read_row_group(rg, columns=[text_field]).column(0)
                good = _good_rows(column, f"{path}: row group {rg}", text_field, skips)
                rows.append(good)
                file_ids.append(np.full(len(good), file_id, np.int32))
                groups.append(np.full(len(good), rg, np.int32))
        self._file_ids = np.concatenate(file_ids)
        self._groups = np.concatenate(groups)
        self._rows = np.concatenate(rows)
        self.skipped = skips.counts
        skips.report(_describe(self.files), len(self))
        self._groups_cache = RowGroupCache(self.files, self.text_field, cache_row_groups)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> str:
        column = self._groups_cache.get(int(self._file_ids[index]), int(self._groups[index]))
        value = column[int(self._rows[index])].as_py()
        return value.decode("utf-8") if isinstance(value, bytes) else value


def _good_rows(column, where: str, field: str, skips: _Skips) -> np.ndarray:
    """Rows of one row group's text column that hold a non-empty string; counts the others."""
    import pyarrow as pa
    import pyarrow.compute as pc

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


class ConcatSource:
    """Several sources read as one, in order."""

    def __init__(self, sources: Sequence[DocumentSource]):
        self.sources = list(sources)
        self._ends = np.cumsum([len(s) for s in self.sources], dtype=np.int64)
        self.files = [f for s in self.sources for f in s.files]
        self.skipped = sum((collections.Counter(s.skipped) for s in self.sources), collections.Counter())

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index: int) -> str:
        if not 0 <= index < len(self):
            raise IndexError(index)
        i = int(np.searchsorted(self._ends, index, side="right"))
        start = int(self._ends[i - 1]) if i else 0
        return self.sources[i][index - start]


# ----------------------------------------------------------------------------- spec resolution


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def _in_eval_split(relpath: str, eval_fraction: float) -> bool:
    # sha256 of the POSIX relative path: the same split on every machine and Python build.
    h = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < eval_fraction


def stdlib_files(split: str, eval_fraction: float) -> list[str]:
    """The standard library's `.py` files of one split ("train" or "eval"), sorted."""
    if split not in ("train", "eval"):
        raise SourceError(f"stdlib:{split}: unknown split; use stdlib:train or stdlib:eval")
    root = stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if not name.endswith(".py") or os.path.getsize(path) == 0:
                continue  # empty __init__.py files are not documents; skip them without a warning
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if _in_eval_split(rel, eval_fraction) == (split == "eval"):
                out.append(path)
    if not out:
        raise SourceError(f"stdlib:{split}: no .py files found under {root}")
    return out


def _walk(folder: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        out += [os.path.join(dirpath, n) for n in sorted(filenames)
                if not n.startswith(".") and n.endswith(SUPPORTED_SUFFIXES)]
    return out


def resolve_files(spec: str, *, eval_fraction: float = 0.02) -> list[str]:
    """The files one spec names, in a deterministic order; raises if it names none."""
    if spec.startswith("stdlib:"):
        return stdlib_files(spec.split(":", 1)[1], eval_fraction)
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        files = _walk(path)
        if not files:
            raise SourceError(f"{spec}: folder has no {'/'.join(SUPPORTED_SUFFIXES)} files")
        return files
    if os.path.isfile(path):
        if not path.endswith(SUPPORTED_SUFFIXES):
            raise SourceError(f"{spec}: unsupported file type; use one of {', '.join(SUPPORTED_SUFFIXES)}")
        return [path]
    if glob.has_magic(path):
        files = []
        for match in sorted(glob.glob(path, recursive=True)):
            if os.path.isdir(match):
                files += _walk(match)
            elif match.endswith(SUPPORTED_SUFFIXES):
                files.append(match)
        if not files:
            raise SourceError(f"{spec}: glob matches no {'/'.join(SUPPORTED_SUFFIXES)} files")
        return files
    raise SourceError(f"{spec}: no such file, folder or glob")


def open_source(specs: Sequence[str], *, text_field: str = "text", strict: bool = False,
                eval_fraction: float = 0.02) -> DocumentSource:
    """All documents of `specs`, in spec order, as one random-access source."""
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise SourceError("no data sources given")
    parts: list[DocumentSource] = []
    for spec in specs:
        files = resolve_files(spec, eval_fraction=eval_fraction)
        by_kind = collections.defaultdict(list)
        for f in files:
            by_kind["jsonl" if f.endswith(JSONL_SUFFIXES) else "parquet" if f.endswith(PARQUET_SUFFIXES)
                    else "text"].append(f)
        # A folder may mix kinds; keep each kind's files in order (text, jsonl, parquet).
        if by_kind["text"]:
            parts.append(TextFileSource(by_kind["text"], strict=strict, name=spec))
        if by_kind["jsonl"]:
            parts.append(JsonlSource(by_kind["jsonl"], text_field, strict=strict))
        if by_kind["parquet"]:
            parts.append(ParquetSource(by_kind["parquet"], text_field, strict=strict))
    source = parts[0] if len(parts) == 1 else ConcatSource(parts)
    if len(source) == 0:
        raise SourceError(f"{', '.join(specs)}: no usable documents (skipped: {dict(source.skipped)})")
    return source

