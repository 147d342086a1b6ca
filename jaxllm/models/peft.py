"""PEFT LoRA / DoRA adapter folders <-> jaxllm adapters (`jaxllm.models.lora`).

    adapter_config.json        peft_type LORA, r, lora_alpha, target_modules, use_dora, ...
    adapter_model.safetensors  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight [r, in],
                               ...lora_B.weight [out, r], ...lora_magnitude_vector [out] (DoRA);
                               base_model.model.lm_head.lora_A.weight, ... for lm_head

jaxllm views a target as a matrix [in, out] with heads flattened as `hf.py` flattens them,
and HF Linear weights are [out, in], so per layer lora_A = a.T and lora_B = b.T; DoRA's
magnitude is the same vector on both sides. PEFT's scale lora_alpha / r is jaxllm's;
use_rslora's lora_alpha / sqrt(r) reads as alpha = lora_alpha * sqrt(r). Adapters PEFT can
describe but jaxllm cannot (per-layer ranks, biases, extra trained modules) raise PeftFormatError.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.errors import UserError
from jaxllm.models.llama import param_shapes
from jaxllm.models.lora import LoraConfig, init_adapters, merge_adapters

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_MODULES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
                "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
                "w_down": "mlp.down_proj", "lm_head": "lm_head"}
_BY_NAME = {module.rsplit(".", 1)[-1]: target for target, module in PEFT_MODULES.items()}
_PREFIX = "base_model.model."
# adapter_config.json settings jaxllm has no equivalent of: each must be unset.
_UNSUPPORTED = ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform", "layers_pattern",
                "exclude_modules", "layer_replication", "trainable_token_indices", "target_parameters",
                "lora_bias", "fan_in_fan_out", "use_qalora", "use_bdlora", "alora_invocation_tokens")


class PeftFormatError(UserError, ValueError):
    """A PEFT adapter folder jaxllm cannot read, in one line."""


def _key(target: str, layer: int | None, leaf: str) -> str:
    module = PEFT_MODULES[target]
    return _PREFIX + (module if layer is None else f"model.layers.{layer}.{module}") + "." + leaf


def _per_layer(x: np.ndarray, stacked: bool):
    """(layer index or None, that layer's array) of an adapter leaf."""
    return list(enumerate(x)) if stacked else [(None, x)]


# ----------------------------------------------------------------------------- writing


def peft_tensors(lora_cfg: LoraConfig, adapters: dict) -> dict[str, np.ndarray]:
    """PEFT's adapter_model tensors (float32) of jaxllm adapters."""
    out = {}
    for target in lora_cfg.targets:
        ad = {k: np.asarray(jax.device_get(v), np.float32) for k, v in adapters[target].items()}
        stacked = ad["a"].ndim == 3
        for i, a in _per_layer(ad["a"], stacked):
            out[_key(target, i, "lora_A.weight")] = np.ascontiguousarray(a.T)
        for i, b in _per_layer(ad["b"], stacked):
            out[_key(target, i, "lora_B.weight")] = np.ascontiguousarray(b.T)
        if lora_cfg.dora:
            for i, m in _per_layer(ad["m"], stacked):
                out[_key(target, i, "lora_magnitude_vector")] = np.ascontiguousarray(m)
    return out


def adapter_config(lora_cfg: LoraConfig, base_model: str | None) -> dict:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": lora_cfg.rank, "lora_alpha": lora_cfg.alpha, "lora_dropout": lora_cfg.dropout,
            "target_modules": [PEFT_MODULES[t].rsplit(".", 1)[-1] for t in lora_cfg.targets],
            "use_dora": lora_cfg.dora, "use_rslora": False, "bias": "none", "fan_in_fan_out": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
            "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}


def save_peft_adapter(lora_cfg: LoraConfig, adapters: dict, folder: str, *, base_model: str | None = None) -> None:
    """Writes adapter_config.json + adapter_model.safetensors, which `peft.PeftModel.from_pretrained`
    loads onto the base model (`base_model`: its path, recorded for PEFT)."""
    from safetensors.numpy import save_file

    if not lora_cfg.enabled:
        raise PeftFormatError("the run has no LoRA adapters (lora.rank is 0)")
    os.makedirs(folder, exist_ok=True)
    save_file(peft_tensors(lora_cfg, adapters), os.path.join(folder, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(adapter_config(lora_cfg, base_model), f, indent=2)
        f.write("\n")


# ----------------------------------------------------------------------------- reading


def _targets(value, where: str) -> tuple[str, ...]:
    if value == "all-linear":  # PEFT: every linear layer but the output layer
        return tuple(t for t in PEFT_MODULES if t != "lm_head")
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise PeftFormatError(f"{where}: target_modules {value!r} is not supported; give a list of module names")
    unknown = [m for m in value if m.rsplit(".", 1)[-1] not in _BY_NAME]
    if unknown:
        raise PeftFormatError(f"{where}: target_modules {unknown} have no jaxllm equivalent; "
                              f"supported: {', '.join(_BY_NAME)}")
    chosen = {_BY_NAME[m.rsplit(".", 1)[-1]] for m in value}
    return tuple(t for t in PEFT_MODULES if t in chosen)


def read_peft_config(folder: str) -> tuple[LoraConfig, str | None]:
    """(the LoraConfig of a PEFT adapter folder, its base_model_name_or_path)."""
    path = os.path.join(os.path.expanduser(folder), CONFIG_FILE)
    if not os.path.isfile(path):
        raise PeftFormatError(f"{folder}: no {CONFIG_FILE} (not a PEFT adapter folder)")
    with open(path) as f:
        c = json.load(f)
    if c.get("peft_type") != "LORA":
        raise PeftFormatError(f"{path}: peft_type {c.get('peft_type')!r} is not supported (LORA is)")
    if c.get("bias", "none") != "none":
        raise PeftFormatError(f"{path}: bias {c['bias']!r} is not supported (jaxllm adapters have no bias)")
    if set_ := [k for k in _UNSUPPORTED if c.get(k)]:
        raise PeftFormatError(f"{path}: {', '.join(set_)} {'is' if len(set_) == 1 else 'are'} not supported")
    r, alpha = int(c["r"]), float(c["lora_alpha"])
    if c.get("use_rslora"):
        alpha *= math.sqrt(r)  # scale alpha / sqrt(r) == (alpha * sqrt(r)) / r
    lora_cfg = LoraConfig(rank=r, alpha=alpha, dropout=float(c.get("lora_dropout") or 0.0),
                          targets=_targets(c.get("target_modules"), path), dora=bool(c.get("use_dora")))
    return lora_cfg, c.get("base_model_name_or_path")


def adapter_shapes(lora_cfg: LoraConfig, model_cfg) -> dict:
    """ShapeDtypeStructs of the adapters `lora_cfg` puts on a model of `model_cfg`."""
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), param_shapes(model_cfg),
                            is_leaf=lambda x: isinstance(x, tuple))
    return jax.eval_shape(lambda p: init_adapters(lora_cfg, p, jax.random.PRNGKey(0)), abstract)


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:4]) + (f" ... ({len(keys)} in all)" if len(keys) > 4 else "")


