"""Records: indexed readers of jsonl, parquet and ArrayRecord files, and `RecordSource`.

A reader makes one validating pass over its files and keeps an index of positions, never the
records, so memory does not grow with the corpus: a jsonl line is (file, byte offset, length,
line number), a parquet row (file, row group, row), an ArrayRecord record its key. `.jsonl.gz`
/ `.jsonl.zst` files are read through their decompressed copy (`files.uncompressed_jsonl`);
messages still name the original file and line. The caller decides which records to keep: an
`accept(raw bytes, where, skips)` function for JSON records (jsonl lines, ArrayRecord records),
a `good_rows(row group table, where, skips)` function for parquet. A record left out is counted
by reason in a `Skips` (strict: `SourceError` naming file and line); a file that cannot be read
at all (a parquet file without a required column, a corrupt ArrayRecord file) is always an
error. Every reader has `files`, `file_ids` (the index into `files` of each record), len(),
`record(i)` (a dict: the parsed JSON object, or the parquet row's columns) and `where(i)`.

The text documents of pretraining (`jaxllm.data.documents`) and `RecordSource`, the typed
records of post-training, both read through these readers.
"""

from __future__ import annotations

import array
import collections
import itertools
import json
import logging
import threading
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from jaxllm.data.files import SourceError, file_kind, resolve_files, uncompressed_jsonl

log = logging.getLogger(__name__)

# accept(raw record bytes, where, skips) -> keep it?
AcceptJson = Callable[[bytes, str, "Skips"], bool]
# good_rows(one row group's table of the required columns, where, skips) -> the rows to keep
GoodRows = Callable[[Any, str, "Skips"], np.ndarray]


