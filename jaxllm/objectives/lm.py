"""Next-token cross-entropy and sequence log-probabilities computed in sequence chunks.

The [batch, length, vocab] fp32 logits never exist at once: each chunk's logits are computed,
reduced and dropped, and `jax.checkpoint` recomputes them in the backward pass. Every chunked
reduction (the loss here, SFT's unlikelihood term, DPO's per-sequence log-probs) goes through
`chunked_logits_sum`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.models import hidden_states, output_embedding


def chunked_logits_sum(hidden_BTD, w_DV, fn, arrays, chunk_size: int):
    """Sum over sequence chunks of `fn(logits_BcV, *chunks)`, a pytree of arrays.

    `arrays` are [B, T] per-position inputs (targets, masks); each chunk's fp32 logits
    [B, c, V] are computed, reduced by `fn` and dropped, and recomputed in the backward pass, so
    memory holds one chunk's logits at a time. The sequence is zero-padded to a multiple of the
    chunk: `fn` must give padded positions (mask 0) no weight. `fn`'s outputs must not depend on
    the chunk length (sums over the chunk axis, not of it), e.g. scalars or per-row [B] sums.
    """
    B, T, D = hidden_BTD.shape
    c = min(chunk_size, T)
    pad = (-T) % c
    if pad:
        hidden_BTD = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0)))
        arrays = [jnp.pad(a, ((0, 0), (0, pad))) for a in arrays]
    n = (T + pad) // c
    # [n, B, c, ...]: scan over chunks of the sequence axis.
    h = hidden_BTD.reshape(B, n, c, D).swapaxes(0, 1)
    xs = [a.reshape(B, n, c).swapaxes(0, 1) for a in arrays]

    @jax.checkpoint
    def chunk(h_BcD, *xs_Bc):
        logits = jnp.einsum("BCD,DV->BCV", h_BcD, w_DV, preferred_element_type=jnp.float32)
        return fn(logits, *xs_Bc)

    def body(carry, step):
        return jax.tree.map(jnp.add, carry, chunk(*step)), None

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(chunk, h[0], *(x[0] for x in xs)))
    out, _ = jax.lax.scan(body, zeros, (h, *xs))
    return out


def chunked_token_stats(hidden_BTD, w_DV, targets_BT, chunk_size: int, temperature: float = 1.0):
    """(log p(target) [B, T], entropy [B, T]) per position, fp32, of softmax(logits / temperature).

    Like `chunked_logits_sum`, each chunk's logits exist only while it is reduced (and are
    recomputed in the backward pass); here the per-position results are kept, not summed."""
    B, T, D = hidden_BTD.shape
    c = min(chunk_size, T)
    pad = (-T) % c
    h = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0))).reshape(B, -1, c, D).swapaxes(0, 1)
    y = jnp.pad(targets_BT, ((0, 0), (0, pad))).reshape(B, -1, c).swapaxes(0, 1)

    @jax.checkpoint
    def chunk(h_BcD, y_Bc):
        logits = jnp.einsum("BCD,DV->BCV", h_BcD, w_DV, preferred_element_type=jnp.float32) / temperature
        lse = jax.nn.logsumexp(logits, axis=-1)
        logp = jnp.take_along_axis(logits, y_Bc[..., None], axis=-1)[..., 0] - lse
        entropy = lse - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1)
        return logp, entropy

    _, (logp, entropy) = jax.lax.scan(lambda _, xs: (None, chunk(*xs)), None, (h, y))
    unchunk = lambda a: a.swapaxes(0, 1).reshape(B, -1)[:, :T]
    return unchunk(logp), unchunk(entropy)


def target_logps(logits_BcV, y_Bc):
    """log p(target) per position from fp32 logits."""
    lse = jax.nn.logsumexp(logits_BcV, axis=-1)
    return jnp.take_along_axis(logits_BcV, y_Bc[..., None], axis=-1)[..., 0] - lse


def chunked_cross_entropy(hidden_BTD, w_DV, targets_BT, mask_BT, chunk_size: int):
    """Returns (sum of masked token losses, number of correct argmax predictions)."""

    def stats(logits, y, m):
        m = m.astype(jnp.float32)
        correct = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
        return -jnp.sum(target_logps(logits, y) * m), jnp.sum(correct * m)

    return chunked_logits_sum(hidden_BTD, w_DV, stats, [targets_BT, mask_BT], chunk_size)


def sequence_logps(model_cfg, params, tokens, targets, positions, segment_ids, loss_mask, chunk_size: int = 128):
    """(per-row sums of log p(target) over `loss_mask` [B] fp32, per-row loss-token counts [B]).

    Chunked like the loss: no [B, T, V] fp32 logits exist at once. Rows are summed whole, so on
    packed rows the sum covers every segment of the row.
    """
    h = hidden_states(model_cfg, params, tokens, positions, segment_ids)
    w = output_embedding(model_cfg, params).astype(h.dtype)
    mask = loss_mask.astype(jnp.float32)
    logps = chunked_logits_sum(h, w, lambda logits, y, m: jnp.sum(target_logps(logits, y) * m, axis=1),
                               [targets, mask], chunk_size)
    return logps, jnp.sum(mask, axis=1)


def lm_loss(model_cfg, params, batch, *, chunk_size: int = 128):
    """Summed next-token loss over `batch["loss_mask"]`; metrics carry the token count."""
    h = hidden_states(model_cfg, params, batch["tokens"], batch["positions"], batch["segment_ids"])
    w = output_embedding(model_cfg, params).astype(h.dtype)
    loss_sum, correct = chunked_cross_entropy(h, w, batch["targets"], batch["loss_mask"], chunk_size)
    weight = jnp.sum(batch["loss_mask"].astype(jnp.float32))
    return loss_sum, {"weight": weight, "correct": correct}
