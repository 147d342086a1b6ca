"""One entry point for attention: `attention(q, k, v, *, impl, causal, segment_ids)`.

q is [B, T, N, H]; k and v are [B, S, K, H] with N % K == 0 (grouped-query attention).
`segment_ids` [B, T] (self-attention) keeps packed documents apart: a token attends only to
tokens of its own segment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "pallas")


def attention(q, k, v, *, impl: str = "xla", causal: bool = True, segment_ids=None, sm_scale=None):
    if impl in ("xla", "cudnn"):
        mask = None
        if segment_ids is not None:
            mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [B, 1, T, S]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, scale=sm_scale,
                                            implementation=impl)
    if impl == "pallas":
        from jaxllm.kernels.flash_attention import flash_attention

        return flash_attention(q, k, v, segment_ids=segment_ids, causal=causal, sm_scale=sm_scale)
    raise ValueError(f"unknown attention impl {impl!r}; valid: {', '.join(IMPLEMENTATIONS)}")


def reference_attention(q, k, v, *, causal: bool = True, segment_ids=None, sm_scale=None):
    """Plain fp32 attention written out in full: the ground truth for kernel tests."""
    B, T, N, H = q.shape
    K = k.shape[2]
    scale = sm_scale if sm_scale is not None else H ** -0.5
    qg = q.astype(jnp.float32).reshape(B, T, K, N // K, H)
    s = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k.astype(jnp.float32)) * scale
    S = k.shape[1]
    mask = jnp.ones((B, 1, 1, T, S), bool)
    if causal:
        mask = mask & (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] + (S - T))
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None, None]
    s = jnp.where(mask, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("BKGTS,BSKH->BTKGH", p, v.astype(jnp.float32))
    return o.reshape(B, T, N, H).astype(q.dtype)
