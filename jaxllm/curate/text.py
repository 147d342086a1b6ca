"""Stable 64-bit hashing of words and word n-grams: the quality classifier's features.

Hashes must be the same in every process and run (Python's `hash(str)` is salted per process),
so words are hashed with blake2b once each (cached) and n-grams are combined from the word
hashes with vectorised numpy arithmetic, wrapping modulo 2**64.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

_WORD = re.compile(r"\w+")
_MULT = np.uint64(0x100000001B3)  # FNV-1a 64-bit prime: odd, so the polynomial hash is a bijection per step
_word_cache: dict[str, int] = {}
_CACHE_LIMIT = 1 << 20


def words(text: str) -> list[str]:
    """Lowercased words with punctuation stripped (runs of letters, digits and underscores)."""
    return _WORD.findall(text.lower())


def mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads the bits of a polynomial hash so every bit is usable."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def hash_str(s: str) -> int:
    h = _word_cache.get(s)
    if h is None:
        if len(_word_cache) >= _CACHE_LIMIT:  # bounded: a long tail of rare words must not grow it forever
            _word_cache.clear()
        h = _word_cache[s] = int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "little")
    return h


def word_hashes(tokens: list[str]) -> np.ndarray:
    return np.fromiter((hash_str(t) for t in tokens), np.uint64, len(tokens))


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """Hash of each run of `n` consecutive items (len(hashes) - n + 1 values; none if shorter)."""
    m = len(hashes) - n + 1
    if m <= 0:
        return np.zeros(0, np.uint64)
    h = hashes[:m].copy()
    for k in range(1, n):
        h = h * _MULT + hashes[k:k + m]  # uint64 arrays wrap silently: arithmetic modulo 2**64
    return mix64(h)

