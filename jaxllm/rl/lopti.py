"""Low-probability tokens in RL (Yang et al. 2025, "Do Not Let Low-Probability Tokens
Over-Dominate in RL for LLMs").

Advantage reweighting scales each token's advantage by a linear function of its old
probability, `(alpha * p_old + 1 - alpha) * A`, so low-probability tokens (whose gradients are
large) weigh less. Lopti splits the response tokens at old probability `eta` and updates each
mini-batch twice: first on the low-probability tokens only, then on the high-probability ones,
both against the same old log-probs. Both are off at 0 (`rl.adv_reweight_alpha`, `rl.lopti_eta`).
"""

from __future__ import annotations

import jax.numpy as jnp


def reweight_advantages(advantages, old_logp, *, alpha: float):
    """(alpha * exp(old_logp) + 1 - alpha) * advantages; alpha 0 returns them unchanged."""
    return (alpha * jnp.exp(old_logp) + 1.0 - alpha) * advantages


def lopti_masks(old_logp, mask, *, eta: float):
    """(low, high) [B, T] float32: the response tokens with old probability below `eta`, and the
    rest; disjoint, and their sum is the mask."""
    mask = jnp.asarray(mask, jnp.float32)
    low = (jnp.exp(old_logp) < eta).astype(jnp.float32) * mask
    return low, mask - low
