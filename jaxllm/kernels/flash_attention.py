"""FlashAttention-2 in Pallas: fused forward, and a backward made of a dk/dv kernel and a dq kernel.

Layout follows `jaxllm.kernels.attention`: q [B, T, N, H], k/v [B, S, K, H], N % K == 0.
Grouped-query attention never repeats k/v: the kv head of q head `h` is `h // (N // K)`, picked in
the BlockSpec index maps, and the dk/dv kernel loops over the group's q heads so it writes each
kv head once.

Written against the portable Pallas API (ref indexing, `pl.ds`, `lax.fori_loop`) so one kernel
lowers through Triton on GPU and runs with `interpret=True` on CPU. On TPU `flash_attention`
hands off to JAX's splash attention (`jaxllm.kernels.splash_attention`).

Packed rows: with segment ids, each kernel also skips the blocks whose segment-id range cannot
meet its own (ranges computed in XLA before the call, `_segment_block_ranges`), so a row of short
documents costs about sum(doc_len ** 2) rather than row_len ** 2.

Numerics: matmuls take the input dtype and accumulate in fp32; softmax runs in base 2 (the
log2(e) factor is folded into the scale) and the forward saves only the log-sum-exp. Masked
logits get a large finite value instead of -inf, so rows that see no key (padding rows) stay
finite and need no special casing.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = math.log2(math.e)
_MIN_BLOCK = 16  # smallest tile Triton's tl.dot accepts


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static description of one call, passed to custom_vjp as a non-differentiable argument."""

    q_len: int  # valid (unpadded) lengths; the arrays reaching the kernels are padded
    kv_len: int
    causal: bool
    sm_scale: float
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    kv_padded: bool  # keys past kv_len exist and must be masked
    interpret: bool
    num_warps: int | None = None  # Triton launch settings; None: by head dim
    num_stages: int | None = None

    @property
    def causal_offset(self) -> int:
        # Bottom-right aligned causal mask (as in `reference_attention`): query t sees keys
        # s <= t + (kv_len - q_len); the usual mask when q_len == kv_len.
        return self.kv_len - self.q_len


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _dot_nt(a, b):  # [m, d] x [n, d] -> [m, n]
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):  # [m, n] x [m, d] -> [n, d]
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):  # [m, n] x [n, d] -> [m, d]
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _mask(cfg: _Config, q_pos, k_pos, q_seg, k_seg, causal: bool):
    """Boolean [bq, bk] mask of allowed (query, key) pairs, or None when every pair is allowed."""
    mask = None

    def conj(m):
        return m if mask is None else mask & m

    if causal:
        mask = conj(q_pos[:, None] + cfg.causal_offset >= k_pos[None, :])
    elif cfg.kv_padded and not cfg.causal:  # a causal mask hides padded keys from real queries
        mask = conj(k_pos[None, :] < cfg.kv_len)
    if q_seg is not None:
        mask = conj(q_seg[:, None] == k_seg[None, :])
    return mask


def _causal_kv_bounds(cfg: _Config, q_start, bq: int, bk: int, n_kv: int):
    """kv blocks [0, n_full) lie wholly below the diagonal of q rows [q_start, q_start + bq);
    blocks [n_full, n_end) straddle it; later blocks are fully masked and skipped."""
    off = cfg.causal_offset
    n_end = jnp.minimum(lax.div(q_start + bq + off + bk - 1, bk), n_kv)
    n_full = jnp.minimum(lax.div(q_start + off + 1, bk), n_end)
    return n_full, n_end


def _causal_q_bounds(cfg: _Config, k_start, bq: int, bk: int, n_q: int):
    """q blocks [n_lo, n_part) straddle the diagonal of keys [k_start, k_start + bk); blocks
    [n_part, n_q) see all those keys; blocks before n_lo see none of them and are skipped."""
    off = cfg.causal_offset
    # lax.div truncates toward zero; the max with 0 makes that a floor for negative numerators.
    n_lo = jnp.minimum(jnp.maximum(lax.div(k_start - off, bq), 0), n_q)
    n_part = jnp.clip(lax.div(k_start + bk - 1 - off + bq - 1, bq), n_lo, n_q)
    return n_lo, n_part


