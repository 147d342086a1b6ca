"""One path layer for local files and cloud storage (`gs://bucket/x`, `s3://...`, and the other
URLs etils.epath / fsspec know).

Local paths go through `os` exactly as before (`~` expanded); a URL goes through
`etils.epath` (fsspec: `gcsfs` for gs://, `pip install "jaxllm[gcs]"`). Orbax and tensorstore
write checkpoints to a URL themselves; this module serves the rest of a run directory and the
data specs.

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


def _epath(path):
    from etils import epath

    return epath.Path(os.fspath(path))


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
    return _epath(path).exists() if is_url(path) else os.path.exists(path)


def isfile(path) -> bool:
    return _epath(path).is_file() if is_url(path) else os.path.isfile(path)


def isdir(path) -> bool:
    return _epath(path).is_dir() if is_url(path) else os.path.isdir(path)


def makedirs(path) -> None:
    if is_url(path):
        _epath(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def listdir(path) -> list[str]:
    """Entry names of a folder, sorted."""
    if is_url(path):
        return sorted(p.name for p in _epath(path).iterdir())
    return sorted(os.listdir(path))


def walk_files(folder) -> list[str]:
    """Every file under `folder` (recursive), sorted, hidden entries and __pycache__ skipped."""
    if not is_url(folder):
        out = []
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
            out += [os.path.join(dirpath, n) for n in sorted(filenames) if not n.startswith(".")]
        return out
    root = _epath(folder)
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root).parts
        if any(part.startswith(".") or part == "__pycache__" for part in rel) or not p.is_file():
            continue
        out.append(os.fspath(p))
    return sorted(out)


def glob(pattern) -> list[str]:
    """Matches of a glob (`**` allowed), sorted."""
    if not is_url(pattern):
        import glob as glob_lib

        return sorted(glob_lib.glob(pattern, recursive=True))
    # The fixed part before the first wildcard is the folder to search from.
    head = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
    root = head.rsplit("/", 1)[0]
    return sorted(os.fspath(p) for p in _epath(root).glob(pattern[len(root) + 1:]))


def size_and_mtime(path) -> tuple[int, int]:
    """(bytes, modification time in ns or a version number) of a file."""
    if not is_url(path):
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    st = _epath(path).stat()
    return int(st.length), int(float(st.mtime or 0) * 1e9)


def read_bytes(path) -> bytes:
    if is_url(path):
        return _epath(path).read_bytes()
    with open(path, "rb") as f:
        return f.read()


def read_text(path) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path, data: bytes) -> None:
    """Writes a whole file atomically: a local temp file renamed over `path`, or one object
    upload (object stores replace an object whole)."""
    if is_url(path):
        _epath(path).write_bytes(data)
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
        _epath(src).rename(_epath(dst))
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
            with os.fdopen(fd, "wb") as dst, _epath(path).open("rb") as src:
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
