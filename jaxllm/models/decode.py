"""Decoding with a KV cache over device arrays: `prefill`, `decode_step`, `generate`.

Prompts are left-padded into one [B, P] array (`pad_prompts` buckets P, so prompts of similar
length share a compilation). `prefill` runs the prompts through `llama.decoder_layer` with the
training attention (`kernels.attention.attention`, padding as segment 0) and fills cache slots
[0, P); each `decode_step` runs one token per row against the cache through
`kernels.attention.decode_attention`. Slot j of row b holds a real token iff j >= start_b.

`generate` is one jitted program per (model config, mesh, B, P, max_new_tokens, greedy, top_k,
top-p on/off): temperature, top_p, stop ids, pad id and the rng are traced. Under a mesh the
params stay sharded as in training and the rows shard over (data, fsdp); a batch that does not
divide is padded with dummy rows inside the program (each device then decodes ceil(B / shards)
rows instead of all B) and its outputs are replicated. Per row it returns the new tokens
(including the stop token that ended the row, `pad_id` after it), each token's log-prob and the
number of tokens generated: what an RL rollout needs.

Einsum letters as in `jaxllm.models.llama`; N in `tokens_BN` is the number of new tokens.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm.kernels.attention import attention, decode_attention
from jaxllm.models.llama import (
    ModelConfig, cast_params, decoder_layer, embed_tokens, lm_logits, rms_norm, rope_frequencies,
)
from jaxllm.parallel.mesh import MESH_AXES, activation_sharding, constrain, logical_to_spec

CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")


class KVCache(NamedTuple):
    k: jax.Array  # [L, B, S, K, H] in the compute dtype
    v: jax.Array  # [L, B, S, K, H]
    start: jax.Array  # [B] int32: the first real slot of each row (prompts are left-padded)
    index: jax.Array  # int32 scalar: the slot the next token goes to


class Generation(NamedTuple):
    tokens: jax.Array  # [B, N] int32: new tokens, the stop token included, pad_id after it
    logps: jax.Array  # [B, N] fp32: log-prob of each token (0 after the stop), see `pick_token`
    lengths: jax.Array  # [B] int32: tokens generated, the stop token included


# ----------------------------------------------------------------------------- sampling filters


def top_k_filter(logits, k: int):
    """Sets all but the k largest logits (per row, last axis) to -inf; k <= 0 disables.

    Ties with the k-th largest value are all kept, so more than k tokens can survive.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, -jnp.inf)


def top_p_filter(logits, p):
    """Nucleus filter: keeps the smallest set of top tokens whose probability mass is >= p.

    The top token is always kept (so p <= 0 means greedy-like); p >= 1 keeps everything. Equal
    logits are ranked by token index (lower first), so the kept set is exactly the smallest one.
    `p` may be a traced scalar.
    """
    V = logits.shape[-1]
    order = jnp.argsort(-logits, axis=-1, stable=True)  # descending, lower index first on ties
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    # Mass strictly before each token: shifting (not cum - probs) keeps exact sums exact.
    before = jnp.concatenate([jnp.zeros_like(cum[..., :1]), cum[..., :-1]], axis=-1)
    keep_sorted = (before < p) | (jnp.arange(V) == 0)
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
    # Rounding can push the running sum past 1 before the last tokens; p >= 1 must keep all.
    return jnp.where((p >= 1.0) | keep, logits, -jnp.inf)


def sample_logits(logits, key, *, temperature, top_k: int = 0, top_p=1.0, use_top_p: bool = True):
    """Samples token ids [...] from logits [..., V]: temperature, then top-k, then top-p.

    `temperature` must be > 0 (greedy decoding is an argmax). `use_top_p=False` skips the sort
    that top-p needs when the caller knows top_p >= 1.
    """
    logits = logits.astype(jnp.float32) / temperature
    logits = top_k_filter(logits, top_k)
    if use_top_p:
        logits = top_p_filter(logits, top_p)
    return jax.random.categorical(key, logits, axis=-1)


