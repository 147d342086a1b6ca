"""Exact dedup (hash of normalised text) and MinHash-LSH near dedup.

MinHash: each document becomes a set of shingles (word or character n-grams, hashed to 32 bits);
its signature is, for each of `num_perm` universal hash functions h_i(x) = (a_i x + b_i) mod p
(p = 2**32 - 5, the largest prime below 2**32; a_i in [1, p), b_i in [0, p), so a_i x + b_i < p**2
fits in uint64 and never wraps), the minimum over its shingles.
Two signatures agree at a position with probability equal to the sets' Jaccard similarity.

Scale: signatures go to disk in `.npy` shards as documents stream past. Locality-sensitive
hashing then runs band by band: for one band only, every document's `rows` signature values
are hashed to a bucket key, keys are sorted, and documents sharing a key become candidate pairs
(each joined to the first, lowest-id document of its bucket). A candidate pair counts only if
its full-signature Jaccard estimate reaches the threshold; verified pairs are merged with
union-find whose root is the lowest id, so each cluster keeps its first document. Memory: one
band's keys (~40 bytes per document) plus the union-find array (8 bytes per document).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from jaxllm.curate.text import mix64, ngram_hashes, normalize, word_hashes, words

_PRIME = (1 << 32) - 5
_FNV = np.uint64(0x100000001B3)


class ExactDedup:
    """Drops documents whose normalised text (lowercase, whitespace collapsed) was seen before."""

    name = "exact_dedup"

    def __init__(self):
        self._first: dict[bytes, int] = {}  # 16-byte digest -> id of the first document with it

    def __call__(self, text: str, doc_id: int) -> int | None:
        """The id of the earlier copy of `text`, or None (and `text` is remembered) if it is new."""
        key = hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=16).digest()
        first = self._first.setdefault(key, doc_id)
        return None if first == doc_id else first


def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.05, fn_weight: float = 0.95) -> tuple[int, int]:
    """(bands, rows) minimising the weighted area of false positives below `threshold` and false
    negatives above it under the banding S-curve 1 - (1 - J**rows)**bands (as datasketch does).
    False negatives weigh far more here because every candidate is verified on its full signature
    anyway; for threshold 0.8 and 128 permutations this gives 16 bands x 8 rows."""
    best, best_cost = (1, 1), np.inf
    lo, hi = np.linspace(0, threshold, 200), np.linspace(threshold, 1, 200)
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            fp = np.trapezoid(1 - (1 - lo ** rows) ** bands, lo)
            fn = np.trapezoid((1 - hi ** rows) ** bands, hi)
            cost = fp_weight * fp + fn_weight * fn
            if cost < best_cost:
                best, best_cost = (bands, rows), cost
    return best


class MinHashDedup:
    name = "minhash_dedup"

    def __init__(self, work_dir: str, *, num_perm: int = 128, ngram: int = 5, shingle: str = "word",
                 threshold: float = 0.8, bands: int | None = None, rows: int | None = None,
                 shard_docs: int = 100_000, seed: int = 42):
        self.work_dir, self.num_perm, self.ngram, self.shingle = work_dir, num_perm, ngram, shingle
        self.threshold, self.shard_docs = threshold, shard_docs
        self.bands, self.rows = (bands, rows) if bands else lsh_params(threshold, num_perm)
        rng = np.random.default_rng(seed)
        self._a = rng.integers(1, _PRIME, num_perm, dtype=np.uint64)[:, None]
        self._b = rng.integers(0, _PRIME, num_perm, dtype=np.uint64)[:, None]
        self._buffer: list[np.ndarray] = []
        self._shards: list[str] = []
        self._maps: list[np.ndarray] | None = None
        self.count = 0
        self.stats = {"bands": self.bands, "rows": self.rows, "candidate_pairs": 0, "verified_pairs": 0}
        os.makedirs(work_dir, exist_ok=True)

    def shingles(self, text: str) -> np.ndarray:
        """Distinct 32-bit shingle hashes; a document shorter than one shingle is one shingle."""
        if self.shingle == "char":
            units = np.frombuffer(normalize(text).encode("utf-32-le"), np.uint32).astype(np.uint64)
        else:
            units = word_hashes(words(text))
        if len(units) == 0:
            units = np.zeros(1, np.uint64)
        grams = ngram_hashes(units, min(self.ngram, len(units)))
        return np.unique((grams >> np.uint64(32)) % np.uint64(_PRIME))

    def signature(self, text: str) -> np.ndarray:
        x = self.shingles(text)
        sig = np.full(self.num_perm, _PRIME, np.uint64)
        for i in range(0, len(x), 4096):  # bounded (num_perm x 4096) temporaries for long documents
            sig = np.minimum(sig, ((self._a * x[None, i:i + 4096] + self._b) % np.uint64(_PRIME)).min(axis=1))
        return sig.astype(np.uint32)

    def add(self, text: str) -> int:
        """Adds the next document (ids count from 0 in call order); returns its id."""
        self._buffer.append(self.signature(text))
        if len(self._buffer) == self.shard_docs:
            self._flush()
        self.count += 1
        return self.count - 1

    def _flush(self) -> None:
        if self._buffer:
            path = os.path.join(self.work_dir, f"minhash-{len(self._shards):05d}.npy")
            np.save(path, np.stack(self._buffer))
            self._shards.append(path)
            self._buffer = []

    def _signatures(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty((len(ids), self.num_perm), np.uint32)
        shard = ids // self.shard_docs
        for s in np.unique(shard):
            mask = shard == s
            out[mask] = self._maps[s][ids[mask] - s * self.shard_docs]
        return out

    def _band_keys(self, band: int) -> np.ndarray:
        cols = slice(band * self.rows, (band + 1) * self.rows)
        keys = []
        for sig in self._maps:
            part = np.asarray(sig[:, cols], np.uint64)
            k = np.full(len(part), self.rows, np.uint64)
            for j in range(self.rows):
                k = (k ^ part[:, j]) * _FNV
            keys.append(mix64(k))
        return np.concatenate(keys)

    def duplicates(self) -> np.ndarray:
        """For each document id, the id of the kept document of its cluster, or -1 if it is kept."""
        self._flush()
        n = self.count
        parent = np.arange(n, dtype=np.int64)
        if n < 2:
            return np.full(n, -1, np.int64)
        self._maps = [np.load(path, mmap_mode="r") for path in self._shards]
        for band in range(self.bands):
            keys = self._band_keys(band)
            order = np.argsort(keys, kind="stable")  # stable: within a bucket, ids stay ascending
            sorted_keys = keys[order]
            repeat = np.concatenate([[False], sorted_keys[1:] == sorted_keys[:-1]])
            if not repeat.any():
                continue
            starts = np.flatnonzero(~repeat)
            first = starts[np.searchsorted(starts, np.flatnonzero(repeat), side="right") - 1]
            u, v = order[first], order[repeat]
            self.stats["candidate_pairs"] += len(u)
            roots = _roots(parent)
            todo = roots[u] != roots[v]  # pairs an earlier band already joined need no check
            u, v = u[todo], v[todo]
            for i in range(0, len(u), 65536):
                cu, cv = u[i:i + 65536], v[i:i + 65536]
                similar = (self._signatures(cu) == self._signatures(cv)).mean(axis=1) >= self.threshold
                for x, y in zip(cu[similar].tolist(), cv[similar].tolist()):
                    rx, ry = _find(parent, x), _find(parent, y)
                    if rx != ry:
                        parent[max(rx, ry)] = min(rx, ry)  # the root is the cluster's lowest id
                        self.stats["verified_pairs"] += 1
        self._maps = None
        roots = _roots(parent)
        dup = roots != np.arange(n)
        self.stats["clusters"] = int(len(np.unique(roots[dup])))
        return np.where(dup, roots, -1)

    def close(self) -> None:
        self._maps = None
        for path in self._shards:
            if os.path.exists(path):
                os.remove(path)


def _find(parent: np.ndarray, x: int) -> int:
    root = x
    while parent[root] != root:
        root = int(parent[root])
    while parent[x] != root:  # path compression
        parent[x], x = root, int(parent[x])
    return root


def _roots(parent: np.ndarray) -> np.ndarray:
    """Every node's root by vectorised pointer jumping (also compresses `parent` in place)."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent[:] = grand
