"""What a run trains and what it keeps frozen, for every task.

The *model params* are the decoder's params plus any the objective adds (a reward head). Without
LoRA they are also the trainable params. With LoRA (`lora.rank > 0`) the trainable params are
`{"adapters": ..., **extras}` and the decoder's params are a frozen `base`; the model params are
the base with the adapters folded in (`effective_params`). A live DPO reference is another
frozen copy (without LoRA) or the base itself (with LoRA: the adapters are the policy's change).

Frozen params are never checkpointed: they are a function of the config (seed init or
`model.init_from`), rebuilt on resume and by `load_run`, so LoRA checkpoints hold adapters only.
"""

from __future__ import annotations

import typing

import jax
import numpy as np

from jaxllm.models import init_params, param_axes, param_shapes
from jaxllm.models import lora as lora_lib


class RunKeys(typing.NamedTuple):
    model: jax.Array  # decoder and objective-extra init
    adapters: jax.Array  # LoRA init
    state: jax.Array  # the train state's RNG (dropout, sampling)


def run_keys(cfg) -> RunKeys:
    """The run's keys from `trainer.seed`: everything that rebuilds frozen params uses these."""
    root = jax.random.PRNGKey(cfg.trainer.seed)
    return RunKeys(*(jax.random.fold_in(root, i) for i in range(3)))


def _objective(cfg):
    from jaxllm.objectives import make_objective

    return make_objective(cfg)


def init_model_params(cfg, rng) -> dict:
    k_model, k_extra = jax.random.split(rng)
    return init_params(cfg.model, k_model) | _objective(cfg).extra_params(cfg.model, k_extra)


def model_param_axes(cfg) -> dict:
    return param_axes(cfg.model) | _objective(cfg).extra_param_axes(cfg.model)


def uses_lora(cfg) -> bool:
    return cfg.lora.enabled


def split_model_params(cfg, model_params: dict) -> tuple[dict, dict]:
    """(decoder params, objective extras) of a model params tree."""
    decoder = set(param_shapes(cfg.model))
    return ({k: v for k, v in model_params.items() if k in decoder},
            {k: v for k, v in model_params.items() if k not in decoder})


def init_trainable(cfg, model_params: dict, rng) -> dict:
    if not uses_lora(cfg):
        return model_params
    base, extras = split_model_params(cfg, model_params)
    return {"adapters": lora_lib.init_adapters(cfg.lora, base, rng)} | extras


def trainable_axes(cfg, abstract_trainable: dict) -> dict:
    axes = model_param_axes(cfg)
    if not uses_lora(cfg):
        return axes
    # Adapters are small (rank r): replicated on every device.
    replicated = jax.tree.map(lambda a: (None,) * len(a.shape), abstract_trainable["adapters"])
    _, extras = split_model_params(cfg, axes)
    return {"adapters": replicated} | extras


def needs_live_reference(cfg) -> bool:
    from jaxllm.objectives.preference import LOSSES

    if cfg.task != "dpo" or cfg.preference.reference != "live":
        return False
    return cfg.preference.loss_type == "kto" or LOSSES[cfg.preference.loss_type][1]


def frozen_params(cfg, model_params: dict) -> dict:
    """The frozen trees a step needs: {"base": ...} under LoRA, {"reference": ...} for a live
    DPO reference without LoRA, else {}."""
    base, _ = split_model_params(cfg, model_params)
    if uses_lora(cfg):
        return {"base": base}
    if needs_live_reference(cfg):
        return {"reference": model_params}
    return {}


def effective_params(cfg, trainable: dict, frozen: dict, rng=None, deterministic: bool = True) -> dict:
    """The model params the objective sees."""
    if not uses_lora(cfg):
        return trainable
    extras = {k: v for k, v in trainable.items() if k != "adapters"}
    return lora_lib.apply_adapters(cfg.lora, frozen["base"], trainable["adapters"], rng,
                                   deterministic=deterministic) | extras


def reference_params(cfg, frozen: dict, trainable: dict) -> dict | None:
    if not needs_live_reference(cfg):
        return None
    if uses_lora(cfg):  # the base model is the reference; the head (if any) is the policy's
        return frozen["base"] | {k: v for k, v in trainable.items() if k != "adapters"}
    return frozen["reference"]


def decay_mask(cfg):
    from jaxllm.optim import weight_decay_mask

    if not uses_lora(cfg):
        return weight_decay_mask

    def mask(trainable):
        extras = {k: v for k, v in trainable.items() if k != "adapters"}
        return {"adapters": lora_lib.adapter_decay_mask(trainable["adapters"])} | weight_decay_mask(extras)
    return mask


def initial_model_params(cfg) -> dict:
    """The run's model params before step 1, on the host: seed init, then `model.init_from`."""
    fresh = jax.device_get(jax.jit(init_model_params, static_argnums=0)(cfg, run_keys(cfg).model))
    return load_initial_params(cfg, fresh) if cfg.model.init_from else fresh


def load_initial_params(cfg, fresh: dict) -> dict:
    """`fresh` (host or device model params from the seed) with the decoder's params replaced by
    `model.init_from`'s when set; objective extras (a reward head) keep their fresh init unless
    the source has them too."""
    from jaxllm.checkpoint import load_init_params

    loaded = load_init_params(cfg.model, cfg.model.init_from, extra_keys=tuple(
        k for k in fresh if k not in param_shapes(cfg.model)))
    out = dict(fresh)
    for k, v in loaded.items():
        out[k] = jax.tree.map(lambda x: np.asarray(x, np.float32), v)
    return out