def pick_token(logits_BV, key, *, greedy: bool, temperature, top_k: int, top_p, use_top_p: bool):
    """(token [B], its log-prob [B]). The log-prob is the log-softmax of the temperature-scaled
    logits BEFORE top-k / top-p filtering (of the raw logits when greedy): the number an RL
    objective recomputes from a forward pass."""
    logits = logits_BV.astype(jnp.float32)
    if greedy:
        tok = jnp.argmax(logits, axis=-1)
    else:
        logits = logits / temperature
        tok = sample_logits(logits, key, temperature=1.0, top_k=top_k, top_p=top_p, use_top_p=use_top_p)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=-1)[:, 0]
    return tok.astype(jnp.int32), logp


# ----------------------------------------------------------------------------- prefill and one step


def _write(cache_LBSKH, new_BTKH, layer, slot):
    new = new_BTKH[None].astype(cache_LBSKH.dtype)
    return jax.lax.dynamic_update_slice(cache_LBSKH, new, (layer, 0, slot, 0, 0))


def _run_layers(cfg, params_c, tokens_BT, positions_BT, cache, attend):
    """Embedding, every `decoder_layer` (scanned, the cache in the carry so that it is updated in
    place) and the final norm. attend(q, k, v, k_LBSKH, v_LBSKH, layer) -> (att, (k_, v_))."""
    x = embed_tokens(cfg, params_c, tokens_BT)
    inv_freq = rope_frequencies(cfg)

    def layer(carry, inputs):
        x, k_all, v_all = carry
        p, l = inputs
        x, (k_all, v_all) = decoder_layer(cfg, p, x, positions_BT, inv_freq,
                                          lambda q, k, v: attend(q, k, v, k_all, v_all, l))
        return (x, constrain(k_all, CACHE_AXES), constrain(v_all, CACHE_AXES)), None

    layer_ids = jnp.arange(cfg.n_layers, dtype=jnp.int32)
    (x, k_all, v_all), _ = jax.lax.scan(layer, (x, cache.k, cache.v), (params_c["layers"], layer_ids),
                                        unroll=not cfg.scan_layers)
    return rms_norm(x, params_c["final_norm"], cfg.norm_eps), cache._replace(k=k_all, v=v_all)


def prefill(cfg: ModelConfig, params: dict, tokens_BP, lengths_B, max_len: int, *,
            all_positions: bool = False):
    """Runs left-padded prompts (row b's last lengths_B[b] tokens are real, lengths >= 1) into a
    new cache of `max_len` slots. Returns (fp32 logits [B, V] of each row's last token, or
    [B, P, V] of every slot with `all_positions`; the cache)."""
    B, P = tokens_BP.shape
    params_c = cast_params(cfg, params)
    start = (P - lengths_B).astype(jnp.int32)
    real_BP = jnp.arange(P)[None, :] >= start[:, None]
    positions = jnp.maximum(jnp.arange(P)[None, :] - start[:, None], 0)
    shape = (cfg.n_layers, B, max_len, cfg.n_kv_heads, cfg.hd)
    zeros = constrain(jnp.zeros(shape, cfg.compute_dtype), CACHE_AXES)
    cache = KVCache(zeros, zeros, start, jnp.int32(P))
    # Padding is segment 0: a real token never sees it, and pad queries see only pads (finite).
    segment_ids = real_BP.astype(jnp.int32)

    def attend(q, k, v, k_all, v_all, l):
        att = attention(q, k, v, impl=cfg.attention, causal=True, segment_ids=segment_ids)
        return att, (_write(k_all, k, l, 0), _write(v_all, v, l, 0))

    h, cache = _run_layers(cfg, params_c, tokens_BP, positions, cache, attend)
    if all_positions:
        return lm_logits(cfg, params_c, h), cache
    return lm_logits(cfg, params_c, h[:, -1:])[:, 0], cache


