"""Next-token cross-entropy computed in sequence chunks.

The [batch, length, vocab] fp32 logits never exist at once: each chunk's logits are computed,
reduced and dropped, and `jax.checkpoint` recomputes them in the backward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.models import hidden_states, output_embedding


def chunked_cross_entropy(hidden_BTD, w_DV, targets_BT, mask_BT, chunk_size: int):
    """Returns (sum of masked token losses, number of correct argmax predictions)."""
    B, T, D = hidden_BTD.shape
    c = min(chunk_size, T)
    pad = (-T) % c
    if pad:
        hidden_BTD = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0)))
        targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
        mask_BT = jnp.pad(mask_BT, ((0, 0), (0, pad)))
    n = (T + pad) // c
    # [n, B, c, ...]: scan over chunks of the sequence axis.
    h = hidden_BTD.reshape(B, n, c, D).swapaxes(0, 1)
    y = targets_BT.reshape(B, n, c).swapaxes(0, 1)
    m = mask_BT.reshape(B, n, c).swapaxes(0, 1).astype(jnp.float32)

    @jax.checkpoint
    def chunk_loss(h_BcD, y_Bc, m_Bc):
        logits = jnp.einsum("BCD,DV->BCV", h_BcD, w_DV, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, y_Bc[..., None], axis=-1)[..., 0]
        correct = (jnp.argmax(logits, axis=-1) == y_Bc).astype(jnp.float32)
        return jnp.sum((lse - target_logit) * m_Bc), jnp.sum(correct * m_Bc)

    def body(carry, xs):
        loss, correct = chunk_loss(*xs)
        return (carry[0] + loss, carry[1] + correct), None

    zero = jnp.zeros((), jnp.float32)
    (loss_sum, correct), _ = jax.lax.scan(body, (zero, zero), (h, y, m))
    return loss_sum, correct


def lm_loss(model_cfg, params, batch, *, chunk_size: int = 128):
    """Summed next-token loss over `batch["loss_mask"]`; metrics carry the token count."""
    h = hidden_states(model_cfg, params, batch["tokens"], batch["positions"], batch["segment_ids"])
    w = output_embedding(model_cfg, params).astype(h.dtype)
    loss_sum, correct = chunked_cross_entropy(h, w, batch["targets"], batch["loss_mask"], chunk_size)
    weight = jnp.sum(batch["loss_mask"].astype(jnp.float32))
    return loss_sum, {"weight": weight, "correct": correct}
