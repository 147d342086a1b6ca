"""Token shards written by `python -m jaxllm.data.prepare`, read back: `PreparedSource`.

A prepared folder holds shard-NNNNN.bin (documents' tokens back to back, uint16 or uint32),
shard-NNNNN.idx.npy (int64 [documents + 1] offsets) and manifest.json (format, version, dtype,
documents and tokens per shard, the tokenizer's sha256 and special ids, add_bos / add_eos;
see jaxllm.data.prepare for the writer).

`PreparedSource` checks at open that every shard and index file has the size the manifest
says (a truncated copy raises naming the shard), and returns documents as int32 arrays that
remember their manifest (`PreparedTokens.origin`), so `documents.check_prepared` (called by
`documents.Tokenize`) raises on a tokenizer or BOS/EOS setting that differs from the one the
shards were made with.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import threading
import weakref

import numpy as np

from jaxllm.data.files import PREPARED_MANIFEST, SourceError
from jaxllm.data.records import locate

FORMAT = "jaxllm-prepared-tokens"
VERSION = 1
MANIFEST = PREPARED_MANIFEST


# sha256 per tokenizer object (hashing a large tokenizer.json every document would be slow).
_SHA_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_sha256(tokenizer) -> str:
    """sha256 of the tokenizer's model: the SentencePiece .model bytes or the tokenizer.json file."""
    try:
        return _SHA_CACHE[tokenizer]
    except (KeyError, TypeError):
        pass
    proto = getattr(tokenizer, "model_proto", None)  # jaxllm.data.tokenizer.Tokenizer: the .model bytes
    if proto is not None:
        digest = hashlib.sha256(proto).hexdigest()
    elif getattr(tokenizer, "path", None) and os.path.isfile(tokenizer.path):  # HFTokenizer
        h = hashlib.sha256()
        with open(tokenizer.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()
    else:
        raise ValueError(f"cannot identify tokenizer {tokenizer!r}: it has neither a model proto nor a file")
    try:
        _SHA_CACHE[tokenizer] = digest
    except TypeError:
        pass
    return digest


class _Origin:
    """What a prepared document must be checked against: its manifest's tokenizer and flags."""

    def __init__(self, manifest_path: str, manifest: dict):
        self.manifest_path = manifest_path
        self.tokenizer = manifest["tokenizer"]
        self.add_bos = bool(manifest["add_bos"])
        self.add_eos = bool(manifest["add_eos"])
        self._ok: set = set()  # (tokenizer sha256, add_bos, add_eos, bos_id, eos_id) found to match
        self._lock = threading.Lock()

    def check(self, tokenizer, add_bos: bool, add_eos: bool) -> None:
        key = (tokenizer_sha256(tokenizer), bool(add_bos), bool(add_eos), tokenizer.bos_id, tokenizer.eos_id)
        if key in self._ok:
            return
        problems = []
        if key[0] != self.tokenizer["sha256"]:
            name = getattr(tokenizer, "path", None) or repr(tokenizer)
            problems.append(f"tokenizer: shards made with {self.tokenizer['path']} (sha256 "
                            f"{self.tokenizer['sha256'][:16]}), data.tokenizer is {name} (sha256 {key[0][:16]})")
        for name, want, have in (("add_bos", self.add_bos, key[1]), ("add_eos", self.add_eos, key[2])):
            if want != have:
                problems.append(f"data.{name}: shards made with {str(want).lower()}, configured {str(have).lower()}")
            # tokenizer_config.json (not hashed) may name other special tokens for the same vocabulary
            special = name[4:] + "_id"
            if want and have and self.tokenizer[special] != getattr(tokenizer, special):
                problems.append(f"{special}: shards made with {self.tokenizer[special]}, the tokenizer has "
                                f"{getattr(tokenizer, special)}")
        if problems:
            raise SourceError(f"{self.manifest_path}: prepared tokens do not match the configuration: "
                              + "; ".join(problems) + " (re-run python -m jaxllm.data.prepare)")
        with self._lock:
            self._ok.add(key)

    def __getstate__(self):
        return {"manifest_path": self.manifest_path, "tokenizer": self.tokenizer,
                "add_bos": self.add_bos, "add_eos": self.add_eos}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._ok, self._lock = set(), threading.Lock()


class PreparedTokens(np.ndarray):
    """One prepared document's int32 tokens; `origin` is checked by `documents.check_prepared`."""

    origin: _Origin | None = None

    def __array_finalize__(self, obj):
        self.origin = getattr(obj, "origin", None)

    def __reduce__(self):  # keep `origin` through pickling (grain worker processes)
        fn, args, state = super().__reduce__()
        return fn, args, (state, self.origin)

    def __setstate__(self, state):
        nd_state, self.origin = state
        super().__setstate__(nd_state)


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file (make one with python -m jaxllm.data.prepare)") from None
    except ValueError as e:
        raise SourceError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SourceError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise SourceError(f"{path}: version {manifest.get('version')!r}, this code reads version {VERSION}")
    return manifest


class PreparedSource:
    """Random access to the documents of a prepared folder, as int32 token arrays."""

    def __init__(self, folder: str):
        self.folder = folder
        self.manifest = manifest = read_manifest(folder)
        self.manifest_path = os.path.join(folder, MANIFEST)
        self.dtype = np.dtype(manifest["dtype"])
        self.files, self._tokens, docs = [], [], []
        self._offsets = []
        for i, shard in enumerate(manifest["shards"]):
            bin_path = os.path.join(folder, shard["tokens_file"])
            idx_path = os.path.join(folder, shard["index_file"])
            want = shard["tokens"] * self.dtype.itemsize
            try:
                have = os.path.getsize(bin_path)
            except OSError:
                raise SourceError(f"{bin_path}: missing shard (listed in {self.manifest_path})") from None
            if have != want:
                raise SourceError(f"{bin_path}: truncated or damaged shard: {have} bytes, the manifest "
                                  f"says {want} ({shard['tokens']} {self.dtype.name} tokens)")
            try:
                offsets = np.load(idx_path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise SourceError(f"{idx_path}: unreadable shard index ({e})") from None
            if (offsets.shape != (shard["documents"] + 1,) or offsets[0] != 0
                    or offsets[-1] != shard["tokens"]):
                raise SourceError(f"{idx_path}: index of shape {offsets.shape} ending at "
                                  f"{int(offsets[-1]) if len(offsets) else None} does not match the manifest "
                                  f"({shard['documents']} documents, {shard['tokens']} tokens)")
            self.files.append(bin_path)
            self._tokens.append(shard["tokens"])
            self._offsets.append(offsets)
            docs.append(shard["documents"])
        self._ends = np.cumsum(docs, dtype=np.int64)
        self.skipped: collections.Counter = collections.Counter()  # bad input was skipped at prepare time
        self.origin = _Origin(self.manifest_path, manifest)
        self._maps: list = [None] * len(self.files)
        self._lock = threading.Lock()

    @property
    def file_ids(self) -> np.ndarray:
        """The shard (index into `files`) of every document."""
        return np.repeat(np.arange(len(self.files), dtype=np.int32), np.diff(self._ends, prepend=0))

    def check(self, tokenizer, add_bos: bool, add_eos: bool) -> None:
        self.origin.check(tokenizer, add_bos, add_eos)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def _map(self, i: int) -> np.ndarray:
        mm = self._maps[i]
        if mm is None:
            with self._lock:
                if self._maps[i] is None:
                    n = self._tokens[i]
                    self._maps[i] = (np.memmap(self.files[i], self.dtype, mode="r", shape=(n,)) if n
                                     else np.zeros(0, self.dtype))
                mm = self._maps[i]
        return mm

    def __getitem__(self, index: int) -> PreparedTokens:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(index)
        s, d = locate(self._ends, index)
        a, b = int(self._offsets[s][d]), int(self._offsets[s][d + 1])
        out = np.asarray(self._map(s)[a:b], dtype=np.int32).view(PreparedTokens)
        out.origin = self.origin
        return out

    def __getstate__(self):  # memory maps are reopened lazily in the receiving process
        state = dict(self.__dict__)
        state["_maps"], state["_lock"] = [None] * len(self.files), None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

