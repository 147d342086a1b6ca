"""`task: dpo`: pairwise preference objectives (DPO and its variants) and KTO.

Both run the policy on the batch's rows, take per-sequence sums of completion-token log-probs
(`lm.sequence_logps`, chunked) and hand them to `preference.preference_loss` / `kto_loss`. The
loss is summed over real examples (`pair_mask`), so `aux["weight"]` is their count.

Reference log-probs come from the batch when the reference is cached (`ref_chosen_logps`,
`ref_rejected_logps`; KTO: `ref_logps`, `ref_kl_logps`, all made by `reference_fields` in the
cache pass), else from a live `ref_params` (under stop_gradient). Reference-free losses (simpo,
cpo, orpo, rrhf, slic) use neither.

Metrics carry TRL's names: rewards/chosen, rewards/rejected, rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected (plus nll_loss for cpo/orpo/rrhf/slic,
log_odds_chosen for orpo, kl for KTO), each averaged over real examples (KTO: rewards and logps
of chosen over desirable examples, of rejected over undesirable ones).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.data.rows import ROW_FIELDS
from jaxllm.objectives.base import NoExtraParams, safe_div
from jaxllm.objectives.lm import sequence_logps
from jaxllm.objectives.preference import LOSSES, check_hparams, kto_kl_estimate, kto_loss, preference_loss



def batch_rows(batch: dict, prefix: str) -> list:
    """The five row arrays `prefix + field` of a batch (e.g. prefix "chosen_")."""
    missing = [prefix + f for f in ROW_FIELDS if prefix + f not in batch]
    if missing:
        raise ValueError(f"batch lacks {', '.join(missing)} (has {', '.join(sorted(batch))})")
    return [batch[prefix + f] for f in ROW_FIELDS]


def concat_rows(*row_sets: list) -> list:
    """Row sets stacked along the batch axis, the shorter padded at the end (segment 0, mask 0)."""
    T = max(rows[0].shape[1] for rows in row_sets)
    pad = lambda a: jnp.pad(a, ((0, 0), (0, T - a.shape[1])))
    return [jnp.concatenate([pad(rows[i]) for rows in row_sets]) for i in range(len(ROW_FIELDS))]


def real_tokens(*row_sets: list) -> jax.Array:
    return sum(jnp.sum((rows[3] > 0).astype(jnp.float32)) for rows in row_sets)


def _masked_sums(values: dict, mask) -> dict:
    # where, not multiply: a NaN on a padding row (e.g. an empty reference entry) stays out.
    return {k: jnp.sum(jnp.where(mask > 0, v.astype(jnp.float32), 0.0)) for k, v in values.items()}


class DPOObjective(NoExtraParams):
    """The pairwise losses of `preference.LOSSES`; chosen and rejected rows run in one forward."""

    # preference_loss metric -> TRL's name.
    METRICS = {"rewards_chosen": "rewards/chosen", "rewards_rejected": "rewards/rejected",
               "accuracy": "rewards/accuracies", "margin": "rewards/margins",
               "logps_chosen": "logps/chosen", "logps_rejected": "logps/rejected",
               "nll": "nll_loss", "log_odds": "log_odds_chosen"}
    REF_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")

    def __init__(self, cfg):
        p = cfg.preference
        if p.loss_type not in LOSSES:
            raise ValueError(f"preference.loss_type: {p.loss_type!r} is not a pairwise loss "
                             f"({', '.join(LOSSES)}); kto has its own objective")
        names, self.needs_reference, _ = LOSSES[p.loss_type]
        self.loss_type, self.hparams = p.loss_type, {k: getattr(p, k) for k in names}
        try:
            check_hparams(p.loss_type, self.hparams, True, True)  # value ranges, before any tracing
        except ValueError as e:
            raise ValueError(f"preference: {e}") from None
        self.model_cfg, self.chunk_size = cfg.model, cfg.trainer.loss_chunk_size

    def _pair_logps(self, params, batch):
        chosen, rejected = batch_rows(batch, "chosen_"), batch_rows(batch, "rejected_")
        B = chosen[0].shape[0]
        logps, counts = sequence_logps(self.model_cfg, params, *concat_rows(chosen, rejected), self.chunk_size)
        return (logps[:B], logps[B:]), (counts[:B], counts[B:]), real_tokens(chosen, rejected)

    def reference_fields(self, params, batch) -> dict:
        """{ref_chosen_logps, ref_rejected_logps} [B] with `params` as the reference; {} for a
        reference-free loss (its batches carry no reference fields)."""
        if not self.needs_reference:
            return {}
        (rc, rr), _, _ = self._pair_logps(params, batch)
        return {"ref_chosen_logps": rc, "ref_rejected_logps": rr}

    def _reference(self, batch, ref_params):
        if all(k in batch for k in self.REF_FIELDS):
            return tuple(batch[k] for k in self.REF_FIELDS)
        if ref_params is None:
            raise ValueError(f"preference.loss_type {self.loss_type!r} needs reference log-probs: the batch has "
                             f"no {' / '.join(self.REF_FIELDS)} (reference: cached) and no ref_params were "
                             "given (reference: live)")
        f = self.reference_fields(jax.lax.stop_gradient(ref_params), batch)
        return f["ref_chosen_logps"], f["ref_rejected_logps"]

    def loss(self, params, batch, *, ref_params=None, rng=None):
        rc, rr = self._reference(batch, ref_params) if self.needs_reference else (None, None)
        (pc, pr), (lc, lr), tokens = self._pair_logps(params, batch)
        losses, metrics = preference_loss(self.loss_type, pc, pr, rc, rr, lc, lr, **self.hparams)
        m = batch["pair_mask"]
        sums = _masked_sums({"loss": losses, **metrics}, m)
        return sums.pop("loss"), {"weight": jnp.sum(m.astype(jnp.float32)), "tokens": tokens, **sums}

    def finalize(self, sums: dict) -> dict:
        out = {"loss": safe_div(sums["loss_sum"], sums["weight"])}
        for k, name in self.METRICS.items():
            if k in sums:
                out[name] = safe_div(sums[k], sums["weight"])
        return out


class KTOObjective(NoExtraParams):
    """KTO on unpaired examples (`label` 1 desirable, 0 undesirable) with TRL's KL rows."""

    needs_reference = True
    REF_FIELDS = ("ref_logps", "ref_kl_logps")

    def __init__(self, cfg):
        p = cfg.preference
        if not p.beta > 0:
            raise ValueError(f"preference.beta must be > 0, got {p.beta}")
        if p.desirable_weight < 0 or p.undesirable_weight < 0:
            raise ValueError("preference.desirable_weight and preference.undesirable_weight must be >= 0")
        self.beta, self.dw, self.uw = p.beta, p.desirable_weight, p.undesirable_weight
        self.model_cfg, self.chunk_size = cfg.model, cfg.trainer.loss_chunk_size

    def _logps(self, params, *row_sets):
        logps, _ = sequence_logps(self.model_cfg, params, *concat_rows(*row_sets), self.chunk_size)
        return logps

    def reference_fields(self, params, batch) -> dict:
        """{ref_logps, ref_kl_logps} [B] with `params` as the reference (one forward)."""
        rows, kl_rows = batch_rows(batch, ""), batch_rows(batch, "kl_")
        logps = self._logps(params, rows, kl_rows)
        B = rows[0].shape[0]
        return {"ref_logps": logps[:B], "ref_kl_logps": logps[B:]}

    def loss(self, params, batch, *, ref_params=None, rng=None):
        rows, kl_rows = batch_rows(batch, ""), batch_rows(batch, "kl_")
        if all(k in batch for k in self.REF_FIELDS):
            ref, ref_kl = batch["ref_logps"], batch["ref_kl_logps"]
        elif ref_params is not None:
            f = self.reference_fields(jax.lax.stop_gradient(ref_params), batch)
            ref, ref_kl = f["ref_logps"], f["ref_kl_logps"]
        else:
            raise ValueError("preference.loss_type 'kto' needs reference log-probs: the batch has no "
                             "ref_logps / ref_kl_logps (reference: cached) and no ref_params were given "
                             "(reference: live)")
        logps = self._logps(params, rows)
        # The KL rows only set a detached baseline: no backward pass through them.
        kl_logps = self._logps(jax.lax.stop_gradient(params), kl_rows)
        m = batch["pair_mask"].astype(jnp.float32)
        valid = m > 0
        n = jnp.sum(m)
        # kto_kl_estimate averages over all B rows; padding rows (eval) must not count, so it gets
        # them as zeros and the mean is rescaled to real rows (clamp and detach commute with that).
        B = m.shape[0]
        kl = kto_kl_estimate(jnp.where(valid, kl_logps, 0.0), jnp.where(valid, ref_kl, 0.0)) * (B / jnp.maximum(n, 1.0))
        losses, metrics = kto_loss(logps, ref, batch["label"], kl, beta=self.beta,
                                   desirable_weight=self.dw, undesirable_weight=self.uw)
        d = metrics["desirable"]
        sums = _masked_sums({"loss": losses, "n_chosen": d, "n_rejected": 1.0 - d,
                             "rewards_chosen": metrics["rewards"] * d, "rewards_rejected": metrics["rewards"] * (1 - d),
                             "logps_chosen": metrics["logps"] * d, "logps_rejected": metrics["logps"] * (1 - d)}, m)
        aux = {"weight": n, "tokens": real_tokens(rows, kl_rows), "kl": kl * n, **sums}
        return aux.pop("loss"), aux

    def finalize(self, sums: dict) -> dict:
        rc = safe_div(sums["rewards_chosen"], sums["n_chosen"])
        rr = safe_div(sums["rewards_rejected"], sums["n_rejected"])
        return {"loss": safe_div(sums["loss_sum"], sums["weight"]),
                "rewards/chosen": rc, "rewards/rejected": rr, "rewards/margins": rc - rr,
                "logps/chosen": safe_div(sums["logps_chosen"], sums["n_chosen"]),
                "logps/rejected": safe_div(sums["logps_rejected"], sums["n_rejected"]),
                "kl": safe_div(sums["kl"], sums["weight"])}