class Skips:
    """Counts bad records by reason; in strict mode the first one raises SourceError instead."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.counts: collections.Counter = collections.Counter()

    def __call__(self, reason: str, where: str, detail: str = "") -> None:
        if self.strict:
            raise SourceError(f"{where}: {reason}{': ' + detail if detail else ''} (data.strict is true)")
        self.counts[reason] += 1

    def report(self, name: str, kept: int) -> None:
        """One warning for all the records left out of `name`, if any."""
        if self.counts:
            total = sum(self.counts.values())
            why = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items()))
            log.warning("%s: skipped %d of %d documents (%s)", name, total, total + kept, why)


def describe(files: Sequence[str]) -> str:
    """A short name for a list of files, for messages."""
    return files[0] if len(files) == 1 else f"{len(files)} files ({files[0]}, ...)"


def locate(ends: np.ndarray, index: int) -> tuple[int, int]:
    """(part, index within it) of item `index` of parts whose cumulative lengths are `ends`."""
    part = int(np.searchsorted(ends, index, side="right"))
    return part, index - (int(ends[part - 1]) if part else 0)


def _array(values: array.array, dtype) -> np.ndarray:
    return np.frombuffer(values, dtype) if values else np.zeros(0, dtype)


class JsonLines:
    """The accepted lines of jsonl files (blank lines are not records)."""

    def __init__(self, paths: Sequence[str], accept: AcceptJson, skips: Skips, *, cache_dir: str | None = None):
        self.files = list(paths)
        self._read_paths = []  # the file each line is read from: itself, or its decompressed copy
        # array.array, not lists: 24 bytes per record while indexing millions of lines.
        file_ids, offsets, lengths, lines = array.array("i"), array.array("q"), array.array("q"), array.array("I")
        for file_id, path in enumerate(self.files):
            read_path, truncated = uncompressed_jsonl(path, cache_dir)
            self._read_paths.append(read_path)
            offset = 0
            with open(read_path, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    start, offset = offset, offset + len(line)
                    if not line.strip() or not accept(line, f"{path}:{lineno}", skips):
                        continue
                    file_ids.append(file_id)
                    offsets.append(start)
                    lengths.append(len(line))
                    lines.append(lineno)
            if truncated:
                skips("truncated file", f"{path}:{truncated['line']}", truncated["error"])
        self.file_ids = _array(file_ids, np.int32)
        self._offsets, self._lengths = _array(offsets, np.int64), _array(lengths, np.int64)
        self._lines = _array(lines, np.uint32)  # line numbers, for messages only

    def __len__(self) -> int:
        return len(self._offsets)

    def record(self, index: int) -> Any:
        with open(self._read_paths[self.file_ids[index]], "rb") as f:
            f.seek(int(self._offsets[index]))
            return json.loads(f.read(int(self._lengths[index])))

    def where(self, index: int) -> str:
        return f"{self.files[self.file_ids[index]]}:{self._lines[index]}"


class _RowGroupCache:
    """A small LRU of parquet row groups (a file's record columns), safe for grain's reader
    threads and picklable for worker processes (the copy starts empty)."""

    def __init__(self, files: Sequence[str], columns: Sequence[list[str]], size: int):
        self.files, self.columns, self.size = files, columns, size
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, file_id: int, rg: int):
        key = (file_id, rg)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        import pyarrow.parquet as pq

        table = pq.ParquetFile(self.files[file_id]).read_row_group(rg, columns=self.columns[file_id])
        with self._lock:
            self._cache[key] = table
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return table

    def __getstate__(self):
        return {"files": self.files, "columns": self.columns, "size": self.size}

    def __setstate__(self, state):
        self.__init__(state["files"], state["columns"], state["size"])


class ParquetRows:
    """The kept rows of parquet files, read one row group at a time.

    Every file must have the `required` columns (`good_rows` sees a row group's table of them);
    a record holds those and the `optional` columns the file has. Random access decodes the
    row's whole row group (record columns only); a small cache keeps the last few, so reading
    in index order touches each row group once.
    """

    def __init__(self, paths: Sequence[str], required: Sequence[str], optional: Sequence[str],
                 good_rows: GoodRows, skips: Skips, *, cache_row_groups: int = 8):
        import pyarrow.parquet as pq

        self.files = list(paths)
        columns = []  # per file: the record columns it has
        file_ids, groups, rows = [np.zeros(0, np.int32)], [np.zeros(0, np.int32)], [np.zeros(0, np.int32)]
        for file_id, path in enumerate(self.files):
            pf = pq.ParquetFile(path)
            names = pf.schema_arrow.names
            for name in required:
                if name not in names:
                    # A whole file without the column means a wrong field name, not bad data.
                    raise SourceError(f"{path}: no column {name!r} (columns: {', '.join(names)})")
            columns.append([n for n in (*required, *optional) if n in names])
            for rg in range(pf.num_row_groups):
                good = good_rows(pf.read_row_group(rg, columns=list(required)), f"{path}: row group {rg}", skips)
                rows.append(good)
                file_ids.append(np.full(len(good), file_id, np.int32))
                groups.append(np.full(len(good), rg, np.int32))
        self.file_ids = np.concatenate(file_ids)
        self._groups = np.concatenate(groups)
        self._rows = np.concatenate(rows)
        self._cache = _RowGroupCache(self.files, columns, cache_row_groups)

    def __len__(self) -> int:
        return len(self._rows)

    def record(self, index: int) -> dict[str, Any]:
        file_id, row = int(self.file_ids[index]), int(self._rows[index])
        table = self._cache.get(file_id, int(self._groups[index]))
        return {name: table.column(name)[row].as_py() for name in table.column_names}

    def where(self, index: int) -> str:
        return f"{self.files[self.file_ids[index]]}: row group {self._groups[index]}, row {self._rows[index]}"


class ArrayRecords:
    """The accepted records of ArrayRecord files, each a UTF-8 JSON object (like a jsonl line).

    Indexed by one validating pass over every record; read by key through grain's
    `ArrayRecordDataSource` (thread-safe, picklable).
    """

    def __init__(self, paths: Sequence[str], accept: AcceptJson, skips: Skips, *, read_batch: int = 1024):
        import grain

        self.files = list(paths)
        file_ids, keys = [np.zeros(0, np.int32)], [np.zeros(0, np.int64)]
        self._first_keys, instructions, first_key = [], [], 0
        for file_id, path in enumerate(self.files):
            good, n = _accepted_records(path, accept, skips, read_batch)
            keys.append(first_key + np.asarray(good, np.int64))
            file_ids.append(np.full(len(good), file_id, np.int32))
            self._first_keys.append(first_key)
            instructions.append(f"{path}[0:{n}]")  # record counts known: grain need not reopen
            first_key += n
        self._keys = np.concatenate(keys)
        self.file_ids = np.concatenate(file_ids)
        self._records = grain.sources.ArrayRecordDataSource(instructions) if len(self._keys) else None

    def __len__(self) -> int:
        return len(self._keys)

    def record(self, index: int) -> Any:
        return json.loads(self._records[int(self._keys[index])])

    def where(self, index: int) -> str:
        file_id = int(self.file_ids[index])
        return f"{self.files[file_id]}: record {int(self._keys[index]) - self._first_keys[file_id]}"


def _accepted_records(path: str, accept: AcceptJson, skips: Skips, read_batch: int) -> tuple[list[int], int]:
    """(the accepted record numbers, the number of records) of one ArrayRecord file."""
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(path, "readahead_buffer_size:1048576")
    if not reader.ok():  # (closing a reader that failed to open raises the reason again)
        raise SourceError(f"{path}: not a readable ArrayRecord file (truncated or corrupt)")
    try:
        n = reader.num_records()
        good = []
        for start in range(0, n, read_batch):
            try:
                records = reader.read(start, min(n, start + read_batch))
            except Exception as e:  # the C++ reader's errors surface as several types
                raise SourceError(f"{path}: cannot read records {start}..{min(n, start + read_batch) - 1} "
                                  f"({type(e).__name__}: {e})") from None
            good += [i for i, record in enumerate(records, start) if accept(record, f"{path}: record {i}", skips)]
    finally:
        reader.close()
    return good, n


# ----------------------------------------------------------------------------- typed records


_TYPE_NAMES = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               dict: "a mapping"}


def _type_phrase(types: tuple[type, ...]) -> str:
    return " or ".join(dict.fromkeys(_TYPE_NAMES.get(t, t.__name__) for t in types))


def _has_type(value, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False  # JSON true is not a number here
    return isinstance(value, types)


class RecordSource:
    """Random-access records (dicts of chosen fields) of jsonl (also `.jsonl.gz` / `.jsonl.zst`)
    and parquet files, in file order.

    Files are resolved like pretraining sources (`files.resolve_files`: files, folders, globs);
    other kinds of file are ignored. `fields` maps each required field to the Python types a
    jsonl value may have; `optional` likewise for fields a record may lack (null counts as
    absent). Records that are not JSON, lack a required field or hold a value of another type
    are counted in `skipped` (strict: SourceError naming file and line/row). Parquet rows are
    checked for nulls only (a column has one type); content checks happen where the record is
    used. A record is a dict of the required fields and the optional ones it has.
    """

    def __init__(self, path_specs: str | Sequence[str], fields: dict[str, tuple[type, ...]],
                 optional: dict[str, tuple[type, ...]] | None = None, *, strict: bool = False,
                 cache_row_groups: int = 4):
        specs = [path_specs] if isinstance(path_specs, str) else list(path_specs)
        self.files = [f for spec in specs for f in resolve_files(spec) if file_kind(f) in ("jsonl", "parquet")]
        if not self.files:
            raise SourceError(f"{', '.join(specs)}: no .jsonl, .jsonl.gz, .jsonl.zst or .parquet files")
        self.fields, self.optional = dict(fields), dict(optional or {})
        overlap = set(self.fields) & set(self.optional)
        if overlap:
            raise ValueError(f"fields both required and optional: {sorted(overlap)}")
        skips = Skips(strict)
        self._parts: list[JsonLines | ParquetRows] = []
        for kind, run in itertools.groupby(self.files, file_kind):  # runs of one kind, in file order
            if kind == "jsonl":
                self._parts.append(JsonLines(list(run), self._accept_json, skips))
            else:
                self._parts.append(ParquetRows(list(run), list(self.fields), list(self.optional),
                                               self._good_rows, skips, cache_row_groups=cache_row_groups))
        self._ends = np.cumsum([len(p) for p in self._parts], dtype=np.int64)
        self.skipped = skips.counts
        skips.report(describe(self.files), len(self))

    def _accept_json(self, line: bytes, where: str, skips: Skips) -> bool:
        try:
            obj = json.loads(line.decode("utf-8"))
        except ValueError as e:  # UnicodeDecodeError is a ValueError too
            skips("malformed JSON", where, str(e))
            return False
        obj = obj if isinstance(obj, dict) else {}
        for name, types in (*self.fields.items(), *self.optional.items()):
            value = obj.get(name)
            if value is None:
                if name in self.fields:
                    skips(f"missing field {name!r}", where)
                    return False
            elif not _has_type(value, types):
                skips(f"field {name!r} is not {_type_phrase(types)}", where)
                return False
        return True

    def _good_rows(self, table, where: str, skips: Skips) -> np.ndarray:
        nulls = [table.column(n).is_null().to_numpy(zero_copy_only=False) for n in self.fields]
        good = []
        for row in range(table.num_rows):
            missing = next((n for n, null in zip(self.fields, nulls) if null[row]), None)
            if missing is None:
                good.append(row)
            else:
                skips(f"missing field {missing!r}", f"{where}, row {row}")
        return np.asarray(good, np.int32)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def where(self, index: int) -> str:
        """The record's file and line (jsonl) or row group and row (parquet)."""
        part, local = locate(self._ends, index)
        return self._parts[part].where(local)

    def record(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        part, local = locate(self._ends, index)
        obj = self._parts[part].record(local)
        return {n: obj[n] for n in (*self.fields, *self.optional) if obj.get(n) is not None}

    __getitem__ = record

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))
