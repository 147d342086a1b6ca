"""Per-example gradient features of a LoRA run's checkpoint (LESS, Xia et al. 2024).

For each example x (one SFT row) the gradient of its own loss (the task objective's loss of a
one-row batch: the mean over its assistant tokens) with respect to the trainable LoRA params,
computed for a whole batch at once with `jax.vmap`, then either

  sgd   the gradient itself (target-task examples), or
  adam  Gamma(x): the direction Adam would step for that gradient alone from the checkpoint's
        optimizer state (count t, moments mu, nu):  m = b1 mu + (1 - b1) g,
        v = b2 nu + (1 - b2) g^2,  Gamma = (m / (1 - b1^(t+1))) / (sqrt(v / (1 - b2^(t+1))) + eps)
        (optax's scale_by_adam; unclipped and without weight decay, as in LESS),

flattened and randomly projected (`projection.project`). The base params stay sharded as in
training (the run's Trainer layout); a batch is sharded along its rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from jaxllm.parallel.mesh import batch_sharding
from jaxllm.select.projection import project

KINDS = ("sgd", "adam")


def find_adam_state(opt_state) -> optax.ScaleByAdamState:
    """The one scale_by_adam state inside an optimizer state (optax.chain, masks, ...)."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
             if isinstance(s, optax.ScaleByAdamState)]
    if len(found) != 1:
        raise ValueError(f"expected one Adam state in the optimizer state, found {len(found)}")
    return found[0]


def adam_direction(grads, adam_state: optax.ScaleByAdamState, b1: float, b2: float, eps: float):
    """Gamma for one gradient tree (see the module doc)."""
    t = (adam_state.count + 1).astype(jnp.float32)

    def one(g, mu, nu):
        m = b1 * mu + (1.0 - b1) * g
        v = b2 * nu + (1.0 - b2) * g * g
        return (m / (1.0 - b1 ** t)) / (jnp.sqrt(v / (1.0 - b2 ** t)) + eps)

    return jax.tree.map(one, grads, adam_state.mu, adam_state.nu)


def example_loss(task, trainable, frozen, row):
    """The task objective's loss of `row` alone (a one-row batch), divided by its weight."""
    batch = jax.tree.map(lambda x: x[None], row)
    loss_sum, aux = task.objective.loss(task.effective_params(trainable, frozen), batch)
    return loss_sum / jnp.maximum(aux["weight"], 1.0)


def example_grads(task, trainable, frozen, batch):
    """Per-row gradient trees, [B, ...] per leaf."""
    return jax.vmap(jax.grad(functools.partial(example_loss, task)), in_axes=(None, None, 0))(
        trainable, frozen, batch)


class FeatureFunction:
    """Jitted (trainable, frozen, adam_state, batch) -> [B, dims] features of one kind."""

    def __init__(self, trainer, kind: str, dims: int, seed: int):
        if kind not in KINDS:
            raise ValueError(f"feature kind must be one of {KINDS}, got {kind!r}")
        self.trainer, self.kind, self.dims, self.seed = trainer, kind, dims, seed
        opt = trainer.cfg.optimizer
        self.b1, self.b2, self.eps = opt.b1, opt.b2, opt.eps
        self.fn = jax.jit(self._features, out_shardings=batch_sharding(trainer.mesh, 2))

    def _features(self, trainable, frozen, adam_state, batch):
        grads = example_grads(self.trainer.task, trainable, frozen, batch)
        if self.kind == "adam":
            grads = jax.vmap(adam_direction, in_axes=(0, None, None, None, None))(
                grads, adam_state, self.b1, self.b2, self.eps)
        leaves = jax.tree.leaves(grads)
        flat_BP = jnp.concatenate([g.reshape(g.shape[0], -1) for g in leaves], axis=1)
        return project(flat_BP, self.seed, self.dims)

    def __call__(self, state, frozen, batch):
        return self.fn(state.params, frozen, find_adam_state(state.opt_state), batch)
