"""One path layer for local files and cloud storage (`gs://bucket/x`, `s3://...`, and the other
URLs etils.epath / fsspec know).

Local paths go through `os` exactly as before (`~` expanded); a URL goes through fsspec
(`gcsfs` for gs://, `pip install "jaxllm[gcs]"`), the file systems etils.epath uses for orbax.
Orbax and tensorstore write checkpoints to a URL themselves; this module serves the rest of a
run directory and the data specs. Listings and existence checks drop fsspec's listing cache
first: another process (a run being resumed, a training job) may have written since.

Libraries that need a real local file (memory maps of prepared shards, SentencePiece, the
record readers' random access) get `local_copy(url)`: the object is downloaded once into the
data cache (`$JAXLLM_DATA_CACHE`, default ~/.cache/jaxllm/data, subfolder `remote/`), keyed by
the URL, size and modification time, written atomically, so a changed object is fetched again
and several processes on one host share the copy. Trade-off: local disk for the staged data, as
for decompressed jsonl (`data.files`), against true random access afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(path) -> bool:
    return bool(_URL.match(os.fspath(path)))


def _fs(path, fresh: bool = False):
    """(fsspec file system, path within it) of a URL; `fresh` drops cached listings."""
    import fsspec

    fs, inner = fsspec.core.url_to_fs(os.fspath(path))
    if fresh:
        fs.invalidate_cache()
    return fs, inner


def resolve(path) -> str:
    """A URL as given; a local path with `~` expanded, made absolute."""
    path = os.fspath(path)
    return path if is_url(path) else os.path.abspath(os.path.expanduser(path))


def expand(path) -> str:
    """A URL as given; a local path with `~` expanded (relative paths stay relative)."""
    path = os.fspath(path)
    return path if is_url(path) else os.path.expanduser(path)


def join(base, *parts) -> str:
    base = os.fspath(base)
    if is_url(base):
        return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts])
    return os.path.join(base, *parts)


def basename(path) -> str:
    return os.fspath(path).rstrip("/").rsplit("/", 1)[-1] if is_url(path) else os.path.basename(path)


def dirname(path) -> str:
    return os.fspath(path).rstrip("/").rsplit("/", 1)[0] if is_url(path) else os.path.dirname(path)


def exists(path) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    fs, inner = _fs(path, fresh=True)
    return fs.exists(inner)


def isfile(path) -> bool:
    if not is_url(path):
        return os.path.isfile(path)
    fs, inner = _fs(path, fresh=True)
    return fs.isfile(inner)


def isdir(path) -> bool:
    if not is_url(path):
        return os.path.isdir(path)
    fs, inner = _fs(path, fresh=True)
    return fs.isdir(inner)


def makedirs(path) -> None:
    """A local folder; on an object store nothing (folders are name prefixes)."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


def listdir(path) -> list[str]:
    """Entry names of a folder, sorted."""
    if not is_url(path):
        return sorted(os.listdir(path))
    fs, inner = _fs(path, fresh=True)
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(inner, detail=False))


def walk_files(folder) -> list[str]:
    """Every file under `folder` (recursive), sorted, hidden entries and __pycache__ skipped."""
    if not is_url(folder):
        out = []
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
            out += [os.path.join(dirpath, n) for n in sorted(filenames) if not n.startswith(".")]
        return out
    fs, root = _fs(os.fspath(folder).rstrip("/"), fresh=True)
    out = []
    for p in fs.find(root):  # one recursive listing (epath refuses `**` on object stores)
        rel = p[len(root):].strip("/").split("/")
        if not any(part.startswith(".") or part == "__pycache__" for part in rel):
            out.append(fs.unstrip_protocol(p))
    return sorted(out)


def glob(pattern) -> list[str]:
    """Matches of a glob (`**` allowed), sorted."""
    if not is_url(pattern):
        import glob as glob_lib

        return sorted(glob_lib.glob(pattern, recursive=True))
    fs, path = _fs(pattern, fresh=True)
    return sorted(fs.unstrip_protocol(p) for p in fs.glob(path))


def size_and_mtime(path) -> tuple[int, int]:
    """(bytes, modification time in ns or a version number) of a file."""
    if not is_url(path):
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    fs, inner = _fs(path, fresh=True)
    info = fs.info(inner)
    stamp = info.get("generation") or info.get("mtime") or info.get("updated") or info.get("LastModified") or 0
    return int(info["size"]), _stamp(stamp)


def _stamp(value) -> int:
    """An object's version as an int (GCS generation, or a modification time in ns)."""
    import datetime

    if isinstance(value, datetime.datetime):
        return int(value.timestamp() * 1e9)
    try:
        return int(value)
    except (TypeError, ValueError):
        try:
            return int(float(value) * 1e9)
        except ValueError:
            return int(datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp() * 1e9)


def read_bytes(path) -> bytes:
    if is_url(path):
        fs, inner = _fs(path)
        return fs.cat_file(inner)
    with open(path, "rb") as f:
        return f.read()


def read_text(path) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path, data: bytes) -> None:
    """Writes a whole file atomically: a local temp file renamed over `path`, or one object
    upload (object stores replace an object whole)."""
    if is_url(path):
        fs, inner = _fs(path)
        fs.pipe_file(inner, data)
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; other users may share a cache
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def rename(src, dst) -> None:
    """Moves a file or folder (on an object store: copies every object, then deletes them)."""
    if is_url(src):
        fs, inner = _fs(src, fresh=True)
        fs.mv(inner, _fs(dst)[1], recursive=True)
    else:
        os.replace(src, dst)


def remote_cache_dir() -> str:
    return os.path.join(os.path.expanduser(os.environ.get("JAXLLM_DATA_CACHE", "~/.cache/jaxllm/data")), "remote")


def local_copy(path) -> str:
    """A local file with the contents of `path`: itself if local, else a cached download
    (see the module docstring)."""
    if not is_url(path):
        return os.fspath(path)
    size, mtime = size_and_mtime(path)
    key = hashlib.sha256(os.fspath(path).encode("utf-8")).hexdigest()[:24]
    folder = os.path.join(remote_cache_dir(), key)
    target = os.path.join(folder, f"{size}-{mtime}", basename(path))
    if not (os.path.isfile(target) and os.path.getsize(target) == size):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".tmp-")
        try:
            fs, inner = _fs(path)
            with os.fdopen(fd, "wb") as dst, fs.open(inner, "rb") as src:
                while block := src.read(1 << 22):
                    dst.write(block)
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return target


def local_folder(folder, names=None) -> str:
    """A local folder holding `names` (default: every file, recursively) of `folder`: itself if
    local, else cached downloads (`local_copy`) linked under one folder per URL."""
    if not is_url(folder):
        return os.fspath(folder)
    folder = os.fspath(folder).rstrip("/")
    files = walk_files(folder) if names is None else [join(folder, n) for n in names]
    out = os.path.join(remote_cache_dir(), "folders", hashlib.sha256(folder.encode("utf-8")).hexdigest()[:24])
    for f in files:
        rel = f[len(folder) + 1:]
        link = os.path.join(out, rel)
        copy = local_copy(f)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if os.path.realpath(link) != os.path.realpath(copy):
            tmp = f"{link}.tmp-{os.getpid()}"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            os.symlink(copy, tmp)
            os.replace(tmp, link)
    return out
