"""Supervised fine-tuning: next-token loss on assistant tokens, optional unlikelihood on negatives.

    loss_sum = sum_{loss_mask} -log p(target) + ul_weight * sum_{ul_mask} -log(1 - p(target))

`sft.reduce_loss` picks the denominator the step divides by (`aux["weight"]`):
  mean  the number of loss tokens of the batch: a per-token average (TRL's default);
  sum   the number of rows with any loss token: the optimised loss is each row's token SUM,
        averaged over the rows. With `sft.packing: false` a row is one conversation, so this
        is open-instruct's Tulu 3 `reduce_loss: sum` at one conversation per device and
        microbatch (long replies weigh more), independent of batch size, device count and
        gradient accumulation; with packing, a row's conversations are summed together.
Either way `nll` (per-token mean cross-entropy) and `accuracy` are reported per loss token, and
`ul` (mean -log(1 - p) per negative token) when unlikelihood is on.

Unlikelihood (Welleck et al. 2020) pushes down the probability of the tokens of a record's
negative reply (`ul_mask`, 1 where the target is such a token). -log(1 - p) is computed from
log p as -log1mexp(log p), accurate near p = 1 and clamped just below it (a token with p = 1
in fp32 costs ~16 nats instead of inf).
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxllm.models import hidden_states, output_embedding
from jaxllm.objectives.base import NoExtraParams, safe_div
from jaxllm.objectives.lm import chunked_logits_sum, target_logps
from jaxllm.objectives.preference import log1mexp


def chunked_sft_stats(hidden_BTD, w_DV, targets_BT, loss_mask_BT, ul_mask_BT, chunk_size: int):
    """(cross-entropy sum over loss_mask, correct argmax count over loss_mask, unlikelihood sum
    over ul_mask), from one pass over chunked logits; ul_mask None skips the last (0)."""

    def stats(logits, y, m, *ul):
        logp = target_logps(logits, y)
        correct = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
        ul_sum = -jnp.sum(log1mexp(logp) * ul[0]) if ul else jnp.zeros((), jnp.float32)
        return -jnp.sum(logp * m), jnp.sum(correct * m), ul_sum

    arrays = [targets_BT, loss_mask_BT.astype(jnp.float32)]
    if ul_mask_BT is not None:
        arrays.append(ul_mask_BT.astype(jnp.float32))
    return chunked_logits_sum(hidden_BTD, w_DV, stats, arrays, chunk_size)


class SFTObjective(NoExtraParams):
    """`task: sft` on packed chat rows (tokens, targets, positions, segment_ids, loss_mask, ul_mask)."""

    def __init__(self, cfg):
        if cfg.sft.reduce_loss not in ("mean", "sum"):
            raise ValueError(f"sft.reduce_loss: {cfg.sft.reduce_loss!r} is not one of mean, sum")
        if cfg.sft.unlikelihood_weight < 0:
            raise ValueError(f"sft.unlikelihood_weight must be >= 0, got {cfg.sft.unlikelihood_weight}")
        self.model_cfg, self.chunk_size = cfg.model, cfg.trainer.loss_chunk_size
        self.reduce, self.ul_weight = cfg.sft.reduce_loss, cfg.sft.unlikelihood_weight

    def loss(self, params, batch, *, ref_params=None, rng=None):
        use_ul = self.ul_weight > 0
        if use_ul and "ul_mask" not in batch:
            raise ValueError("sft.unlikelihood_weight > 0 but the batch has no ul_mask")
        h = hidden_states(self.model_cfg, params, batch["tokens"], batch["positions"], batch["segment_ids"])
        w = output_embedding(self.model_cfg, params).astype(h.dtype)
        ce, correct, ul = chunked_sft_stats(h, w, batch["targets"], batch["loss_mask"],
                                            batch["ul_mask"] if use_ul else None, self.chunk_size)
        loss_tokens = jnp.sum(batch["loss_mask"].astype(jnp.float32))
        loss_sum = ce + self.ul_weight * ul if use_ul else ce
        # sum: one unit per row that has loss tokens (padding rows add none).
        rows = jnp.sum((jnp.sum(batch["loss_mask"], axis=1) > 0).astype(jnp.float32))
        aux = {"weight": loss_tokens if self.reduce == "mean" else rows,
               "tokens": jnp.sum((batch["segment_ids"] > 0).astype(jnp.float32)),
               "loss_tokens": loss_tokens, "nll_sum": ce, "correct": correct}
        if use_ul:
            aux |= {"ul_sum": ul, "ul_tokens": jnp.sum(batch["ul_mask"].astype(jnp.float32))}
        return loss_sum, aux

    def finalize(self, sums: dict) -> dict:
        out = {"loss": safe_div(sums["loss_sum"], sums["weight"]),
               "nll": safe_div(sums["nll_sum"], sums["loss_tokens"]),
               "accuracy": safe_div(sums["correct"], sums["loss_tokens"])}
        if "ul_sum" in sums:
            out["ul"] = safe_div(sums["ul_sum"], sums["ul_tokens"])
        return out
