"""Files: data source specs resolved to files, and the local cache of decompressed jsonl.

A source spec is one of
  * a text file (`.txt`, `.py`, `.md`), a `.jsonl` file (also compressed, `.jsonl.gz` /
    `.jsonl.zst`), a `.parquet` file, or an ArrayRecord file (`.array_record`, or TFDS-style
    `x.array_record-00000-of-00004`); `file_kind` names the kind, `jaxllm.data.records` and
    `jaxllm.data.documents` read them;
  * a folder (searched recursively for those suffixes, hidden entries skipped) or a glob
    (`**` allowed), e.g. a Hugging Face dataset's folder of parquet shards;
  * `stdlib:train` / `stdlib:eval`: the Python standard library's own `.py` files, split
    deterministically by a hash of each file's relative path; `stdlib:train:modules` /
    `stdlib:train:packages` (and the same for eval): only the top-level modules, or only the
    files inside packages (two kinds of source for mixture tests and demos);
  * token shards written by `python -m jaxllm.data.prepare`: `prepared:DIR`, or a folder that
    holds a `manifest.json` (`prepared_dir`; read by `jaxllm.data.shards`). They hold no text
    files, so `resolve_files` refuses them.
  * any of the above at a URL (`gs://bucket/data/*.parquet`, `prepared:gs://bucket/shards`):
    listed through `jaxllm.paths`, and each file staged once into the local data cache
    (`paths.local_copy`: random access for the readers, memory maps for shards).

Compressed jsonl. A compressed stream has no cheap random access, and the pipeline shuffles
documents by index, so each `.jsonl.gz` / `.jsonl.zst` file is decompressed once, streaming
(memory stays at one chunk), into an uncompressed copy under a local cache folder
(`$JAXLLM_DATA_CACHE`, default `~/.cache/jaxllm/data`, subfolder `decompressed/`), keyed by the
file's absolute path, size and modification time; records are then byte ranges of that copy,
read like a plain jsonl file. Trade-off: disk space (one uncompressed copy per file; the copy of
an older version of the same path is deleted when a new one is made) and one decompression pass
on first use, against true random access afterwards (shuffling, per-process sharding and exact
resume work as for plain files). A sequential reader would avoid the copy but could only
stream, not shuffle globally. Several processes on one host share the copy (a file lock makes
one of them write it, atomically). A stream that ends early (a truncated download) keeps its
complete lines; the caller counts the cut-off line as "truncated file". Any other decompression
error fails the file.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import sysconfig
import zlib

import jaxllm.paths as paths
from jaxllm.errors import UserError

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


class SourceError(UserError, ValueError):
    """A source spec that matches nothing, or bad input in strict mode (names file and line)."""


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


@contextlib.contextmanager
def file_lock(path: str):
    """An exclusive lock (flock on `path`), so concurrent processes make a cached file once."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the atomic rename still keeps the cache sound
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
    """The local folder of token shards a spec names (`prepared:DIR`, or a folder holding
    manifest.json; a URL's shards staged locally), else None."""
    if spec.startswith(PREPARED_PREFIX):
        folder = paths.expand(spec[len(PREPARED_PREFIX):])
        if not paths.isfile(paths.join(folder, PREPARED_MANIFEST)):
            raise SourceError(f"{spec}: no {PREPARED_MANIFEST} in {folder} (make one with python -m jaxllm.data.prepare)")
        return paths.local_folder(folder)
    path = paths.expand(spec)
    if glob.has_magic(path) or not paths.isfile(paths.join(path, PREPARED_MANIFEST)):
        return None
    return paths.local_folder(path)


def _remote_files(spec: str) -> list[str]:
    """The source files a URL spec names (a file, a folder or a glob), staged locally."""
    if glob.has_magic(spec):
        found = []
        for match in paths.glob(spec):
            found += [f for f in paths.walk_files(match) if file_kind(f)] if paths.isdir(match) else (
                [match] if file_kind(match) else [])
        kind = "glob matches"
    elif paths.isdir(spec):
        found, kind = [f for f in paths.walk_files(spec) if file_kind(f)], "folder has"
    elif paths.isfile(spec):
        if file_kind(spec) is None:
            raise SourceError(f"{spec}: unsupported file type; use one of {', '.join(SUPPORTED_SUFFIXES)}")
        found, kind = [spec], ""
    else:
        raise SourceError(f"{spec}: no such file, folder or glob")
    if not found:
        raise SourceError(f"{spec}: {kind} no {'/'.join(SUPPORTED_SUFFIXES)} files")
    return [paths.local_copy(f) for f in found]


def resolve_files(spec: str, *, eval_fraction: float = 0.02) -> list[str]:
    """The files one spec names, in a deterministic order; raises if it names none."""
    if spec.startswith("stdlib:"):
        split, sep, kind = spec[len("stdlib:"):].partition(":")
        return stdlib_files(split, eval_fraction, kind if sep else None)
    if prepared_dir(spec) is not None:
        raise SourceError(f"{spec}: prepared token shards hold no text files (tokenizer training and "
                          f"text readers need the original sources; a prepared folder's manifest.json "
                          f"names its tokenizer, set data.tokenizer to that file)")
    if paths.is_url(spec):
        return _remote_files(spec)
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
        with file_lock(os.path.join(folder, key + ".lock")):
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
