"""Document sources: random-access sequences of `str` documents that grain reads by index.

A source spec is one of
  * a text file (`.txt`, `.py`, `.md`): one document per file;
  * a `.jsonl` file: one JSON object per line, text in the field `text_field`; also compressed,
    `.jsonl.gz` or `.jsonl.zst` (see "Compressed jsonl" below);
  * a `.parquet` file: one document per row, text in the column `text_field`;
  * an ArrayRecord file (`.array_record`, or TFDS-style `x.array_record-00000-of-00004`): one
    document per record, each record a UTF-8 JSON object with the text in `text_field`, exactly
    like a jsonl line (so a jsonl file converts record for record; plain text must be wrapped as
    `{"text": ...}`). Read by record index with grain's `ArrayRecordDataSource`;
  * a folder (searched recursively for those suffixes, hidden entries skipped) or a glob
    (`**` allowed), e.g. a Hugging Face dataset's folder of parquet shards;
  * `stdlib:train` / `stdlib:eval`: the Python standard library's own `.py` files, split
    deterministically by a hash of each file's relative path; `stdlib:train:modules` /
    `stdlib:train:packages` (and the same for eval): only the top-level modules, or only the
    files inside packages (two kinds of source for mixture tests and demos);
  * token shards written by `python -m jaxllm.data.prepare`: `prepared:DIR`, or a folder that
    holds a `manifest.json`. Their documents are int32 token arrays, not str (see
    `jaxllm.data.prepare.PreparedSource`); `check_prepared` checks them against the tokenizer.

Sources hold an index (paths, byte offsets, row-group positions), never the text, so memory
does not grow with the corpus. The index is built by one validating pass: bad documents
(malformed JSON, invalid UTF-8, missing field, empty text, the cut-off end of a truncated
compressed file) are left out and counted in `source.skipped`, with one warning per source, or
raise `SourceError` naming file and line when `strict`. A file that cannot be read at all (not
gzip/zstd data, a corrupt or truncated ArrayRecord file, a parquet file without the column) is
always an error. Every document a text source returns is therefore a non-empty str.

Compressed jsonl. A compressed stream has no cheap random access, and the pipeline shuffles
documents by index, so each `.jsonl.gz` / `.jsonl.zst` file is decompressed once, streaming
(memory stays at one chunk), into an uncompressed copy under a local cache folder
(`$JAXLLM_DATA_CACHE`, default `~/.cache/jaxllm/data`, subfolder `decompressed/`), keyed by the
file's absolute path, size and modification time; documents are then byte ranges of that copy,
read like a plain jsonl file. Trade-off: disk space (one uncompressed copy per file; the copy of
an older version of the same path is deleted when a new one is made) and one decompression pass
on first use, against true random access afterwards (shuffling, per-process sharding and exact
resume work as for plain files). A sequential reader would avoid the copy but could only
stream, not shuffle globally. Several processes on one host share the copy (a file lock makes
one of them write it, atomically). A stream that ends early (a truncated download) keeps its
complete lines; the cut-off line is counted as "truncated file" (strict: an error naming
file:line). Any other decompression error fails the file.
"""

from __future__ import annotations

import array
import collections
import glob
import hashlib
import json
import logging
import os
import re
import sysconfig
import threading
import zlib
from typing import Protocol, Sequence

