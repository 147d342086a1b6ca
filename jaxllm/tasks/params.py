"""What a run trains and what it keeps frozen: the same for every task, given its LoRA settings.

The *model params* are the decoder's params plus any the objective adds (a reward head). Without
LoRA they are also the trainable params. With LoRA (`lora.rank > 0`) the trainable params are
`{"adapters": ..., **extras}` and the decoder's params are a frozen `base`; the model params are
the base with the adapters folded in (`effective_params`). A live reference (DPO) is another
frozen copy (without LoRA) or the base itself (with LoRA: the adapters are the policy's change).

Frozen params are never checkpointed: they are a function of the config (seed init or
`model.init_from`), rebuilt on resume and by `jaxllm.run.load_run`, so LoRA checkpoints hold
adapters only.
"""

from __future__ import annotations

import typing

import jax

from jaxllm.models import lora as lora_lib
from jaxllm.models import param_shapes
from jaxllm.optim import weight_decay_mask


class RunKeys(typing.NamedTuple):
    model: jax.Array  # decoder and objective-extra init
    adapters: jax.Array  # LoRA init
    state: jax.Array  # the train state's RNG (dropout, sampling)


def run_keys(seed: int) -> RunKeys:
    """The run's keys from `trainer.seed`: everything that rebuilds frozen params uses these."""
    root = jax.random.PRNGKey(seed)
    return RunKeys(*(jax.random.fold_in(root, i) for i in range(3)))


def split_model_params(model_cfg, model_params: dict) -> tuple[dict, dict]:
    """(decoder params, objective extras) of a model params tree."""
    decoder = set(param_shapes(model_cfg))
    return ({k: v for k, v in model_params.items() if k in decoder},
            {k: v for k, v in model_params.items() if k not in decoder})


def _extras(trainable: dict) -> dict:
    return {k: v for k, v in trainable.items() if k != "adapters"}


def init_trainable(lora_cfg, model_cfg, model_params: dict, rng) -> dict:
    if not lora_cfg.enabled:
        return model_params
    base, extras = split_model_params(model_cfg, model_params)
    return {"adapters": lora_lib.init_adapters(lora_cfg, base, rng)} | extras


def trainable_axes(lora_cfg, model_cfg, model_axes: dict, abstract_trainable: dict) -> dict:
    if not lora_cfg.enabled:
        return model_axes
    # Adapters are small (rank r): replicated on every device.
    replicated = jax.tree.map(lambda a: (None,) * len(a.shape), abstract_trainable["adapters"])
    _, extras = split_model_params(model_cfg, model_axes)
    return {"adapters": replicated} | extras


def frozen_params(lora_cfg, model_cfg, model_params: dict, live_reference: bool) -> dict:
    """The frozen trees a step needs: {"base": ...} under LoRA, {"reference": ...} for a live
    reference without LoRA, else {}."""
    if lora_cfg.enabled:
        return {"base": split_model_params(model_cfg, model_params)[0]}
    if live_reference:
        return {"reference": model_params}
    return {}


def effective_params(lora_cfg, trainable: dict, frozen: dict, rng=None, deterministic: bool = True) -> dict:
    """The model params the objective sees."""
    if not lora_cfg.enabled:
        return trainable
    return lora_lib.apply_adapters(lora_cfg, frozen["base"], trainable["adapters"], rng,
                                   deterministic=deterministic) | _extras(trainable)


def reference_params(lora_cfg, frozen: dict, trainable: dict, live_reference: bool) -> dict | None:
    if not live_reference:
        return None
    if lora_cfg.enabled:  # the base model is the reference; the head (if any) is the policy's
        return frozen["base"] | _extras(trainable)
    return frozen["reference"]


def decay_mask(lora_cfg):
    if not lora_cfg.enabled:
        return weight_decay_mask

    def mask(trainable):
        return {"adapters": lora_lib.adapter_decay_mask(trainable["adapters"])} | weight_decay_mask(_extras(trainable))
    return mask
