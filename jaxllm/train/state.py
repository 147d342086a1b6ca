"""The train state and how it is born: already sharded, from abstract shapes.

`StateLayout` works out, for one task and mesh, the shardings of the model params (logical axes
through `jaxllm.parallel.mesh`), of the trainable params, optimizer moments (mirroring their
params) and frozen trees, and jits the initialisers with those `out_shardings`, so no full copy
of the model ever sits on one device or host.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxllm.parallel.mesh import tree_shardings
from jaxllm.tasks.params import run_keys


@struct.dataclass
class TrainState:
    step: jax.Array  # steps done (each step: one batch, one or more optimizer updates)
    params: Any  # the trainable params (under LoRA: adapters and objective extras)
    opt_state: Any
    rng: jax.Array  # raw uint32[2] key; each step folds in its step number
    # Frozen params (LoRA base, live DPO reference): rebuilt from the config, never checkpointed.
    frozen: Any = struct.field(default_factory=dict)


def _shapes(tree):
    return jax.tree.map(lambda a: a.shape, tree)


class StateLayout:
    """Abstract state, shardings and sharded initialisers of one task on one mesh."""

    def __init__(self, task, tx: optax.GradientTransformation, mesh):
        self.task, self.tx, self.mesh = task, tx, mesh
        self.keys = run_keys(task.cfg.trainer.seed)
        self.replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        abstract_model = jax.eval_shape(task.init_model_params, self.keys.model)
        self.model_shardings = tree_shardings(mesh, task.model_param_axes(), _shapes(abstract_model))
        abstract_state = jax.eval_shape(self._init, abstract_model, self.keys.adapters, self.keys.state)
        self.state_shardings = self._state_shardings(abstract_state)
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, self.state_shardings)
        self.init_model = jax.jit(task.init_model_params, out_shardings=self.model_shardings)
        self.init_state = jax.jit(self._init, out_shardings=self.state_shardings)
        self.make_frozen = jax.jit(task.frozen_params, out_shardings=self.state_shardings.frozen)

    def _init(self, model_params, adapter_key, state_key) -> TrainState:
        trainable = self.task.init_trainable(model_params, adapter_key)
        return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=self.tx.init(trainable),
                          rng=state_key, frozen=self.task.frozen_params(model_params))

    def _state_shardings(self, abstract_state) -> TrainState:
        params = tree_shardings(self.mesh, self.task.trainable_axes(abstract_state.params), _shapes(abstract_state.params))
        opt = self._mirror(abstract_state.opt_state, abstract_state.params, params)
        # A frozen tree (LoRA base, reference) holds some of the model params' top-level entries.
        frozen = {name: {k: self.model_shardings[k] for k in tree} for name, tree in abstract_state.frozen.items()}
        return TrainState(step=self.replicated, params=params, opt_state=opt, rng=self.replicated, frozen=frozen)

    def _mirror(self, abstract_opt, abstract_params, param_shardings):
        """Optimizer-state shardings: a leaf whose key path ends with a param's path and has its
        shape (Adam's moments, also inside optax.multi_transform's partitions) takes that param's
        sharding; counters and the rest are replicated."""
        by_path = {}
        for (path, a), s in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                                jax.tree.leaves(param_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))):
            by_path[tuple(map(str, path))] = (a.shape, s)

        def sharding(path, leaf):
            keys = tuple(map(str, path))
            for start in range(len(keys)):
                shape, s = by_path.get(keys[start:], (None, None))
                if s is not None and shape == leaf.shape:
                    return s
            return self.replicated

        return jax.tree_util.tree_map_with_path(sharding, abstract_opt)

    def fresh_state(self, model_params=None) -> TrainState:
        """Step-0 state from the seed, or from given model params (e.g. `model.init_from`)."""
        if model_params is None:
            model_params = self.init_model(self.keys.model)
        return self.init_state(model_params, self.keys.adapters, self.keys.state)

    def place(self, host_params: dict) -> dict:
        """Host model params (numpy) as arrays with the model shardings, each device taking its part."""
        return jax.tree.map(lambda a, s: jax.make_array_from_callback(
            a.shape, s, lambda idx, a=a: np.asarray(a[idx], np.float32)), host_params, self.model_shardings)
