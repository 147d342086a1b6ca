"""Advantage estimators, as veRL computes them (`verl/trainer/ppo/core_algos.py`).

Arrays are [B, T] over a response (`mask` 1 on response tokens, 0 after the end and on padding);
scores and group ids are [B]. Everything is plain jnp, so it runs inside jit and under a mesh.

    gae                     GAE(gamma, lam) over the critic's values (masked tokens skipped), then
                            whitened over the mask; returns = advantages + values (before whitening)
    group_advantages        one scalar score per response, compared within its group (the
                            responses to one prompt): grpo ((s - mean) / (std + eps), Bessel std;
                            norm_by_std False is Dr. GRPO), rloo (leave-one-out: n/(n-1) (s - mean)),
                            reinforce_pp_baseline (s - group mean, then whitened over the mask);
                            a group of one gets mean 0 (and std 1)
    reinforce_pp            discounted returns of the token rewards, whitened over the mask
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ESTIMATORS = ("grpo", "rloo", "reinforce_pp_baseline")
WHITEN_EPS = 1e-8  # veRL's masked_whiten: rsqrt(var + 1e-8)


def masked_mean(x, mask, axis=None):
    return jnp.sum(x * mask, axis=axis) / jnp.sum(mask, axis=axis)


def masked_whiten(x, mask):
    """(x - mean) / sqrt(var + 1e-8) with the mean and the Bessel-corrected variance over `mask`."""
    mean = masked_mean(x, mask)
    n = jnp.sum(mask)
    var = masked_mean((x - mean) ** 2, mask) * n / (n - 1)
    return (x - mean) * jax.lax.rsqrt(var + WHITEN_EPS)


def gae(token_rewards, values, mask, *, gamma: float, lam: float):
    """(advantages, returns) [B, T]. Tokens outside the mask are skipped: the recursion carries
    the next value and the running advantage over them unchanged."""
    token_rewards, values, mask = (jnp.asarray(a, jnp.float32) for a in (token_rewards, values, mask))

    def step(carry, xs):
        next_value, last_gae = carry
        r, v, m = xs
        delta = r + gamma * next_value - v
        gae_t = delta + gamma * lam * last_gae
        next_value = v * m + (1 - m) * next_value
        last_gae = gae_t * m + (1 - m) * last_gae
        return (next_value, last_gae), last_gae

    B = token_rewards.shape[0]
    zeros = jnp.zeros((B,), jnp.float32)
    _, adv_TB = jax.lax.scan(step, (zeros, zeros), (token_rewards.T, values.T, mask.T), reverse=True)
    advantages = adv_TB.T
    returns = advantages + values
    return masked_whiten(advantages, mask), returns


def _group_stats(scores, group_ids, num_groups: int):
    """Per response: (its group's size, mean, Bessel std) from segment sums over group_ids."""
    ones = jnp.ones_like(scores)
    count = jax.ops.segment_sum(ones, group_ids, num_groups)
    total = jax.ops.segment_sum(scores, group_ids, num_groups)
    mean = total / jnp.maximum(count, 1.0)
    sq = jax.ops.segment_sum((scores - mean[group_ids]) ** 2, group_ids, num_groups)
    std = jnp.sqrt(sq / jnp.maximum(count - 1.0, 1.0))
    return count[group_ids], mean[group_ids], std[group_ids]


def group_advantages(scores, group_ids, mask, *, estimator: str, eps: float = 1e-6, norm_by_std: bool = True,
                     num_groups: int | None = None):
    """Advantages [B, T] (each response's scalar advantage on its response tokens).

    `group_ids` [B] are integers in [0, num_groups) (default: B). A group of one response has
    mean 0 and std 1 (veRL), so its advantage is its score (grpo) or its score unchanged (rloo)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator {estimator!r} is not one of {', '.join(ESTIMATORS)}")
    scores = jnp.asarray(scores, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    group_ids = jnp.asarray(group_ids, jnp.int32)
    count, mean, std = _group_stats(scores, group_ids, num_groups or scores.shape[0])
    single = count <= 1
    mean = jnp.where(single, 0.0, mean)
    if estimator == "grpo":
        std = jnp.where(single, 1.0, std)
        adv = (scores - mean) / (std + eps) if norm_by_std else scores - mean
    elif estimator == "rloo":
        factor = jnp.where(single, 1.0, count / jnp.maximum(count - 1.0, 1.0))
        adv = factor * (scores - mean)
    else:  # reinforce_pp_baseline
        return masked_whiten((scores - mean)[:, None] * mask, mask) * mask
    return adv[:, None] * mask


def reinforce_pp(token_rewards, mask, *, gamma: float):
    """(advantages, returns) [B, T]: discounted returns (reset after the response ends), whitened."""
    token_rewards, mask = jnp.asarray(token_rewards, jnp.float32), jnp.asarray(mask, jnp.float32)

    def step(running, xs):
        r, m = xs
        ret = r + gamma * running
        return ret * m, ret

    _, ret_TB = jax.lax.scan(step, jnp.zeros(token_rewards.shape[0], jnp.float32),
                             (token_rewards.T, mask.T), reverse=True)
    returns = ret_TB.T
    return masked_whiten(returns, mask) * mask, returns