def decode_step(cfg: ModelConfig, params: dict, tokens_B, cache: KVCache):
    """Runs one token per row at slot `cache.index`. Returns (fp32 logits [B, V], cache)."""
    params_c = cast_params(cfg, params)
    S = cache.k.shape[2]
    positions = (cache.index - cache.start)[:, None]
    slots = jnp.arange(S)[None, :]
    mask_B1S = ((slots >= cache.start[:, None]) & (slots <= cache.index))[:, None, :]

    def attend(q, k, v, k_all, v_all, l):
        k_all, v_all = _write(k_all, k, l, cache.index), _write(v_all, v, l, cache.index)
        att = decode_attention(q, k_all[l], v_all[l], impl=cfg.attention, mask_BTS=mask_B1S)
        return att, (k_all, v_all)

    h, cache = _run_layers(cfg, params_c, tokens_B[:, None], positions, cache, attend)
    return lm_logits(cfg, params_c, h)[:, 0], cache._replace(index=cache.index + 1)


# ----------------------------------------------------------------------------- generation


def bucket_length(n: int) -> int:
    """The padded prompt width for n tokens: a multiple of 16 and of 1/8 of the next power of
    two, so at most 8 widths (compilations) per doubling of the prompt length."""
    step = max(16, (1 << max(n - 1, 0).bit_length()) // 8)
    return max(step, -(-n // step) * step)


def pad_prompts(prompts, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (left-padded int32 [B, bucket_length(longest)], lengths int32 [B])."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token (e.g. BOS)")
    lengths = np.array([len(p) for p in prompts], np.int32)
    P = bucket_length(int(lengths.max(initial=1)))
    tokens = np.full((len(prompts), P), pad_id, np.int32)
    for row, p in zip(tokens, prompts):
        row[P - len(p):] = p
    return tokens, lengths


def params_mesh(params):
    """The (data, fsdp, tensor) mesh the params are sharded on, or None."""
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.axis_names == MESH_AXES:
            return sharding.mesh
    return None


def _batch_shards(mesh) -> int:
    if mesh is None:
        return 1
    axes = logical_to_spec(("batch",))[0]
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))


def _rows_sharding(mesh, rows: int, ndim: int):
    if rows % _batch_shards(mesh):
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1)))