def load_peft_adapter(folder: str, model_cfg) -> tuple[LoraConfig, dict]:
    """(LoraConfig, adapters as float32 numpy) of a PEFT adapter folder, for a model of `model_cfg`."""
    from jaxllm.models.hf import read_safetensors

    lora_cfg, _ = read_peft_config(folder)
    file = os.path.join(os.path.expanduser(folder), WEIGHTS_FILE)
    if not os.path.isfile(file):
        raise PeftFormatError(f"{folder}: no {WEIGHTS_FILE} (only safetensors adapters are supported)")
    # PEFT also saves lm_head's frozen base weight when lm_head is a target; it is the base's own.
    tensors = {k: v for k, v in read_safetensors(file).items() if not k.endswith(".base_layer.weight")}
    leaves = {"a": ("lora_A.weight", True), "b": ("lora_B.weight", True), "m": ("lora_magnitude_vector", False)}
    adapters, missing, used = {}, [], set()
    for target, shapes in adapter_shapes(lora_cfg, model_cfg).items():
        layers = [None] if target == "lm_head" else list(range(model_cfg.n_layers))
        adapters[target] = {}
        for leaf, want in shapes.items():
            name, transpose = leaves[leaf]
            keys = [_key(target, i, name) for i in layers]
            missing += [k for k in keys if k not in tensors]
            if any(k not in tensors for k in keys):
                continue
            used.update(keys)
            parts = [np.asarray(tensors[k], np.float32) for k in keys]
            parts = [p.T for p in parts] if transpose else parts
            value = parts[0] if target == "lm_head" else np.stack(parts)
            if value.shape != want.shape:
                raise PeftFormatError(f"{file}: {target} {name} gives {value.shape}, the model needs {want.shape} "
                                      f"(rank {lora_cfg.rank})")
            adapters[target][leaf] = value
    if missing:
        raise PeftFormatError(f"{file}: missing tensors: {_names(missing)}")
    if extra := sorted(set(tensors) - used):
        raise PeftFormatError(f"{file}: unexpected tensors: {_names(extra)}")
    return lora_cfg, adapters


def base_model_path(folder: str, base: str | None = None) -> str:
    """The local Hugging Face folder of an adapter's base model: `base`, else the adapter's
    base_model_name_or_path (nothing is downloaded)."""
    base = base or read_peft_config(folder)[1]
    if not base or not os.path.isfile(os.path.join(os.path.expanduser(base), "config.json")):
        raise PeftFormatError(f"{folder}: base model {base!r} is not a local Hugging Face folder (config.json); "
                              "give the base model's folder")
    return os.path.expanduser(base)


def load_peft_model(folder: str, base: str | None = None):
    """(ModelConfig, float32 host params) of a PEFT adapter folded into its base model; what
    `model.init_from` can start from."""
    from jaxllm.models.hf import load_hf_checkpoint

    model_cfg, params = load_hf_checkpoint(base_model_path(folder, base))
    lora_cfg, adapters = load_peft_adapter(folder, model_cfg)
    merged = jax.device_get(jax.jit(merge_adapters, static_argnums=0)(lora_cfg, params, adapters))
    return model_cfg, jax.tree.map(lambda x: np.asarray(x, np.float32), merged)
