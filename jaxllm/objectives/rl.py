"""On-policy RL losses (veRL's `core_algos.py` formulas) and `RLObjective`, the loss of `task: rl`.

    agg_loss(loss_mat, mask, mode)   token-mean: sum(l m) / sum(m); seq-mean-token-sum: mean over
                                     rows of sum_t l m; seq-mean-token-mean: mean over rows of
                                     sum_t l m / sum_t m; seq-mean-token-sum-norm: sum(l m) / T
                                     (veRL divides by the response length T only, not by B)
    policy_loss(...)                 PPO clip with bounds [1 - clip_low, 1 + clip_high] (DAPO's
                                     clip-higher) and dual clip at dual_clip for A < 0; metrics
                                     clipfrac, ppo_kl, clipfrac_lower
    kl_penalty(logp, ref_logp, kind) k1: logp - ref; abs; k2: (logp - ref)^2 / 2; k3: e^(ref - logp)
                                     - (ref - logp) - 1, clamped as veRL does
    value_loss(...)                  0.5 * agg(max((v - R)^2, (clip(v, v_old +- clip) - R)^2))

`RLObjective.loss` returns sums like every objective: `loss_sum` and `aux["weight"]` are chosen
per aggregation mode so that the step's division by the summed weight gives exactly the
mini-batch's aggregated loss, however the mini-batch is split into microbatches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.models import hidden_states, init_params, output_embedding, param_axes
from jaxllm.objectives.base import safe_div
from jaxllm.objectives.lm import chunked_token_stats

LOSS_AGG = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "abs", "k2", "k3")


def _masked_mean(x, mask):
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def agg_loss(loss_mat, mask, mode: str):
    """The scalar loss of a [B, T] loss matrix over `mask` (see the module docstring)."""
    mask = mask.astype(jnp.float32)
    if mode == "token-mean":
        return _masked_mean(loss_mat, mask)
    row_sums = jnp.sum(loss_mat * mask, axis=-1)
    if mode == "seq-mean-token-sum":
        return jnp.mean(row_sums)
    if mode == "seq-mean-token-mean":
        return jnp.mean(row_sums / jnp.maximum(jnp.sum(mask, axis=-1), 1.0))
    if mode == "seq-mean-token-sum-norm":
        return jnp.sum(row_sums) / mask.shape[-1]
    raise ValueError(f"loss_agg {mode!r} is not one of {', '.join(LOSS_AGG)}")


def _ppo_token_losses(logp, old_logp, advantages, *, clip_low, clip_high, dual_clip):
    """Per-token clipped losses and the masks clipfrac / clipfrac_lower count."""
    neg_kl = jnp.clip(logp - old_logp, -20.0, 20.0)
    ratio = jnp.exp(neg_kl)
    loss1 = -advantages * ratio
    loss2 = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    clipped = jnp.maximum(loss1, loss2)
    loss3 = -advantages * dual_clip
    dual = jnp.minimum(loss3, clipped)
    losses = jnp.where(advantages < 0, dual, clipped)
    return losses, neg_kl, (loss2 > loss1), (clipped > loss3) & (advantages < 0)


def policy_loss(logp, old_logp, advantages, mask, *, clip_low: float = 0.2, clip_high: float = 0.2,
                dual_clip: float = 3.0, agg: str = "token-mean"):
    """(loss, metrics): PPO's clipped surrogate, aggregated by `agg`."""
    mask = mask.astype(jnp.float32)
    losses, neg_kl, clip1, clip_lower = _ppo_token_losses(
        logp, old_logp, advantages, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)
    metrics = {"clipfrac": _masked_mean(clip1.astype(jnp.float32), mask),
               "ppo_kl": _masked_mean(-neg_kl, mask),
               "clipfrac_lower": _masked_mean(clip_lower.astype(jnp.float32), mask)}
    return agg_loss(losses, mask, agg), jax.lax.stop_gradient(metrics)


def kl_penalty(logp, ref_logp, kind: str):
    """Per-token KL estimate between the policy and the reference (Schulman's k1 / k2 / k3)."""
    if kind == "k1":
        return logp - ref_logp
    if kind == "abs":
        return jnp.abs(logp - ref_logp)
    if kind == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if kind == "k3":
        kl = jnp.clip(ref_logp - logp, -20.0, 20.0)
        return jnp.clip(jnp.exp(kl) - kl - 1.0, -10.0, 10.0)
    raise ValueError(f"kl_kind {kind!r} is not one of {', '.join(KL_KINDS)}")


def value_token_losses(values, old_values, returns, *, clip: float):
    """(per-token 0.5 * clipped squared error, where the clipped term is larger)."""
    clipped_values = jnp.clip(values, old_values - clip, old_values + clip)
    loss1, loss2 = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * jnp.maximum(loss1, loss2), loss2 > loss1


def value_loss(values, old_values, returns, mask, *, clip: float, agg: str = "token-mean"):
    """(loss, metrics): the clipped value loss, x 0.5, and vf_clipfrac."""
    losses, clipped = value_token_losses(values, old_values, returns, clip=clip)
    mask = mask.astype(jnp.float32)
    return agg_loss(losses, mask, agg), {"vf_clipfrac": _masked_mean(clipped.astype(jnp.float32), mask)}


def entropy_from_logits(logits):
    """Entropy of softmax(logits) over the last axis, fp32."""
    logits = logits.astype(jnp.float32)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1)


# ----------------------------------------------------------------------------- the task's objective