def _put(x, mesh, rows: int | None):
    """A host value as an array on the mesh (every process holds all of it): rows sharded when
    `rows` divides, else replicated. Device arrays pass through."""
    if isinstance(x, jax.Array) or mesh is None:
        return x
    x = np.asarray(x)
    sharding = _rows_sharding(mesh, rows, x.ndim) if rows else NamedSharding(mesh, PartitionSpec())
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def generate(cfg: ModelConfig, params: dict, tokens_BP, lengths_B, *, max_new_tokens: int,
             rng=0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, stop_ids=(),
             pad_id: int = 0, mesh=None) -> Generation:
    """Decodes up to `max_new_tokens` per row from left-padded prompts tokens_BP (see
    `pad_prompts`; row b's last lengths_B[b] tokens are its prompt, 1 <= lengths_B[b] <= P).

    temperature 0 decodes greedily (top_k / top_p are then ignored). A row stops after emitting
    any of `stop_ids`; the loop ends when every row has. `rng` is a jax key or an int seed.
    `mesh`: the run's (data, fsdp, tensor) mesh; default: the mesh the params are sharded on,
    none for one device. Every process of a multi-process mesh calls this with the same inputs.
    """
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    mesh = params_mesh(params) if mesh is None else mesh
    B = tokens_BP.shape[0]
    if max_new_tokens == 0:
        return Generation(jnp.zeros((B, 0), jnp.int32), jnp.zeros((B, 0), jnp.float32),
                          jnp.zeros((B,), jnp.int32))
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    elif not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):  # a raw uint32 PRNGKey
        rng = jax.random.wrap_key_data(rng)
    # -1 pads the stop list to a multiple of 4 entries so its length rarely forces a recompile.
    stop = [int(s) for s in np.asarray(stop_ids).reshape(-1)]
    stop += [-1] * (max(4, -(-len(stop) // 4) * 4) - len(stop))
    greedy = temperature == 0
    put = functools.partial(_put, mesh=mesh, rows=None)
    return _generate(
        cfg, params, _put(tokens_BP, mesh, B), _put(np.asarray(lengths_B, np.int32), mesh, B),
        put(np.asarray(jax.random.key_data(rng))), put(np.float32(1.0 if greedy else temperature)),
        put(np.float32(top_p)), put(np.asarray(stop, np.int32)), put(np.int32(pad_id)),
        key_impl=str(jax.random.key_impl(rng)), mesh=mesh, max_new_tokens=int(max_new_tokens),
        greedy=greedy, top_k=0 if greedy else int(top_k), use_top_p=not greedy and top_p < 1.0)


@functools.partial(jax.jit, static_argnames=("cfg", "key_impl", "mesh", "max_new_tokens", "greedy",
                                             "top_k", "use_top_p"))
def _generate(cfg, params, tokens_BP, lengths_B, key_data, temperature, top_p, stop_ids, pad_id, *,
              key_impl, mesh, max_new_tokens, greedy, top_k, use_top_p):
    B, N = tokens_BP.shape[0], max_new_tokens
    Bp = -(-B // _batch_shards(mesh)) * _batch_shards(mesh)
    # Dummy rows (one pad token, done from the start) make the batch divide over the shards.
    dummy_B = jnp.arange(Bp) >= B
    tokens_BP = jnp.where(dummy_B[:, None], pad_id, jnp.pad(tokens_BP, ((0, Bp - B), (0, 0))))
    lengths_B = jnp.pad(lengths_B.astype(jnp.int32), (0, Bp - B), constant_values=1)
    # All keys split up front: one threefry op in the program, which compiles slowly on CPU.
    keys = None if greedy else jax.random.split(jax.random.wrap_key_data(key_data, impl=key_impl), N)
    pick = functools.partial(pick_token, greedy=greedy, temperature=temperature, top_k=top_k,
                             top_p=top_p, use_top_p=use_top_p)
    with activation_sharding(mesh) if mesh is not None else contextlib.nullcontext():
        rows = lambda x: constrain(x, ("batch",) + (None,) * (x.ndim - 1))
        params_c = cast_params(cfg, params)  # once, outside the loop
        logits, cache = prefill(cfg, params_c, rows(tokens_BP), rows(lengths_B), tokens_BP.shape[1] + N)
        out = Generation(rows(jnp.full((Bp, N), pad_id, jnp.int32)), rows(jnp.zeros((Bp, N), jnp.float32)),
                         rows(jnp.zeros((Bp,), jnp.int32)))

        def cond(state):
            i, done = state[0], state[3]
            return (i < N) & ~jnp.all(done)

        def body(state):
            # Picks token i from the carried logits, then runs it for the next logits. Sampling
            # in one place keeps the program small; the price is one unused model step at the end.
            i, logits, cache, done, out = state
            tok, logp = pick(logits, None if keys is None else keys[i])
            tok = jnp.where(done, pad_id, tok)
            out = Generation(jax.lax.dynamic_update_slice_in_dim(out.tokens, tok[:, None], i, axis=1),
                             jax.lax.dynamic_update_slice_in_dim(
                                 out.logps, jnp.where(done, 0.0, logp)[:, None], i, axis=1),
                             jnp.where(done, out.lengths, i + 1))
            logits, cache = decode_step(cfg, params_c, tok, cache)
            return i + 1, logits, cache, done | jnp.isin(tok, stop_ids), out

        out = jax.lax.while_loop(cond, body, (jnp.int32(0), logits, cache, dummy_B, out))[4]
    out = Generation(*(x[:B] for x in out))
    if mesh is None:
        return out
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, _rows_sharding(mesh, B, x.ndim)), out)


def host_values(tree):
    """numpy copies of (possibly multi-process, sharded) arrays, on every process."""
    from jax.experimental import multihost_utils

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(x)

    return jax.tree.map(get, tree)
