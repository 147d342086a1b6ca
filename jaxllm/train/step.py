"""The train step: a pure function `(state, batch) -> (state, metrics)`, jitted once per task,
model and mesh with explicit shardings and donation.

One optimizer update takes a batch, splits it into `trainer.grad_accum_steps` microbatches,
sums their summed losses, statistics and gradients, and divides once by the batch's summed
weight (tokens, pairs, ...), so accumulation equals the unsplit batch exactly.

`multi_update` serves on-policy RL (PPO epochs over mini-batches): one batch, shuffled each
epoch by the state's RNG and cut into `mini_batches` mini-batches, each one optimizer update
(with the same microbatch accumulation), for `update_epochs` epochs. The learning-rate schedule
counts optimizer updates. With one epoch and one mini-batch it is the plain step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxllm.optim import make_schedule
from jaxllm.parallel.mesh import activation_sharding, batch_sharding
from jaxllm.tasks import make_task
from jaxllm.train.state import StateLayout, TrainState


def _rows(batch) -> int:
    return jax.tree.leaves(batch)[0].shape[0]


def split_rows(batch, parts: int):
    """[parts, rows/parts, ...] per field; part j takes rows j, j+parts, j+2*parts... so every
    device keeps an equal share of each part."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // parts, parts, *x.shape[1:]).swapaxes(0, 1), batch)