def _segment_block_ranges(seg, rows: int, cols: int):
    """For segment ids [B, L], blocks of `rows` positions against blocks of `cols` positions:
    (lo, hi) [B, L // rows] int32, the first and one-past-last column block whose id range
    [min, max] overlaps the row block's. Column blocks outside [lo, hi) hold no id of the row
    block, so they are skipped; the ones inside are still masked token by token. For packed rows
    (ids non-decreasing along the row) the range is exactly the blocks that share a document."""
    B, L = seg.shape
    r = seg.reshape(B, L // rows, rows)
    c = seg.reshape(B, L // cols, cols)
    overlap = ((c.min(-1)[:, None, :] <= r.max(-1)[:, :, None])
               & (c.max(-1)[:, None, :] >= r.min(-1)[:, :, None]))  # [B, row blocks, col blocks]
    n = overlap.shape[-1]
    lo = jnp.argmax(overlap, axis=-1)
    hi = n - jnp.argmax(overlap[..., ::-1], axis=-1)
    # A row block always overlaps the column blocks covering its own positions, so no range is empty.
    return lo.astype(jnp.int32), hi.astype(jnp.int32)


def _clip_range(lo, hi, seg_lo, seg_hi):
    """[lo, hi) intersected with the segment range (an empty range when they do not meet)."""
    return jnp.maximum(lo, seg_lo), jnp.minimum(hi, seg_hi)


def _compiler_params(cfg: _Config, head_dim: int):
    if cfg.interpret:
        return None
    # Passing Triton params also pins the Triton lowering (rather than Mosaic GPU).
    from jax.experimental.pallas import triton as pl_triton

    warps = cfg.num_warps or (4 if head_dim <= 64 else 8)
    return pl_triton.CompilerParams(num_warps=warps, num_stages=cfg.num_stages or 2)


def _over_kv_blocks(cfg: _Config, body, carry, q_start, bq: int, bk: int, n_kv: int, lo_ref,
                    hi_ref):
    """Run `body(j, carry, causal)` over the kv blocks that q rows [q_start, q_start + bq) can
    see: under a causal mask, blocks wholly below the diagonal skip the mask and blocks above it
    are not visited; with segment ids (lo_ref/hi_ref given), blocks outside the row block's
    segment range are not visited either."""
    if cfg.causal:
        n_full, n_end = _causal_kv_bounds(cfg, q_start, bq, bk, n_kv)
        spans = ((0, n_full, False), (n_full, n_end, True))
    else:
        spans = ((0, n_kv, False),)
    for start, stop, masked in spans:
        if lo_ref is not None:
            start, stop = _clip_range(start, stop, lo_ref[...], hi_ref[...])
        carry = lax.fori_loop(start, stop, functools.partial(body, causal=masked), carry)
    return carry


# ----------------------------------------------------------------------------------------------
# Forward


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, cfg: _Config, has_seg: bool):
    if has_seg:
        qseg_ref, kseg_ref, lo_ref, hi_ref, o_ref, lse_ref = refs
    else:
        qseg_ref = kseg_ref = lo_ref = hi_ref = None
        o_ref, lse_ref = refs
    bq, bk = cfg.block_q, cfg.block_k
    n_kv = k_ref.shape[0] // bk
    q_start = pl.program_id(0) * bq
    q = q_ref[...]
    q_pos = q_start + jnp.arange(bq)
    q_seg = qseg_ref[...] if has_seg else None
    scale = cfg.sm_scale * LOG2E

    def body(j, carry, causal):
        acc, m, l = carry
        k_start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        s = _dot_nt(q, k) * scale
        k_seg = kseg_ref[pl.ds(k_start, bk)] if has_seg else None
        mask = _mask(cfg, q_pos, k_start + jnp.arange(bk), q_seg, k_seg, causal)
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)  # rescales what was accumulated under the old max
        p = jnp.exp2(s - m_new[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
        return acc, m_new, l

    carry = (jnp.zeros((bq, q.shape[-1]), jnp.float32),
             jnp.full((bq,), MASK_VALUE, jnp.float32),
             jnp.zeros((bq,), jnp.float32))
    carry = _over_kv_blocks(cfg, body, carry, q_start, bq, bk, n_kv, lo_ref, hi_ref)
    acc, m, l = carry
    # l >= 1: the row maximum itself contributes exp2(0).
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l) * LOG2E  # base-2 log-sum-exp, as the backward expects


def _fwd(q, k, v, seg, cfg: _Config):
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    bq = cfg.block_q
    in_specs = [
        pl.BlockSpec((None, bq, None, H), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, S, None, H), lambda i, b, h: (b, 0, h // G, 0)),
        pl.BlockSpec((None, S, None, H), lambda i, b, h: (b, 0, h // G, 0)),
    ]
    args = [q, k, v]
    if seg is not None:
        block_range = pl.BlockSpec((None, None), lambda i, b, h: (b, i))
        in_specs += [pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
                     pl.BlockSpec((None, S), lambda i, b, h: (b, 0)), block_range, block_range]
        args += [seg, seg, *_segment_block_ranges(seg, bq, cfg.block_k)]
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, has_seg=seg is not None),
        grid=(T // bq, B, N),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bq, None, H), lambda i, b, h: (b, i, h, 0)),
                   pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, N, T), jnp.float32)],
        compiler_params=_compiler_params(cfg, H),
        interpret=cfg.interpret,
        name="flash_attention_fwd",
    )(*args)
    return o, lse