def _agg_sums(loss_mat, mask, mode: str, rows_per_update: int, T: int):
    """(sum, weight) of one microbatch such that sum over microbatches / sum of weights is
    agg_loss over the whole mini-batch of `rows_per_update` rows."""
    row_sums = jnp.sum(loss_mat * mask, axis=-1)
    rows = jnp.float32(mask.shape[0])
    if mode == "token-mean":
        return jnp.sum(row_sums), jnp.sum(mask)
    if mode == "seq-mean-token-sum":
        return jnp.sum(row_sums), rows
    if mode == "seq-mean-token-mean":
        return jnp.sum(row_sums / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)), rows
    if mode == "seq-mean-token-sum-norm":  # sum / T over the mini-batch: scale so rows cancel
        return jnp.sum(row_sums) * rows_per_update / T, rows
    raise ValueError(f"loss_agg {mode!r} is not one of {', '.join(LOSS_AGG)}")


def critic_values(model_cfg, critic_params, batch):
    """[B, T] fp32 values: a scalar head on the critic decoder's final hidden state at each
    position (the state before the target token there, as veRL's critic reads it)."""
    h = hidden_states(model_cfg, critic_params, batch["tokens"], batch["positions"], batch["segment_ids"])
    head = critic_params["value_head"]
    return h.astype(jnp.float32) @ head["w"].astype(jnp.float32) + head["b"].astype(jnp.float32)


class RLObjective:
    """The policy's clipped loss (+ KL-to-reference and entropy terms) and, for estimator gae,
    the critic's clipped value loss, on rollout rows.

    A batch row is a prompt + response: tokens, targets, positions, segment_ids (1 on real
    tokens) [B, T]; loss_mask 1 on the response's target positions; old_logp, ref_logp,
    advantages float32 [B, T] (and for the critic returns, old_values). The policy's log-probs
    are of the temperature-scaled logits, as the rollout sampled them. The critic is the extra
    param tree "critic" (a decoder plus "value_head"); policy and critic params are disjoint, so
    one update of the summed losses updates each by its own loss (with its own optimizer state,
    `tasks.rl`). Both losses use the same mask and aggregation, so they share one weight."""

    def __init__(self, cfg):
        rl = cfg.rl
        self.model_cfg, self.chunk_size, self.rl = cfg.model, cfg.trainer.loss_chunk_size, rl
        self.temperature = rl.temperature if rl.temperature > 0 else 1.0
        self.rows_per_update = rl.rows_per_step // rl.mini_batches
        self.has_critic = rl.estimator == "gae"

    def extra_params(self, model_cfg, rng) -> dict:
        if not self.has_critic:
            return {}
        head = {"w": jnp.zeros((model_cfg.d_model,), jnp.float32), "b": jnp.zeros((), jnp.float32)}
        return {"critic": init_params(model_cfg, rng) | {"value_head": head}}

    def extra_param_axes(self, model_cfg) -> dict:
        if not self.has_critic:
            return {}
        return {"critic": param_axes(model_cfg) | {"value_head": {"w": ("embed",), "b": ()}}}

    def token_stats(self, params, batch):
        """(log-prob of each target, entropy) [B, T] under the temperature-scaled policy."""
        h = hidden_states(self.model_cfg, params, batch["tokens"], batch["positions"], batch["segment_ids"])
        w = output_embedding(self.model_cfg, params).astype(h.dtype)
        return chunked_token_stats(h, w, batch["targets"], self.chunk_size, self.temperature)

    def values(self, params, batch):
        return critic_values(self.model_cfg, params["critic"], batch)

    def loss(self, params, batch, *, ref_params=None, rng=None):
        rl, mask = self.rl, batch["loss_mask"].astype(jnp.float32)
        T = mask.shape[-1]
        logp, entropy = self.token_stats(params, batch)
        token_loss, neg_kl, clip1, clip_lower = _ppo_token_losses(
            logp, batch["old_logp"], batch["advantages"], clip_low=rl.clip_low, clip_high=rl.clip_high,
            dual_clip=rl.dual_clip)
        kl = kl_penalty(logp, batch["ref_logp"], rl.kl_kind)
        if rl.kl_coef > 0 and not rl.kl_in_reward:
            token_loss = token_loss + rl.kl_coef * kl
        if rl.entropy_coef > 0:
            token_loss = token_loss - rl.entropy_coef * entropy
        pg_sum, weight = _agg_sums(token_loss, mask, rl.loss_agg, self.rows_per_update, T)
        s = lambda x: jnp.sum(jax.lax.stop_gradient(x).astype(jnp.float32) * mask)
        aux = {"weight": weight, "tokens": jnp.sum(mask), "pg_loss": jax.lax.stop_gradient(pg_sum),
               "clipfrac": s(clip1), "ppo_kl": s(-neg_kl), "clipfrac_lower": s(clip_lower), "entropy": s(entropy),
               "kl_ref": s(kl)}
        if not self.has_critic:
            return pg_sum, aux
        v_losses, v_clipped = value_token_losses(self.values(params, batch), batch["old_values"], batch["returns"],
                                                 clip=rl.value_clip)
        vf_sum, _ = _agg_sums(v_losses, mask, rl.loss_agg, self.rows_per_update, T)
        aux |= {"vf_loss": jax.lax.stop_gradient(vf_sum), "vf_clipfrac": s(v_clipped)}
        return pg_sum + vf_sum, aux

    def finalize(self, sums: dict) -> dict:
        w, n = sums["weight"], sums["tokens"]
        out = {"loss": safe_div(sums["loss_sum"], w), "pg_loss": safe_div(sums["pg_loss"], w)}
        out |= {k: safe_div(sums[k], n) for k in ("clipfrac", "ppo_kl", "clipfrac_lower", "entropy", "kl_ref")}
        if "vf_loss" in sums:
            out |= {"vf_loss": safe_div(sums["vf_loss"], w), "vf_clipfrac": safe_div(sums["vf_clipfrac"], n)}
        return out
