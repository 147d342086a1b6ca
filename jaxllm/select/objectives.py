"""Objectives of the rating models: a scalar head on a jaxllm decoder (the reward model's
`reward_head`, read at each row's last real token by `objectives.reward.reward_scores`), trained

  QuRater (Wettig et al. 2024): soft-label Bradley-Terry on judged pairs,
      loss = -p log sigmoid(s_B - s_A) - (1 - p) log sigmoid(s_A - s_B),   p = P(B over A)
  educational value (FineWeb-Edu): regression of the annotated score, loss = (s - y)^2.

A rating model's params are a reward model's ({"reward_head": {"w": [D], "b": []}} beside the
decoder), so `jaxllm.run.load_run` and `jaxllm.score` read a saved one as a reward model. Sums
over real rows, as every objective (`objectives.base`); `weight` is the number of real rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.objectives.base import safe_div
from jaxllm.objectives.reward import RewardObjective, reward_scores

PAIR_SIDES = ("a_", "b_")
ROW_KEYS = ("tokens", "positions", "segment_ids")


def soft_bt_losses(s_a, s_b, p):
    """Per pair: -p log sigmoid(s_b - s_a) - (1 - p) log sigmoid(s_a - s_b)."""
    d = s_b - s_a
    return -p * jax.nn.log_sigmoid(d) - (1.0 - p) * jax.nn.log_sigmoid(-d)


class SoftBTObjective(RewardObjective):
    """QuRater. Batch: a_{tokens,positions,segment_ids}, b_* [B, T]; p [B] (P(B over A));
    pair_mask [B]. Metrics: loss, accuracy (pairs with p != 1/2 whose order the scores give)."""

    def scores(self, params, batch):
        rows = [jnp.concatenate([batch[s + k] for s in PAIR_SIDES]) for k in ROW_KEYS]
        s = reward_scores(self.model_cfg, params, *rows)
        B = batch["p"].shape[0]
        return s[:B], s[B:]

    def loss(self, params, batch, *, ref_params=None, rng=None):
        s_a, s_b = self.scores(params, batch)
        p, m = batch["p"].astype(jnp.float32), batch["pair_mask"].astype(jnp.float32)
        decided = (p != 0.5).astype(jnp.float32) * m
        right = jnp.where(p > 0.5, s_b > s_a, s_a > s_b).astype(jnp.float32)
        stats = jax.lax.stop_gradient({"correct": jnp.sum(right * decided), "decided": jnp.sum(decided)})
        tokens = sum(jnp.sum((batch[s + "segment_ids"] > 0).astype(jnp.float32)) for s in PAIR_SIDES)
        return jnp.sum(soft_bt_losses(s_a, s_b, p) * m), {"weight": jnp.sum(m), "tokens": tokens, **stats}

    def finalize(self, sums: dict) -> dict:
        return {"loss": safe_div(sums["loss_sum"], sums["weight"]),
                "accuracy": safe_div(sums["correct"], sums["decided"])}


class EduObjective(RewardObjective):
    """Educational-value regression. Batch: tokens, positions, segment_ids [B, T]; score [B];
    row_mask [B]. Metrics: loss (MSE), mae, int_accuracy (clip(round(s), 0, 5) equals the
    rounded annotation), and precision / recall / f1 of `s >= threshold - 0.5` (FineWeb-Edu's
    int score >= threshold) against `score >= threshold`."""

    def __init__(self, cfg, threshold: float = 3.0):
        super().__init__(cfg)
        self.threshold = threshold

    def loss(self, params, batch, *, ref_params=None, rng=None):
        s = reward_scores(self.model_cfg, params, *(batch[k] for k in ROW_KEYS))
        y, m = batch["score"].astype(jnp.float32), batch["row_mask"].astype(jnp.float32)
        pred_keep = s >= self.threshold - 0.5
        keep = y >= self.threshold
        rounded = jnp.clip(jnp.round(s), 0, 5) == jnp.clip(jnp.round(y), 0, 5)
        f = lambda x: jnp.sum(x.astype(jnp.float32) * m)
        stats = jax.lax.stop_gradient({"abs_err": f(jnp.abs(s - y)), "int_right": f(rounded),
                                       "tp": f(pred_keep & keep), "fp": f(pred_keep & ~keep),
                                       "fn": f(~pred_keep & keep)})
        tokens = jnp.sum((batch["segment_ids"] > 0).astype(jnp.float32))
        return f((s - y) ** 2), {"weight": jnp.sum(m), "tokens": tokens, **stats}

    def finalize(self, sums: dict) -> dict:
        tp, fp, fn = sums["tp"], sums["fp"], sums["fn"]
        return {"loss": safe_div(sums["loss_sum"], sums["weight"]), "mae": safe_div(sums["abs_err"], sums["weight"]),
                "int_accuracy": safe_div(sums["int_right"], sums["weight"]),
                "precision": safe_div(tp, tp + fp), "recall": safe_div(tp, tp + fn),
                "f1": safe_div(2 * tp, 2 * tp + fp + fn)}
