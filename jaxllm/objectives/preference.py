"""Pairwise preference losses (DPO and its variants) and KTO, on per-sequence log-probabilities.

Inputs are per-sequence SUMS of completion-token log-probabilities, shape [batch], plus the
completion token counts where a loss length-normalises. Every function returns per-example losses
[batch] and a metrics dict; the caller reduces (sum over pairs, `weight` = number of pairs), so
gradient accumulation stays exact. Metrics are detached.

Formulas follow TRL (`DPOTrainer`, `CPOTrainer`, `ORPOTrainer`, `KTOTrainer`), open-instruct
(`dpo_norm`) and the papers; `h` below is the DPO log-ratio margin
`(pc - rc) - (pr - rr)` (p = policy, r = reference, c = chosen, r = rejected):

  sigmoid   -(1-ls) logsigmoid(beta h) - ls logsigmoid(-beta h)          (DPO; cDPO when ls > 0)
  dpo_norm  sigmoid on logps divided by their lengths                      (open-instruct)
  ipo       (h - 1/(2 beta))^2 on length-averaged logps                    (TRL: `ipo` averages
            policy and reference logps over the completion tokens before the margin)
  hinge     relu(1 - beta h)
  rdpo      -logsigmoid(beta h + alpha (len_c - len_r))                    (R-DPO, Park et al. 2024,
            Eq. 9: the length term explains away length-driven preferences, so long chosen
            answers are pushed less and short ones more)
  simpo     -logsigmoid(beta (pc/len_c - pr/len_r) - gamma)                (reference-free)
  cpo       -logsigmoid(beta (pc - pr)) + nll_weight * nll                 (reference-free)
  orpo      nll + beta * -logsigmoid(log_odds(pc/len_c) - log_odds(pr/len_r))
  rrhf      relu(pr/len_r - pc/len_c) + nll_weight * nll
  slic      relu(delta - (pc - pr)) + nll_weight * nll                     (SLiC-HF)

with nll = -pc/len_c, the chosen completion's mean token NLL (TRL's cross-entropy term).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# TRL's defaults where TRL has the knob: beta 0.1 (DPOConfig/CPOConfig/ORPOConfig), gamma 0.5
# (CPOConfig.simpo_gamma), nll_weight 1.0 (CPOConfig.cpo_alpha; RRHF and ORPO weigh the SFT term
# 1), label_smoothing 0. alpha (R-DPO) and delta (SLiC-HF's margin) have no TRL default: alpha
# 0.01 nats per token of length difference, delta 1.0 as in the SLiC-HF paper.
DEFAULTS = {"beta": 0.1, "gamma": 0.5, "alpha": 0.01, "delta": 1.0, "nll_weight": 1.0, "label_smoothing": 0.0}

# loss_type -> (hyperparameters it takes, needs reference logps, needs lengths)
LOSSES: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    "sigmoid": (("beta", "label_smoothing"), True, False),
    "dpo_norm": (("beta", "label_smoothing"), True, True),
    "ipo": (("beta",), True, True),
    "hinge": (("beta",), True, False),
    "rdpo": (("beta", "alpha"), True, True),
    "simpo": (("beta", "gamma", "label_smoothing"), False, True),
    "cpo": (("beta", "nll_weight", "label_smoothing"), False, True),
    "orpo": (("beta",), False, True),
    "rrhf": (("nll_weight",), False, True),
    "slic": (("delta", "nll_weight"), False, True),
}


def _f32(x):
    x = jnp.asarray(x)
    # Sums of thousands of token logps lose too much in bf16; keep fp64 if the caller has it.
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _smoothed_sigmoid_loss(z, ls):
    # Conservative DPO: the label is flipped with probability ls; ls = 0.5 gives log 2 for any z.
    return -(1.0 - ls) * jax.nn.log_sigmoid(z) - ls * jax.nn.log_sigmoid(-z)


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012)."""
    # An average logp of exactly 0 would give -inf and NaN gradients; the clamp costs nothing real.
    x = jnp.minimum(x, -jnp.finfo(x.dtype).eps)
    return jnp.where(x > -jnp.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def check_hparams(loss_type, hparams, has_ref, has_len):
    """The loss's hyperparameters with defaults filled in; ValueError for unknown or
    out-of-range ones, or missing reference log-probs / lengths the loss needs."""
    if loss_type not in LOSSES:
        raise ValueError(f"unknown preference loss_type {loss_type!r}; valid: {sorted(LOSSES)}")
    names, needs_ref, needs_len = LOSSES[loss_type]
    bad = sorted(set(hparams) - set(names))
    if bad:
        # Strict per loss: a gamma passed to DPO is a config mistake, not something to ignore.
        raise ValueError(f"loss_type {loss_type!r} takes hyperparameters {list(names)}; got unknown {bad}")
    if needs_ref and not has_ref:
        raise ValueError(f"loss_type {loss_type!r} needs ref_chosen_logps and ref_rejected_logps")
    if needs_len and not has_len:
        raise ValueError(f"loss_type {loss_type!r} needs chosen_lengths and rejected_lengths")
    hp = {k: DEFAULTS[k] for k in names} | hparams
    # Checked only when given as Python numbers (a traced value can't be compared here).
    if isinstance(hp.get("beta"), (int, float)) and not hp["beta"] > 0:
        raise ValueError(f"beta must be > 0, got {hp['beta']}")
    if isinstance(hp.get("label_smoothing"), (int, float)) and not 0.0 <= hp["label_smoothing"] <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {hp['label_smoothing']}")
    return hp


def preference_loss(loss_type: str, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
                    ref_rejected_logps=None, chosen_lengths=None, rejected_lengths=None, **hparams):
    """(per-example losses [batch], metrics) for one of `LOSSES`; see the module docstring."""
    has_ref = ref_chosen_logps is not None and ref_rejected_logps is not None
    has_len = chosen_lengths is not None and rejected_lengths is not None
    hp = check_hparams(loss_type, hparams, has_ref, has_len)
    pc, pr = _f32(policy_chosen_logps), _f32(policy_rejected_logps)
    rc, rr = (_f32(ref_chosen_logps), _f32(ref_rejected_logps)) if has_ref else (None, None)
    if has_len:
        # An empty completion (length 0, logp 0) averages to 0 instead of NaN.
        lc = jnp.maximum(_f32(chosen_lengths), 1.0)
        lr = jnp.maximum(_f32(rejected_lengths), 1.0)
        pc_avg, pr_avg = pc / lc, pr / lr
    beta = hp.get("beta")
    extra = {}

    if loss_type in ("sigmoid", "hinge", "rdpo", "dpo_norm", "ipo"):
        if loss_type in ("dpo_norm", "ipo"):
            pc_, pr_, rc_, rr_ = pc_avg, pr_avg, rc / lc, rr / lr
        else:
            pc_, pr_, rc_, rr_ = pc, pr, rc, rr
        h = (pc_ - rc_) - (pr_ - rr_)
        if loss_type == "ipo":
            losses = (h - 1.0 / (2.0 * beta)) ** 2
        elif loss_type == "hinge":
            losses = jax.nn.relu(1.0 - beta * h)
        elif loss_type == "rdpo":
            losses = -jax.nn.log_sigmoid(beta * h + hp["alpha"] * (lc - lr))
        else:
            losses = _smoothed_sigmoid_loss(beta * h, hp["label_smoothing"])
        reward_c, reward_r = beta * (pc_ - rc_), beta * (pr_ - rr_)
    elif loss_type == "simpo":
        z = beta * (pc_avg - pr_avg) - hp["gamma"]
        losses = _smoothed_sigmoid_loss(z, hp["label_smoothing"])
        reward_c, reward_r = beta * pc_avg, beta * pr_avg
    else:
        nll = -pc_avg
        extra["nll"] = nll
        if loss_type == "cpo":
            losses = _smoothed_sigmoid_loss(beta * (pc - pr), hp["label_smoothing"]) + hp["nll_weight"] * nll
            reward_c, reward_r = beta * pc, beta * pr
        elif loss_type == "orpo":
            # log odds(p) = log p - log(1 - p), on the mean token probability (TRL's ORPO).
            log_odds = (pc_avg - pr_avg) - (log1mexp(pc_avg) - log1mexp(pr_avg))
            losses = nll - beta * jax.nn.log_sigmoid(log_odds)
            reward_c, reward_r = beta * pc_avg, beta * pr_avg
            extra["log_odds"] = log_odds
        elif loss_type == "rrhf":
            losses = jax.nn.relu(pr_avg - pc_avg) + hp["nll_weight"] * nll
            reward_c, reward_r = pc_avg, pr_avg
        else:  # slic
            losses = jax.nn.relu(hp["delta"] - (pc - pr)) + hp["nll_weight"] * nll
            reward_c, reward_r = pc, pr

    metrics = {"rewards_chosen": reward_c, "rewards_rejected": reward_r,
               "accuracy": (reward_c > reward_r).astype(losses.dtype), "margin": reward_c - reward_r,
               "logps_chosen": pc, "logps_rejected": pr, **extra}
    return losses, jax.tree.map(jax.lax.stop_gradient, metrics)


# ----------------------------------------------------------------------------- KTO


def kto_kl_estimate(policy_kl_logps, ref_kl_logps):
    """KTO's reference point: mean policy/reference log-ratio on mismatched (prompt, completion)
    pairs, clamped at 0 and detached (TRL's `KTOTrainer`). Under jit on a sharded batch the mean
    is global, as TRL's all-gather makes it."""
    kl = jnp.mean(_f32(policy_kl_logps) - _f32(ref_kl_logps))
    return jax.lax.stop_gradient(jnp.maximum(kl, 0.0))


def kto_loss(policy_logps, ref_logps, labels, kl_estimate, *, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """KTO (Ethayarajh et al. 2024) on unpaired examples; `labels` True for desirable ones.

    desirable:   w_d * (1 - sigmoid(beta * (logratio - KL)))
    undesirable: w_u * (1 - sigmoid(beta * (KL - logratio)))
    """
    if isinstance(beta, (int, float)) and not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    logratio = _f32(policy_logps) - _f32(ref_logps)
    # The KL term is a baseline, not something to optimise: clamp and detach even if the caller didn't.
    kl = jax.lax.stop_gradient(jnp.maximum(_f32(kl_estimate), 0.0))
    desirable = jnp.asarray(labels).astype(bool)
    losses = jnp.where(desirable,
                       desirable_weight * (1.0 - jax.nn.sigmoid(beta * (logratio - kl))),
                       undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (kl - logratio))))
    metrics = {"rewards": beta * logratio, "desirable": desirable.astype(losses.dtype), "kl": kl,
               "logps": _f32(policy_logps)}
    return losses, jax.tree.map(jax.lax.stop_gradient, metrics)