# ----------------------------------------------------------------------------------------------
# Backward. With P = exp2(s - lse), dS = P * (dO V^T - delta), delta = rowsum(dO * O):
# dV = P^T dO, dK = scale * dS^T Q, dQ = scale * dS K.


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Config,
                 has_seg: bool):
    if has_seg:
        qseg_ref, kseg_ref, lo_ref, hi_ref, dk_ref, dv_ref = refs
    else:
        qseg_ref = kseg_ref = None
        dk_ref, dv_ref = refs
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    n_q = q_ref.shape[0] // bq
    group = q_ref.shape[1]
    k_start = pl.program_id(0) * bk
    k = k_ref[...]
    v = v_ref[...]
    k_pos = k_start + jnp.arange(bk)
    k_seg = kseg_ref[...] if has_seg else None
    scale = cfg.sm_scale * LOG2E

    def body(i, carry, g, causal):
        dk, dv = carry
        q_start = pl.multiple_of(i * bq, bq)
        q = q_ref[pl.ds(q_start, bq), g, :]
        do = do_ref[pl.ds(q_start, bq), g, :]
        lse = lse_ref[g, pl.ds(q_start, bq)]
        delta = delta_ref[g, pl.ds(q_start, bq)]
        s = _dot_nt(q, k) * scale
        q_seg = qseg_ref[pl.ds(q_start, bq)] if has_seg else None
        mask = _mask(cfg, q_start + jnp.arange(bq), k_pos, q_seg, k_seg, causal)
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        p = jnp.exp2(s - lse[:, None])
        dv = dv + _dot_tn(p.astype(do.dtype), do)
        ds = p * (_dot_nt(do, v) - delta[:, None])
        dk = dk + _dot_tn(ds.astype(q.dtype), q)
        return dk, dv

    # q blocks above the diagonal see none of these keys and are skipped; those below it skip
    # the mask; with segment ids, q blocks outside this kv block's segment range are skipped.
    if cfg.causal:
        n_lo, n_part = _causal_q_bounds(cfg, k_start, bq, bk, n_q)
        spans = ((n_lo, n_part, True), (n_part, n_q, False))
    else:
        spans = ((0, n_q, False),)
    if has_seg:
        spans = tuple((*_clip_range(a, b, lo_ref[...], hi_ref[...]), m) for a, b, m in spans)

    def head(g, carry):  # the q heads sharing this kv head accumulate into one dk/dv
        for start, stop, masked in spans:
            carry = lax.fori_loop(start, stop, functools.partial(body, g=g, causal=masked), carry)
        return carry

    dk, dv = lax.fori_loop(0, group, head,
                           (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)))
    dk_ref[...] = (dk * cfg.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Config,
               has_seg: bool):
    if has_seg:
        qseg_ref, kseg_ref, lo_ref, hi_ref, dq_ref = refs
    else:
        qseg_ref = kseg_ref = lo_ref = hi_ref = None
        (dq_ref,) = refs
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    n_kv = k_ref.shape[0] // bk
    q_start = pl.program_id(0) * bq
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    q_pos = q_start + jnp.arange(bq)
    q_seg = qseg_ref[...] if has_seg else None
    scale = cfg.sm_scale * LOG2E

    def body(j, dq, causal):
        k_start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        s = _dot_nt(q, k) * scale
        k_seg = kseg_ref[pl.ds(k_start, bk)] if has_seg else None
        mask = _mask(cfg, q_pos, k_start + jnp.arange(bk), q_seg, k_seg, causal)
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        p = jnp.exp2(s - lse[:, None])
        ds = p * (_dot_nt(do, v) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    dq = _over_kv_blocks(cfg, body, jnp.zeros(q.shape, jnp.float32), q_start, bq, bk, n_kv,
                         lo_ref, hi_ref)
    dq_ref[...] = (dq * cfg.sm_scale).astype(dq_ref.dtype)


def _bwd(cfg: _Config, res, do):
    q, k, v, seg, o, lse = res
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    # delta is a cheap elementwise reduction: XLA fuses it, no kernel needed.
    delta = jnp.einsum("btnh,btnh->bnt", o.astype(jnp.float32), do.astype(jnp.float32))
    do = do.astype(q.dtype)
    has_seg = seg is not None
    params = _compiler_params(cfg, H)

    # dk/dv: one program per (kv block, batch, kv head); it walks all q blocks of the G q heads.
    kv_spec = pl.BlockSpec((None, bk, None, H), lambda j, b, h: (b, j, h, 0))
    group_spec = pl.BlockSpec((None, T, G, H), lambda j, b, h: (b, 0, h, 0))
    group_rows = pl.BlockSpec((None, G, T), lambda j, b, h: (b, h, 0))
    in_specs = [group_spec, kv_spec, kv_spec, group_spec, group_rows, group_rows]
    args = [q, k, v, do, lse, delta]
    if has_seg:
        block_range = pl.BlockSpec((None, None), lambda j, b, h: (b, j))
        in_specs += [pl.BlockSpec((None, T), lambda j, b, h: (b, 0)),
                     pl.BlockSpec((None, bk), lambda j, b, h: (b, j)), block_range, block_range]
        args += [seg, seg, *_segment_block_ranges(seg, bk, bq)]
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg, has_seg=has_seg),
        grid=(S // bk, B, K),
        in_specs=in_specs,
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=cfg.interpret,
        name="flash_attention_dkdv",
    )(*args)

    # dq: one program per (q block, batch, q head); it walks the kv blocks of its kv head.
    q_spec = pl.BlockSpec((None, bq, None, H), lambda i, b, h: (b, i, h, 0))
    full_kv = pl.BlockSpec((None, S, None, H), lambda i, b, h: (b, 0, h // G, 0))
    rows = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    in_specs = [q_spec, full_kv, full_kv, q_spec, rows, rows]
    args = [q, k, v, do, lse, delta]
    if has_seg:
        block_range = pl.BlockSpec((None, None), lambda i, b, h: (b, i))
        in_specs += [pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
                     pl.BlockSpec((None, S), lambda i, b, h: (b, 0)), block_range, block_range]
        args += [seg, seg, *_segment_block_ranges(seg, bq, bk)]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, has_seg=has_seg),
        grid=(T // bq, B, N),
        in_specs=in_specs,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=cfg.interpret,
        name="flash_attention_dq",
    )(*args)
    return dq, dk, dv, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, seg, cfg: _Config):
    return _fwd(q, k, v, seg, cfg)[0]


