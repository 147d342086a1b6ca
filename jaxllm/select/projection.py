"""Seeded random projections of long vectors (LESS's gradient features, after TRAK).

`project(x_BP, seed, dims)` is x @ R with R a [P, dims] Rademacher matrix, entries +-1/sqrt(dims),
so E[<Ru, Rv>] = <u, v> and inner products are preserved within Johnson-Lindenstrauss bounds
(|<Ru, Rv> - <u, v>| <~ a few / sqrt(dims) * |u| |v|). R is never stored: block j of its rows
(BLOCK rows) is generated from (seed, j) inside a scan, 32 signs per random word, so its rows do
not depend on P: the features of a vector and of that vector zero-padded are the same.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

BLOCK = 1024  # rows of R generated at a time
_KEY_DOMAIN = 0x1E55  # keeps the projection's key apart from other users of the same seed


def _signs(key, rows: int, dims: int):
    """[rows, dims] float32 of +-1 from 32-bit words, one bit each."""
    bits = jax.random.bits(key, (rows, dims // 32), jnp.uint32)
    unpacked = (bits[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    return unpacked.reshape(rows, dims).astype(jnp.float32) * 2.0 - 1.0


def project(x_BP, seed: int, dims: int):
    """x_BP @ R: [B, dims] float32 (see the module doc). dims must be a multiple of 32."""
    if dims <= 0 or dims % 32:
        raise ValueError(f"projection dims must be a positive multiple of 32, got {dims}")
    B, P = x_BP.shape
    n = -(-P // BLOCK)
    x_nBc = jnp.pad(x_BP.astype(jnp.float32), ((0, 0), (0, n * BLOCK - P))).reshape(B, n, BLOCK).swapaxes(0, 1)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), _KEY_DOMAIN)

    def block(acc_Bk, xs):
        j, x_Bc = xs
        r_ck = _signs(jax.random.fold_in(key, j), BLOCK, dims)
        return acc_Bk + jnp.einsum("bc,ck->bk", x_Bc, r_ck, preferred_element_type=jnp.float32), None

    out, _ = jax.lax.scan(block, jnp.zeros((B, dims), jnp.float32), (jnp.arange(n), x_nBc))
    return out / math.sqrt(dims)
