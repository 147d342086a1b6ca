"""Optimizers and learning-rate schedules, built from optax pieces."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxllm.errors import ConfigError

# Norm gains and biases are not decayed (as in GPT-2, Llama and TRL's default).
NO_DECAY = frozenset({"attn_norm", "mlp_norm", "final_norm", "bq", "bk", "bv"})


def _decay_fn(shape: str, peak_lr: float, min_lr: float, steps: int):
    if steps <= 0:
        return optax.constant_schedule(min_lr)
    if shape == "linear":
        return optax.linear_schedule(peak_lr, min_lr, steps)
    if shape == "cosine":
        return optax.cosine_decay_schedule(peak_lr, steps, alpha=min_lr / peak_lr if peak_lr else 0.0)
    if shape == "1-sqrt":  # Hägele et al. 2024: 1 - sqrt(t) cools faster at the very end
        return lambda t: min_lr + (peak_lr - min_lr) * (1.0 - jnp.sqrt(jnp.clip(t / steps, 0.0, 1.0)))
    raise ValueError(f"decay_shape {shape!r} is not one of linear, cosine, 1-sqrt")


def wsd_schedule(peak_lr: float, total_steps: int, warmup_steps: int, decay_fraction: float = 0.1,
                 decay_shape: str = "linear", min_lr: float = 0.0) -> optax.Schedule:
    """Warmup-stable-decay: linear warmup from 0, constant at `peak_lr`, then decay to `min_lr`
    over the last `decay_fraction` of `total_steps`."""
    decay_steps = int(round(decay_fraction * total_steps))
    stable_steps = total_steps - warmup_steps - decay_steps
    if stable_steps < 0:
        raise ValueError(f"warmup ({warmup_steps}) + decay ({decay_steps}) steps exceed total_steps ({total_steps})")
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak_lr, warmup_steps),
         optax.constant_schedule(peak_lr),
         _decay_fn(decay_shape, peak_lr, min_lr, decay_steps)],
        boundaries=[warmup_steps, warmup_steps + stable_steps],
    )


def cosine_schedule(peak_lr, total_steps, warmup_steps, min_lr=0.0) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup_steps, max(total_steps, warmup_steps + 1),
                                              end_value=min_lr)


def linear_schedule(peak_lr, total_steps, warmup_steps, min_lr=0.0) -> optax.Schedule:
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak_lr, warmup_steps),
         optax.linear_schedule(peak_lr, min_lr, max(total_steps - warmup_steps, 1))],
        boundaries=[warmup_steps])


def constant_schedule(peak_lr, total_steps, warmup_steps, min_lr=0.0) -> optax.Schedule:
    del total_steps, min_lr
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak_lr, warmup_steps), optax.constant_schedule(peak_lr)],
        boundaries=[warmup_steps])


def warmup_steps(sched_cfg, total_steps: int) -> int:
    """`schedule.warmup_ratio` of the run when set (TRL / open-instruct style), else warmup_steps."""
    if sched_cfg.warmup_ratio > 0:
        return max(1, round(sched_cfg.warmup_ratio * total_steps))
    return sched_cfg.warmup_steps


def check_schedule(opt_cfg, sched_cfg, total_steps: int | None) -> None:
    """ConfigError naming the keys when the schedule would rise instead of decay (min_lr above the
    peak) or, given the run's `total_steps` optimizer steps, its warmup and decay do not fit."""
    s = sched_cfg
    if s.min_lr < 0 or s.min_lr > opt_cfg.lr:
        raise ConfigError(f"schedule.min_lr ({s.min_lr:g}) must be between 0 and optimizer.lr ({opt_cfg.lr:g}); "
                          "above it the learning rate would rise during the decay")
    if total_steps is None:
        return
    warmup = warmup_steps(s, total_steps)
    decay = int(round(s.decay_fraction * total_steps)) if s.name == "wsd" else 0
    if warmup + decay > total_steps:
        parts = [f"the warmup (schedule.warmup_ratio {s.warmup_ratio:g} of the run = {warmup} steps)"
                 if s.warmup_ratio > 0 else f"the warmup (schedule.warmup_steps {warmup})"]
        if decay:
            parts.append(f"the decay (schedule.decay_fraction {s.decay_fraction:g} of the run = {decay} steps)")
        raise ConfigError(f"{' and '.join(parts)} {'take' if decay else 'takes'} {warmup + decay} steps, more "
                          f"than trainer.total_steps ({total_steps})")


def make_schedule(opt_cfg, sched_cfg, total_steps: int) -> optax.Schedule:
    s = sched_cfg
    check_schedule(opt_cfg, s, total_steps)
    warmup = warmup_steps(s, total_steps)
    if s.name == "wsd":
        return wsd_schedule(opt_cfg.lr, total_steps, warmup, s.decay_fraction, s.decay_shape, s.min_lr)
    builders = {"cosine": cosine_schedule, "linear": linear_schedule, "constant": constant_schedule}
    return builders[s.name](opt_cfg.lr, total_steps, warmup, s.min_lr)


def weight_decay_mask(params):
    """True for leaves that get weight decay: every matrix but norms and biases."""
    def keep(path, _):
        return getattr(path[-1], "key", None) not in NO_DECAY
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(opt_cfg, schedule: optax.Schedule, decay_mask=weight_decay_mask) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with weight decay where `decay_mask` says."""
    chain = []
    if opt_cfg.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(opt_cfg.grad_clip))
    chain.append(optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                             weight_decay=opt_cfg.weight_decay, mask=decay_mask))
    return optax.chain(*chain)