class Trainer:
    """Everything compiled for one task (its config) and mesh: state init, steps, evaluation."""

    def __init__(self, cfg, mesh, task=None):
        self.cfg, self.mesh = cfg, mesh
        self.task = task or make_task(cfg)
        self.objective = self.task.objective
        self.update_epochs, self.mini_batches = self.task.update_epochs, self.task.mini_batches
        self.passes = self.task.update_passes
        self.updates_per_step = self.update_epochs * self.mini_batches * len(self.passes)
        total_updates = cfg.trainer.total_steps * self.updates_per_step
        self.schedule = make_schedule(cfg.optimizer, cfg.schedule, total_updates)
        self.tx = self.task.make_optimizer(self.schedule, total_updates)
        self.layout = StateLayout(self.task, self.tx, mesh)
        self.keys, self.abstract_state = self.layout.keys, self.layout.abstract_state
        self.model_shardings, self.state_shardings = self.layout.model_shardings, self.layout.state_shardings
        self.init_model, self.make_frozen = self.layout.init_model, self.layout.make_frozen
        step = self._train_step if self.updates_per_step == 1 else self._multi_update
        self.train_step = jax.jit(step, donate_argnums=0, out_shardings=(self.state_shardings, None))
        self.eval_step = jax.jit(self._eval_step)
        self.effective = jax.jit(self.task.effective_params, out_shardings=self.model_shardings)

    def fresh_state(self, model_params=None) -> TrainState:
        return self.layout.fresh_state(model_params)

    # ------------------------------------------------------------------ the pure functions

    def _loss(self, trainable, frozen, batch, rng, deterministic: bool):
        params = self.task.effective_params(trainable, frozen, rng, deterministic=deterministic)
        ref = self.task.reference_params(frozen, trainable)
        if ref is not None:
            ref = jax.lax.stop_gradient(ref)
        return self.objective.loss(params, batch, ref_params=ref, rng=rng)

    def _grads(self, params, frozen, batch, rng):
        """(summed loss, summed aux, summed grads) over the batch's microbatches."""
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)

        def micro_grads(mb, r):
            (loss_sum, aux), grads = grad_fn(params, frozen, mb, r, False)
            return loss_sum, aux, grads

        return self._sum_microbatches(micro_grads, batch, rng)

    def _sum_microbatches(self, fn, batch, rng):
        """fn(microbatch, rng) summed over trainer.grad_accum_steps microbatches of `batch` (a
        scan: one microbatch's activations live at a time); fn(batch, rng) when there is one."""
        accum = self.cfg.trainer.grad_accum_steps
        if accum == 1:
            return fn(batch, rng)
        micro = split_rows(batch, accum)

        def body(carry, xs):
            j, mb = xs
            return jax.tree.map(jnp.add, carry, fn(mb, None if rng is None else jax.random.fold_in(rng, j))), None

        shapes = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], micro), rng)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return jax.lax.scan(body, zeros, (jnp.arange(accum), micro))[0]

    def _update(self, params, opt_state, frozen, batch, rng, update_index):
        """One optimizer update on `batch`: (params, opt_state, metrics)."""
        with activation_sharding(self.mesh):
            loss_sum, aux, grads = self._grads(params, frozen, batch, rng)
        weight = jnp.maximum(aux["weight"], 1.0)
        # Sums divided once by the whole batch's weight: accumulation equals the big batch.
        grads = jax.tree.map(lambda g: g / weight, grads)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = self.objective.finalize(aux | {"loss_sum": loss_sum})
        metrics |= {"grad_norm": optax.tree_utils.tree_norm(grads), "lr": self.schedule(update_index),
                    "tokens": aux["tokens"]}
        return params, opt_state, metrics

    def _train_step(self, state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        params, opt_state, metrics = self._update(state.params, state.opt_state, state.frozen, batch, rng, state.step)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def _multi_update(self, state: TrainState, batch):
        """`update_epochs` passes over `batch` in `mini_batches` shuffled mini-batches, one
        optimizer update each (one per entry of the task's `update_passes`, each with its own loss
        mask); metrics are averaged over the updates (tokens summed per epoch)."""
        shuffle_rng, update_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
        rows, parts = _rows(batch), self.mini_batches
        if rows % parts:
            raise ValueError(f"{rows} rows do not split into {parts} mini-batches")

        def epoch(carry, e):
            params, opt_state = carry
            order = jax.random.permutation(jax.random.fold_in(shuffle_rng, e), rows)
            minis = split_rows(jax.tree.map(lambda x: x[order], batch), parts)

            def mini(carry, xs):
                k, mb = xs
                metrics = []
                for j, field in enumerate(self.passes):
                    index = ((state.step * self.update_epochs + e) * parts + k) * len(self.passes) + j
                    mb_j = mb | {"loss_mask": mb[field]} if field else mb
                    *carry, m = self._update(*carry, state.frozen, mb_j, jax.random.fold_in(update_rng, index), index)
                    metrics.append(m)
                return tuple(carry), jax.tree.map(lambda *x: jnp.mean(jnp.stack(x)), *metrics) | {
                    "tokens": sum(m["tokens"] for m in metrics)}

            return jax.lax.scan(mini, (params, opt_state), (jnp.arange(parts), minis))

        (params, opt_state), metrics = jax.lax.scan(epoch, (state.params, state.opt_state),
                                                    jnp.arange(self.update_epochs))
        metrics = jax.tree.map(jnp.mean, metrics) | {"tokens": jnp.sum(metrics["tokens"]) / self.update_epochs}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def _eval_step(self, params, frozen, batch):
        """Summed eval statistics of one eval batch (trainer.batch_size rows), in the training
        step's microbatches so that evaluation needs no more memory than training."""
        def micro_stats(mb, _):
            loss_sum, aux = self._loss(params, frozen, mb, None, True)
            return aux | {"loss_sum": loss_sum}

        with activation_sharding(self.mesh):
            return self._sum_microbatches(micro_stats, batch, None)

    # ------------------------------------------------------------------ host side

    def to_global(self, local_batch: dict):
        """Per-process numpy rows -> one global array per key, sharded along batch."""
        return {k: jax.make_array_from_process_local_data(batch_sharding(self.mesh, np.ndim(v)), np.asarray(v))
                for k, v in local_batch.items()}

    def evaluate(self, state: TrainState, batches) -> dict:
        """The task's eval metrics of one eval set (`Task.evaluate`), keyed eval_<name>."""
        return self.task.evaluate(self, state, batches)

    def loss_metrics(self, state: TrainState, batches) -> dict:
        """The objective's eval metrics over fixed per-process batches, keyed eval_<name>."""
        sums = None
        for b in batches:
            out = jax.device_get(self.eval_step(state.params, state.frozen, self.to_global(b)))
            sums = out if sums is None else jax.tree.map(np.add, sums, out)
        metrics = {k: float(v) for k, v in self.objective.finalize(sums).items()}
        return {f"eval_{k}": v for k, v in self.task.eval_metrics(metrics).items()}