def _flash_fwd(q, k, v, seg, cfg: _Config):
    o, lse = _fwd(q, k, v, seg, cfg)
    return o, (q, k, v, seg, o, lse)


_flash.defvjp(_flash_fwd, _bwd)


# ----------------------------------------------------------------------------------------------
# Public entry point


def _default_blocks(row_bytes: int) -> tuple[int, int, int, int]:
    """(block_q, block_k, block_q_bwd, block_k_bwd) for rows of head_dim * itemsize bytes:
    FlashAttention-2-like tiles, shrunk for wide rows so the fp32 accumulators stay in registers
    and the tiles in shared memory; the backward keeps two accumulators, hence smaller tiles."""
    if row_bytes <= 128:  # bf16 head_dim 64
        return 128, 64, 64, 64
    if row_bytes <= 256:  # bf16 128, fp32 64
        return 128, 64, 64, 32
    if row_bytes <= 512:  # bf16 256, fp32 128
        return 64, 32, 32, 32
    return 32, 16, 16, 16


def _check_block(name: str, value: int):
    if not _is_pow2(value) or value < _MIN_BLOCK:
        raise ValueError(f"{name} must be a power of 2 >= {_MIN_BLOCK}, got {value}")


def _check_args(q, k, v, segment_ids, causal, num_warps, num_stages):
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    if k.shape != (B, S, K, H) or v.shape != k.shape:
        raise ValueError(f"k and v must be [B, S, K, H] matching q {q.shape}: {k.shape}, {v.shape}")
    if N % K:
        raise ValueError(f"q heads ({N}) must be a multiple of kv heads ({K})")
    if not q.dtype == k.dtype == v.dtype:  # the kernels' matmuls need one operand type
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if segment_ids is not None and (T != S or segment_ids.shape != (B, T)):
        raise ValueError(f"segment_ids must be [B, T] = {(B, T)} with q_len == kv_len, "
                         f"got {segment_ids.shape} and kv_len {S}")
    if causal and T > S:
        raise ValueError(f"causal attention needs q_len <= kv_len, got {T} > {S}: "
                         "the first queries would see no key")
    if num_warps is not None and (not _is_pow2(num_warps) or num_warps > 16):
        raise ValueError(f"num_warps must be a power of 2 <= 16, got {num_warps}")
    if num_stages is not None and num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")


