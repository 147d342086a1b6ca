"""One entry point for attention: `attention(q, k, v, *, impl, causal, segment_ids)`.

q is [B, T, N, H]; k and v are [B, S, K, H] with N % K == 0 (grouped-query attention).
`segment_ids` [B, T] (self-attention) keeps packed documents apart: a token attends only to
tokens of its own segment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "pallas")


def attention(q, k, v, *, impl: str = "xla", causal: bool = True, segment_ids=None, sm_scale=None,
              interpret: bool = False):
    """`interpret` runs the pallas kernel in Pallas' interpreter (CPU tests); other impls ignore it."""
    if impl in ("xla", "cudnn"):
        mask = None
        if segment_ids is not None:
            mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [B, 1, T, S]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, scale=sm_scale,
                                            implementation=impl)
    if impl == "pallas":
        return _sharded_flash(q, k, v, segment_ids=segment_ids, causal=causal, sm_scale=sm_scale,
                              interpret=interpret)
    raise ValueError(f"unknown attention impl {impl!r}; valid: {', '.join(IMPLEMENTATIONS)}")


def _sharded_flash(q, k, v, *, segment_ids, causal, sm_scale, interpret):
    """The Pallas kernel per device. A pallas_call has no sharding rule of its own, so under a
    multi-device mesh (`parallel.mesh.activation_sharding`) it runs inside `shard_map`: each
    device takes its rows of the batch (data, fsdp) and its heads (tensor), which is exact since
    attention mixes neither rows nor kv-head groups. Without a mesh it is called directly."""
    from jaxllm.kernels.flash_attention import flash_attention
    from jaxllm.parallel.mesh import active_mesh, logical_to_spec

    def kernel(q, k, v, seg):
        return flash_attention(q, k, v, segment_ids=seg, causal=causal, sm_scale=sm_scale, interpret=interpret)

    mesh = active_mesh()
    if mesh is None or mesh.size == 1:
        return kernel(q, k, v, segment_ids)
    qs = logical_to_spec(("batch", "length", "heads", "head_dim"))
    ks = logical_to_spec(("batch", "length", "kv_heads", "head_dim"))
    seg_spec = logical_to_spec(("batch", "length"))
    tensor = mesh.shape.get(qs[2], 1) if isinstance(qs[2], str) else 1
    if k.shape[2] % tensor:
        raise ValueError(f"model.attention=pallas under mesh.tensor={tensor} needs the kv heads "
                         f"({k.shape[2]}) to divide over it")
    if segment_ids is None:
        f = jax.shard_map(lambda q, k, v: kernel(q, k, v, None), mesh=mesh, in_specs=(qs, ks, ks),
                          out_specs=qs, check_vma=False)
        return f(q, k, v)
    f = jax.shard_map(kernel, mesh=mesh, in_specs=(qs, ks, ks, seg_spec), out_specs=qs, check_vma=False)
    return f(q, k, v, segment_ids)


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