import numpy as np

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".py", ".md")
JSONL_SUFFIXES = (".jsonl",)
COMPRESSED_JSONL_SUFFIXES = (".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIXES = (".parquet",)
ARRAY_RECORD_SUFFIXES = (".array_record",)
SUPPORTED_SUFFIXES = (TEXT_SUFFIXES + JSONL_SUFFIXES + COMPRESSED_JSONL_SUFFIXES + PARQUET_SUFFIXES
                      + ARRAY_RECORD_SUFFIXES)
# TFDS / grain name ArrayRecord shards `name.array_record-00000-of-00004`.
_ARRAY_RECORD_SHARD = re.compile(r"\.array_record-\d+-of-\d+$")
STDLIB_SPLITS = ("stdlib:train", "stdlib:eval")
STDLIB_KINDS = ("modules", "packages")  # stdlib:train:modules: top-level modules; :packages: the rest
PREPARED_PREFIX = "prepared:"
PREPARED_MANIFEST = "manifest.json"
# Compressed bytes fed to the decompressor at a time (bounds the memory of one decompressed chunk).
_DECOMPRESS_CHUNK = 1 << 16
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


def file_kind(path: str) -> str | None:
    """"text", "jsonl" (plain or compressed), "parquet", "array_record", or None (not a source file)."""
    if path.endswith(TEXT_SUFFIXES):
        return "text"
    if path.endswith(JSONL_SUFFIXES + COMPRESSED_JSONL_SUFFIXES):
        return "jsonl"
    if path.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if path.endswith(ARRAY_RECORD_SUFFIXES) or _ARRAY_RECORD_SHARD.search(path):
        return "array_record"
    return None


def data_cache_dir() -> str:
    """Local cache folder of derived data files ($JAXLLM_DATA_CACHE, default ~/.cache/jaxllm/data)."""
    return os.path.expanduser(os.environ.get("JAXLLM_DATA_CACHE", "~/.cache/jaxllm/data"))


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
    """One JSON object per line; documents are addressed by (file, byte offset, length).

    `.jsonl.gz` / `.jsonl.zst` files are read through their uncompressed copy in `cache_dir`
    (default `data_cache_dir()/decompressed`); messages still name the original file and line.
    """

    def __init__(self, paths: Sequence[str], text_field: str, *, strict: bool = False,
                 cache_dir: str | None = None):
        self.files = list(paths)
        self.text_field = text_field
        skips = _Skips(strict)
        self._read_paths = []  # the file each document is read from: itself, or its decompressed copy
        # array.array, not lists: 8 bytes per document while indexing millions of lines.
        file_ids, offsets, lengths = array.array("i"), array.array("q"), array.array("q")
        for file_id, path in enumerate(self.files):
            read_path, truncated = uncompressed_jsonl(path, cache_dir)
            self._read_paths.append(read_path)
            offset = 0
            with open(read_path, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    start, offset = offset, offset + len(line)
                    if not line.strip():
                        continue  # blank lines (e.g. a trailing one) are not documents
                    if _jsonl_text(line, text_field, f"{path}:{lineno}", skips) is None:
                        continue
                    file_ids.append(file_id)
                    offsets.append(start)
                    lengths.append(len(line))
            if truncated:
                skips("truncated file", f"{path}:{truncated['line']}", truncated["error"])
        self._file_ids = np.frombuffer(file_ids, np.int32) if file_ids else np.zeros(0, np.int32)
        self._offsets = np.frombuffer(offsets, np.int64) if offsets else np.zeros(0, np.int64)
        self._lengths = np.frombuffer(lengths, np.int64) if lengths else np.zeros(0, np.int64)
        self.skipped = skips.counts
        skips.report(_describe(self.files), len(self))

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> str:
        with open(self._read_paths[self._file_ids[index]], "rb") as f:
            f.seek(int(self._offsets[index]))
            line = f.read(int(self._lengths[index]))
        return json.loads(line)[self.text_field]


# ----------------------------------------------------------------------------- compressed jsonl


class _Truncated(Exception):
    """A compressed stream that ends before its end-of-stream marker."""


def _stream_chunks(f, new_decompressor, what: str):
    """Decompressed chunks of file object `f`, one member / frame after the other (concatenated
    gzip members, multi-frame zstd). Incremental decompressor objects emit everything decodable,
    so a truncated stream yields its data up to the cut before `_Truncated` is raised."""
    obj, in_frame = new_decompressor(), False
    while raw := f.read(_DECOMPRESS_CHUNK):
        while raw:
            in_frame = True
            yield obj.decompress(raw)
            if obj.eof:
                raw, obj, in_frame = obj.unused_data, new_decompressor(), False
            else:
                raw = b""
    if in_frame:
        raise _Truncated(f"the {what} stream ends before its end marker")


def _gzip_chunks(f):
    return _stream_chunks(f, lambda: zlib.decompressobj(16 + zlib.MAX_WBITS), "gzip")


def _zstd_chunks(f):
    try:
        import zstandard
    except ImportError as e:  # a declared dependency; say which one is missing
        raise SourceError("reading .jsonl.zst files needs the zstandard package (pip install zstandard)") from e
    # zstd's own stream_reader would end a truncated stream silently; decompressobj has `eof`.
    return _stream_chunks(f, zstandard.ZstdDecompressor().decompressobj, "zstd")


def uncompressed_jsonl(path: str, cache_dir: str | None = None) -> tuple[str, dict | None]:
    """(a plain jsonl file with the lines of `path`, truncation info or None).

    A plain `.jsonl` is itself; a `.jsonl.gz` / `.jsonl.zst` is decompressed once into
    `cache_dir` (see the module doc). Truncation info is {"line": the cut-off line, "error": ...}.
    """
    if not path.endswith(COMPRESSED_JSONL_SUFFIXES):
        return path, None
    st = os.stat(path)
    folder = os.path.expanduser(cache_dir) if cache_dir else os.path.join(data_cache_dir(), "decompressed")
    os.makedirs(folder, exist_ok=True)
    key = hashlib.sha256(os.path.abspath(path).encode("utf-8")).hexdigest()[:24]
    stem = os.path.join(folder, f"{key}-{st.st_size}-{st.st_mtime_ns}")
    info = _read_cache_info(stem)
    if info is None:
        from jaxllm.data.tokenizer import _file_lock

        with _file_lock(os.path.join(folder, key + ".lock")):
            info = _read_cache_info(stem)  # another process may have made it meanwhile
            if info is None:
                info = _decompress(path, stem)
                for name in os.listdir(folder):  # copies of older versions of this file
                    if name.startswith(key + "-") and not name.startswith(os.path.basename(stem) + "."):
                        os.unlink(os.path.join(folder, name))
    return stem + ".jsonl", info["truncated"]


def _read_cache_info(stem: str) -> dict | None:
    """The info file of a complete cached copy (written last, after the data), or None."""
    try:
        with open(stem + ".json") as f:
            info = json.load(f)
        if os.path.getsize(stem + ".jsonl") == info["bytes"]:
            return info
    except (OSError, ValueError, KeyError):
        pass
    return None


def _decompress(path: str, stem: str) -> dict:
    """Streams `path` into `stem`.jsonl and writes `stem`.json; both atomically (temp + rename)."""
    tmp = f"{stem}.jsonl.tmp-{os.getpid()}"
    chunks = _zstd_chunks if path.endswith(".zst") else _gzip_chunks
    truncated, lines, size, complete = None, 0, 0, 0  # complete: bytes up to the last newline
    try:
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            try:
                for chunk in chunks(src):
                    dst.write(chunk)
                    newlines = chunk.count(b"\n")
                    if newlines:
                        lines += newlines
                        complete = size + chunk.rindex(b"\n") + 1
                    size += len(chunk)
            except SourceError:
                raise
            except (EOFError, _Truncated) as e:
                truncated = {"line": lines + 1, "error": str(e) or type(e).__name__}
                dst.truncate(complete)  # drop the cut-off line
                size = complete
            except (OSError, zlib.error, ValueError) as e:  # not gzip, corrupt data, CRC mismatch
                raise SourceError(f"{path}: cannot decompress ({type(e).__name__}: {e}) after "
                                  f"{size} bytes, line {lines + 1}") from None
            except Exception as e:  # zstandard.ZstdError: corrupt or not zstd data
                if type(e).__name__ != "ZstdError":
                    raise
                raise SourceError(f"{path}: cannot decompress ({e}) after {size} bytes, line {lines + 1}") from None
        os.replace(tmp, stem + ".jsonl")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    info = {"source": os.path.abspath(path), "bytes": size, "truncated": truncated}
    with open(stem + ".json.tmp", "w") as f:
        json.dump(info, f)
    os.replace(stem + ".json.tmp", stem + ".json")
    return info


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


class ArrayRecordSource:
    """One document per ArrayRecord record: a UTF-8 JSON object with the text in `text_field`.

    Indexed by one validating pass over every record (as jsonl lines are); documents are read
    by record key through grain's `ArrayRecordDataSource` (thread-safe, picklable).
    """

    def __init__(self, paths: Sequence[str], text_field: str, *, strict: bool = False,
                 read_batch: int = 1024):
        from array_record.python.array_record_module import ArrayRecordReader

        self.files = list(paths)
        self.text_field = text_field
        skips = _Skips(strict)
        file_ids, keys = [np.zeros(0, np.int32)], [np.zeros(0, np.int64)]
        first_key = 0
        instructions = []
        for file_id, path in enumerate(self.files):
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
                    for i, record in enumerate(records, start):
                        if _jsonl_text(record, text_field, f"{path}: record {i}", skips) is not None:
                            good.append(i)
            finally:
                reader.close()
            keys.append(first_key + np.asarray(good, np.int64))
            file_ids.append(np.full(len(good), file_id, np.int32))
            instructions.append(f"{path}[0:{n}]")  # record counts known: grain need not reopen
            first_key += n
        self._keys = np.concatenate(keys)
        self._file_ids = np.concatenate(file_ids)
        self.skipped = skips.counts
        skips.report(_describe(self.files), len(self))
        import grain

        self._records = grain.sources.ArrayRecordDataSource(instructions) if len(self._keys) else None

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, index: int) -> str:
        return json.loads(self._records[int(self._keys[index])])[self.text_field]


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


def stdlib_files(split: str, eval_fraction: float, kind: str | None = None) -> list[str]:
    """The standard library's `.py` files of one split ("train" or "eval"), sorted; `kind`
    "modules" keeps the top-level modules only, "packages" the files inside packages only."""
    spec = f"stdlib:{split}" + (f":{kind}" if kind is not None else "")
    if split not in ("train", "eval"):
        raise SourceError(f"{spec}: unknown split; use stdlib:train or stdlib:eval")
    if kind not in (None,) + STDLIB_KINDS:
        raise SourceError(f"{spec}: unknown kind {kind!r}; use {' or '.join(f'stdlib:{split}:{k}' for k in STDLIB_KINDS)}")
    root = stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if not name.endswith(".py") or os.path.getsize(path) == 0:
                continue  # empty __init__.py files are not documents; skip them without a warning
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if kind is not None and ("/" in rel) != (kind == "packages"):
                continue
            if _in_eval_split(rel, eval_fraction) == (split == "eval"):
                out.append(path)
    if not out:
        raise SourceError(f"{spec}: no .py files found under {root}")
    return out


def _walk(folder: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        out += [os.path.join(dirpath, n) for n in sorted(filenames)
                if not n.startswith(".") and file_kind(n) is not None]
    return out


def prepared_dir(spec: str) -> str | None:
    """The folder of token shards a spec names (`prepared:DIR`, or a folder holding
    manifest.json), else None."""
    if spec.startswith(PREPARED_PREFIX):
        folder = os.path.expanduser(spec[len(PREPARED_PREFIX):])
        if not os.path.isfile(os.path.join(folder, PREPARED_MANIFEST)):
            raise SourceError(f"{spec}: no {PREPARED_MANIFEST} in {folder} (make one with python -m jaxllm.data.prepare)")
        return folder
    path = os.path.expanduser(spec)
    return path if os.path.isfile(os.path.join(path, PREPARED_MANIFEST)) else None


def resolve_files(spec: str, *, eval_fraction: float = 0.02) -> list[str]:
    """The files one spec names, in a deterministic order; raises if it names none."""
    if spec.startswith("stdlib:"):
        split, sep, kind = spec[len("stdlib:"):].partition(":")
        return stdlib_files(split, eval_fraction, kind if sep else None)
    if prepared_dir(spec) is not None:
        raise SourceError(f"{spec}: prepared token shards hold no text files (tokenizer training and "
                          f"text readers need the original sources; a prepared folder's manifest.json "
                          f"names its tokenizer, set data.tokenizer to that file)")
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        files = _walk(path)
        if not files:
            raise SourceError(f"{spec}: folder has no {'/'.join(SUPPORTED_SUFFIXES)} files")
        return files
    if os.path.isfile(path):
        if file_kind(path) is None:
            raise SourceError(f"{spec}: unsupported file type; use one of {', '.join(SUPPORTED_SUFFIXES)}")
        return [path]
    if glob.has_magic(path):
        files = []
        for match in sorted(glob.glob(path, recursive=True)):
            if os.path.isdir(match):
                files += _walk(match)
            elif file_kind(match) is not None:
                files.append(match)
        if not files:
            raise SourceError(f"{spec}: glob matches no {'/'.join(SUPPORTED_SUFFIXES)} files")
        return files
    raise SourceError(f"{spec}: no such file, folder or glob")


def open_source(specs: Sequence[str], *, text_field: str = "text", strict: bool = False,
                eval_fraction: float = 0.02, cache_dir: str | None = None) -> DocumentSource:
    """All documents of `specs`, in spec order, as one random-access source.

    `cache_dir`: where compressed jsonl files are decompressed (default: see the module doc).
    """
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise SourceError("no data sources given")
    parts: list[DocumentSource] = []
    for spec in specs:
        folder = prepared_dir(spec)
        if folder is not None:
            from jaxllm.data.prepare import PreparedSource

            parts.append(PreparedSource(folder))
            continue
        files = resolve_files(spec, eval_fraction=eval_fraction)
        by_kind = collections.defaultdict(list)
        for f in files:
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