def flash_attention(q, k, v, *, segment_ids=None, causal: bool = True, sm_scale=None,
                    interpret: bool = False, block_q: int | None = None, block_k: int | None = None,
                    num_warps: int | None = None, num_stages: int | None = None, platform: str | None = None):
    """Fused attention. q [B, T, N, H]; k, v [B, S, K, H] with N % K == 0; returns [B, T, N, H].

    segment_ids [B, T] (self-attention only, T == S): tokens attend within their segment.
    causal: query t sees keys s <= t + (S - T). sm_scale defaults to H ** -0.5.
    interpret: run the Pallas kernels in the interpreter (CPU tests); otherwise `platform` (the
    target devices'; default JAX's default backend) must be a GPU (Triton) or TPU (splash).
    block_q / block_k (powers of 2) override the tile sizes of the forward and backward kernels
    alike; num_warps / num_stages the Triton launch (all four tune the GPU kernel,
    `python -m benchmarks.attention --pallas-tiles ...`).
    """
    _check_args(q, k, v, segment_ids, causal, num_warps, num_stages)
    T, H, S = q.shape[1], q.shape[3], k.shape[1]
    sm_scale = float(H ** -0.5 if sm_scale is None else sm_scale)
    tuning = {k: v for k, v in (("block_q", block_q), ("block_k", block_k), ("num_warps", num_warps),
                                ("num_stages", num_stages)) if v is not None}

    if not interpret:
        backend = platform or jax.default_backend()
        if backend == "tpu" and tuning:
            raise ValueError(f"{', '.join(tuning)} tune the GPU (Triton) kernel; on TPU splash "
                             "attention picks its own tiles")
        if backend == "tpu":
            from jaxllm.kernels.splash_attention import splash_attention

            return splash_attention(q, k, v, segment_ids=segment_ids, causal=causal,
                                    sm_scale=sm_scale)
        if backend not in ("gpu", "cuda", "rocm"):
            raise RuntimeError(
                f"the Pallas flash attention kernel needs a GPU or TPU, but the target "
                f"platform is {backend!r}. Pass interpret=True to run it (slowly) in the Pallas "
                f"interpreter, or use impl='xla'.")

    # Pad to aligned shapes here, outside the custom_vjp, so JAX differentiates the padding (its
    # transpose is a slice) and the kernels only ever see whole tiles. Padded keys are masked by
    # position; padded query rows are computed and dropped.
    Hp = max(_MIN_BLOCK, pl.next_power_of_2(H))  # Triton tiles must be powers of 2
    defaults = _default_blocks(Hp * jnp.dtype(q.dtype).itemsize)
    fit_q = max(_MIN_BLOCK, pl.next_power_of_2(T))  # no tile larger than the sequence needs
    fit_k = max(_MIN_BLOCK, pl.next_power_of_2(S))
    bq_f, bq_b = (min(block_q or d, fit_q) for d in (defaults[0], defaults[2]))
    bk_f, bk_b = (min(block_k or d, fit_k) for d in (defaults[1], defaults[3]))
    for name, b in (("block_q", bq_f), ("block_k", bk_f), ("block_q", bq_b), ("block_k", bk_b)):
        _check_block(name, b)
    if segment_ids is None:
        Tp, Sp = _round_up(T, max(bq_f, bq_b)), _round_up(S, max(bk_f, bk_b))
    else:  # one array serves q and kv: pad both lengths alike
        Tp = Sp = _round_up(T, max(bq_f, bq_b, bk_f, bk_b))
    cfg = _Config(q_len=T, kv_len=S, causal=causal, sm_scale=sm_scale, block_q=bq_f,
                  block_k=bk_f, block_q_bwd=bq_b, block_k_bwd=bk_b, kv_padded=Sp != S,
                  interpret=bool(interpret), num_warps=num_warps, num_stages=num_stages)

    def pad(x, length):
        widths = ((0, 0), (0, length - x.shape[1]), (0, 0), (0, Hp - H))
        return x if all(w == (0, 0) for w in widths) else jnp.pad(x, widths)

    seg = segment_ids
    if seg is not None:
        seg = seg.astype(jnp.int32)
        if Tp != T:
            seg = jnp.pad(seg, ((0, 0), (0, Tp - T)))
    o = _flash(pad(q, Tp), pad(k, Sp), pad(v, Sp), seg, cfg)
    return o[:, :T, :, :H] if (Tp, Hp) != (T, H) else o
