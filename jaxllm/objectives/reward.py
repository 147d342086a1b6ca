"""`task: reward`: a Bradley-Terry reward model on preference pairs.

The score of a sequence is a linear head on the decoder's final hidden state (after the final
norm) at its last real token (the last position with segment_ids > 0). The head is the extra
params {"reward_head": {"w": [D], "b": []}}. Pair rows hold ids[:-1] as `tokens` (the last id,
the reply's end-of-turn marker, is only a target), so the head reads the state that has seen the
whole reply; `jaxllm.score` builds its rows the same way.

    loss = -log sigmoid(r_chosen - r_rejected - margin)       (margin: batch["margin"] or 0)

as TRL's `RewardTrainer` (Llama 2's margin term). Metrics: accuracy (r_chosen > r_rejected,
ties count as wrong), rewards/chosen, rewards/rejected, rewards/margins (r_chosen - r_rejected),
averaged over real pairs (`pair_mask`).

The head starts at zero: the untrained model is indifferent (loss exactly log 2, every margin 0)
rather than ranking by a random projection of a pretrained model's features, and its scale
grows from the data. The decoder gets gradients from the second step on, once w != 0. The bias
cancels in r_chosen - r_rejected, so Bradley-Terry never trains it: it stays 0 and only exists
for heads loaded from elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.models import hidden_states
from jaxllm.objectives.base import safe_div
from jaxllm.objectives.dpo import batch_rows, concat_rows, real_tokens


def last_real_index(segment_ids_BT):
    """[B] index of each row's last position with segment_ids > 0 (0 for an all-padding row)."""
    real = segment_ids_BT > 0
    T = real.shape[1]
    last = T - 1 - jnp.argmax(real[:, ::-1], axis=1)
    return jnp.where(jnp.any(real, axis=1), last, 0)


def reward_scores(model_cfg, params, tokens, positions, segment_ids):
    """[B] fp32 scores: the reward head on the final hidden state at each row's last real token."""
    h_BTD = hidden_states(model_cfg, params, tokens, positions, segment_ids)
    idx = last_real_index(segment_ids)
    h_BD = jnp.take_along_axis(h_BTD, idx[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    head = params["reward_head"]
    return h_BD @ head["w"].astype(jnp.float32) + head["b"].astype(jnp.float32)


class RewardObjective:
    def __init__(self, cfg):
        self.model_cfg = cfg.model

    def extra_params(self, model_cfg, rng) -> dict:
        return {"reward_head": {"w": jnp.zeros((model_cfg.d_model,), jnp.float32),
                                "b": jnp.zeros((), jnp.float32)}}

    def extra_param_axes(self, model_cfg) -> dict:
        return {"reward_head": {"w": ("embed",), "b": ()}}

    def loss(self, params, batch, *, ref_params=None, rng=None):
        if "reward_head" not in params:
            raise ValueError("task reward: params have no reward_head (init them with extra_params)")
        chosen, rejected = batch_rows(batch, "chosen_"), batch_rows(batch, "rejected_")
        B = chosen[0].shape[0]
        tokens, _, positions, segment_ids, _ = concat_rows(chosen, rejected)
        r = reward_scores(self.model_cfg, params, tokens, positions, segment_ids)
        rc, rr = r[:B], r[B:]
        margin = batch["margin"].astype(jnp.float32) if "margin" in batch else 0.0
        losses = -jax.nn.log_sigmoid(rc - rr - margin)
        m = batch["pair_mask"].astype(jnp.float32)
        valid = m > 0
        s = lambda x: jnp.sum(jnp.where(valid, x, 0.0))
        stats = jax.lax.stop_gradient({"accuracy": s((rc > rr).astype(jnp.float32)), "rewards_chosen": s(rc),
                                       "rewards_rejected": s(rr)})
        return s(losses), {"weight": jnp.sum(m), "tokens": real_tokens(chosen, rejected), **stats}

    def finalize(self, sums: dict) -> dict:
        rc = safe_div(sums["rewards_chosen"], sums["weight"])
        rr = safe_div(sums["rewards_rejected"], sums["weight"])
        return {"loss": safe_div(sums["loss_sum"], sums["weight"]),
                "accuracy": safe_div(sums["accuracy"], sums["weight"]),
                "rewards/chosen": rc, "rewards/rejected": rr, "rewards/margins": rc - rr}
