"""TPU path of `flash_attention`: JAX's splash attention behind the same interface.

Splash works per batch element on head-major arrays, so q [B, T, N, H] becomes [B, K, G, T, H]
and the MQA variant (one kv head shared by G q heads) is vmapped over batch and kv heads: grouped
attention without repeating k/v. Splash does not scale the logits, so q is scaled first.
Lengths are padded to a multiple of 128 (the TPU lane width splash's tiles need); segment ids
keep the padding out of real rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_LANES = 128


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _block(length: int) -> int:
    """Largest splash tile (<= 512, a multiple of 128) that divides the padded length."""
    return next(b for b in (512, 256, 128) if length % b == 0)


@functools.lru_cache(maxsize=64)
def _kernel(q_len: int, kv_len: int, group: int, causal: bool, offset: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    shape = (q_len, kv_len)
    head_mask = splash.CausalMask(shape, offset=offset) if causal else splash.FullMask(shape)
    bq, bkv = _block(q_len), _block(kv_len)
    sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                              block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                              block_kv_dq=bkv)
    return splash.make_splash_mqa(splash.MultiHeadMask([head_mask] * group), block_sizes=sizes,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q, k, v, *, segment_ids=None, causal: bool = True, sm_scale=None,
                     interpret: bool = False):
    """Same contract as `jaxllm.kernels.flash_attention.flash_attention`; TPU only unless
    interpret=True."""
    try:
        from jax.experimental.pallas.ops.tpu import splash_attention as splash
    except ImportError as e:  # splash ships inside jax; a build without it cannot run this path
        raise RuntimeError("this JAX build has no splash attention (jax.experimental.pallas."
                           "ops.tpu.splash_attention); use impl='xla'") from e
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    if causal and T > S:
        raise ValueError(f"causal attention needs q_len <= kv_len, got {T} > {S}")
    scale = H ** -0.5 if sm_scale is None else sm_scale
    Tp, Sp = _round_up(T, _LANES), _round_up(S, _LANES)

    seg = None
    if segment_ids is not None:
        # Padding gets an id no real token has; padded rows then see only padded keys (at least
        # themselves), so no softmax row is empty.
        ids = segment_ids.astype(jnp.int32)
        ids = jnp.pad(ids, ((0, 0), (0, Tp - T)), constant_values=jnp.min(ids) - 1)
        seg = splash.SegmentIds(q=ids, kv=ids)
    elif not causal and Sp != S:
        # Hide padded keys; under a causal mask no real query reaches them anyway.
        q_ids = jnp.zeros((B, Tp), jnp.int32)
        kv_ids = jnp.broadcast_to((jnp.arange(Sp) >= S).astype(jnp.int32), (B, Sp))
        seg = splash.SegmentIds(q=q_ids, kv=kv_ids)

    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
    qs = jnp.pad(qs, ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
    qs = qs.reshape(B, Tp, K, G, H).transpose(0, 2, 3, 1, 4)  # [B, K, G, Tp, H]
    kv_pad = ((0, 0), (0, Sp - S), (0, 0), (0, 0))
    ks = jnp.pad(k, kv_pad).transpose(0, 2, 1, 3)  # [B, K, Sp, H]
    vs = jnp.pad(v, kv_pad).transpose(0, 2, 1, 3)

    kernel = _kernel(Tp, Sp, G, causal, S - T, bool(interpret))
    per_kv_head = jax.vmap(lambda q_, k_, v_, s_: kernel(q_, k_, v_, segment_ids=s_),
                           in_axes=(0, 0, 0, None))
    o = jax.vmap(per_kv_head)(qs, ks, vs, seg)  # [B, K, G, Tp, H]
    return o.transpose(0, 3, 1, 2, 4).reshape(B, Tp, N, H)[:, :T]
