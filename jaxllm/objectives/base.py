"""The objective protocol shared by every task, and the pretraining objective.

An objective turns (params, batch) into a summed loss and a dict of summed statistics. Sums, not
means: the train step adds microbatches and the evaluator adds batches, and only then divides by
the summed `weight` (tokens, pairs, examples), so accumulation and sharded evaluation are exact.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax.numpy as jnp

from jaxllm.objectives.lm import lm_loss


class Objective(Protocol):
    def loss(self, params: dict, batch: dict, *, ref_params: dict | None = None,
             rng=None) -> tuple[Any, dict]:
        """(loss_sum, aux): aux holds scalar sums, at least "weight" and "tokens"."""

    def finalize(self, sums: dict) -> dict:
        """Metrics from summed aux plus sums["loss_sum"]; must return "loss"."""

    def extra_params(self, model_cfg, rng) -> dict:
        """Parameters beside the decoder's (e.g. a reward head), {} if none."""

    def extra_param_axes(self, model_cfg) -> dict:
        """Logical axes of `extra_params`, same structure."""


def safe_div(a, b):
    """a / b with b floored at 1: an empty batch (all padding) reports 0, not NaN."""
    return a / jnp.maximum(b, 1.0)


class NoExtraParams:
    def extra_params(self, model_cfg, rng) -> dict:
        return {}

    def extra_param_axes(self, model_cfg) -> dict:
        return {}


class LMObjective(NoExtraParams):
    """Next-token cross-entropy averaged over the batch's loss tokens (pretraining)."""

    def __init__(self, model_cfg, chunk_size: int):
        self.model_cfg, self.chunk_size = model_cfg, chunk_size

    def loss(self, params, batch, *, ref_params=None, rng=None):
        loss_sum, aux = lm_loss(self.model_cfg, params, batch, chunk_size=self.chunk_size)
        return loss_sum, {"weight": aux["weight"], "tokens": aux["weight"], "correct": aux["correct"]}

    def finalize(self, sums: dict) -> dict:
        return {"loss": safe_div(sums["loss_sum"], sums["weight"]),
                "accuracy": safe_div(sums["correct"], sums["weight"])}
