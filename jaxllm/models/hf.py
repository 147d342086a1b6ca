"""Hugging Face checkpoint interop: Llama / SmolLM2 / Mistral / Qwen2 safetensors <-> jaxllm params.

HF Linear weights are [out, in]; jaxllm keeps [in, ...out] with heads split out. RoPE uses the same
rotate-half layout on both sides, so q/k need only a transpose and reshape, never a permutation.
Everything here runs on host numpy (no torch): loading returns numpy arrays so the caller can shard
them onto devices without first materialising the whole model on one accelerator.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxllm.errors import UserError
from jaxllm.models.llama import ModelConfig, RopeScaling, param_shapes


class HFFormatError(UserError, ValueError):
    """A Hugging Face directory or config jaxllm cannot read (or params it cannot write), in one line."""

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_SAFETENSORS = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def _np_dtype(dtype) -> np.dtype:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _DTYPES:
        raise HFFormatError(f"unsupported dtype {dtype!r}; valid: {', '.join(_DTYPES)}")
    return np.dtype(_DTYPES[name])


# ----------------------------------------------------------------------------- config mapping


def config_from_hf(hf: dict, dtype: str = "float32") -> ModelConfig:
    """ModelConfig from a HF config.json dict. `dtype` is the compute dtype ("float32"|"bfloat16")."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HFFormatError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise HFFormatError(f"unsupported hidden_act {act!r}: jaxllm implements SwiGLU (silu) only")
    if hf.get("mlp_bias"):
        raise HFFormatError("unsupported: mlp_bias=true (jaxllm MLP projections have no bias)")
    # transformers>=5 writes `rope_parameters` (theta included); older configs write `rope_theta`
    # plus an optional `rope_scaling` dict. Merge so either spelling works.
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    max_pos = hf.get("max_position_embeddings", 2048)
    if rope_type == "default":
        scaling = RopeScaling()
    elif rope_type == "llama3":
        scaling = RopeScaling(
            type="llama3", factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope.get("original_max_position_embeddings", max_pos)))
    else:
        raise HFFormatError(f"unsupported rope scaling type {rope_type!r}; supported: default, llama3")
    # Mistral-style sliding windows are not implemented; within the window full causal attention is
    # identical, so cap the sequence length instead of refusing the checkpoint.
    window = hf.get("sliding_window") if hf.get("use_sliding_window", model_type != "qwen2") else None
    if window:
        max_pos = min(max_pos, window)
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or 0
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=n,
        n_kv_heads=hf.get("num_key_value_heads") or n,
        head_dim=0 if head_dim == d // n else head_dim,  # 0 is the canonical "default" spelling
        d_ff=hf["intermediate_size"], rope_theta=float(theta), rope_scaling=scaling,
        max_seq_len=max_pos, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        init_std=float(hf.get("initializer_range", 0.02)), dtype=dtype)


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """HF config.json dict. qkv biases map to Qwen2 (its attention always has them), else Llama."""
    qwen = cfg.qkv_bias
    s = cfg.rope_scaling
    hf = {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.hd, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        # The legacy rope_theta/rope_scaling spelling: read by transformers 4.x and 5.x, vLLM, etc.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if s.type == "none" else {
            "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings},
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
        "torch_dtype": dtype, "use_cache": True,
    }
    if qwen:
        hf |= {"use_sliding_window": False, "sliding_window": None}
    else:
        hf |= {"attention_bias": False, "mlp_bias": False}
    return hf


# ----------------------------------------------------------------------------- tensor name mapping


def _tensor_specs(cfg: ModelConfig) -> dict:
    """HF name -> (jaxllm path, HF shape, hf_to_jax, jax_to_hf); `{i}` marks per-layer tensors."""
    D, N, K, H, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.hd, cfg.d_ff, cfg.vocab_size
    same = lambda w: w  # noqa: E731
    T = lambda w: w.T  # noqa: E731

    def proj_in(heads):  # q/k/v: HF [heads*H, D] <-> jaxllm [D, heads, H]
        return ((heads * H, D), lambda w: w.T.reshape(D, heads, H), lambda p: p.reshape(D, heads * H).T)

    def bias(heads):
        return ((heads * H,), lambda w: w.reshape(heads, H), lambda p: p.reshape(heads * H))

    layer = {
        "input_layernorm.weight": ("attn_norm", (D,), same, same),
        "self_attn.q_proj.weight": ("wq", *proj_in(N)),
        "self_attn.k_proj.weight": ("wk", *proj_in(K)),
        "self_attn.v_proj.weight": ("wv", *proj_in(K)),
        "self_attn.o_proj.weight": ("wo", (D, N * H), lambda w: w.T.reshape(N, H, D),
                                    lambda p: p.reshape(N * H, D).T),
        "post_attention_layernorm.weight": ("mlp_norm", (D,), same, same),
        "mlp.gate_proj.weight": ("w_gate", (F, D), T, T),
        "mlp.up_proj.weight": ("w_up", (F, D), T, T),
        "mlp.down_proj.weight": ("w_down", (D, F), T, T),
    }
    if cfg.qkv_bias:
        layer |= {"self_attn.q_proj.bias": ("bq", *bias(N)), "self_attn.k_proj.bias": ("bk", *bias(K)),
                  "self_attn.v_proj.bias": ("bv", *bias(K))}
    specs = {"model.embed_tokens.weight": ("embed", (V, D), same, same),
             "model.norm.weight": ("final_norm", (D,), same, same)}
    if not cfg.tie_embeddings:
        specs["lm_head.weight"] = ("lm_head", (V, D), T, T)
    specs |= {f"model.layers.{{i}}.{k}": v for k, v in layer.items()}
    return specs


def _name_list(names) -> str:
    names = sorted(names)
    return ", ".join(names[:8]) + (f" ... ({len(names)} in all)" if len(names) > 8 else "")


# ----------------------------------------------------------------------------- loading


class _ShardReader:
    """Reads tensors from safetensors files as numpy, including bf16 (which numpy lacks natively)."""

    def __init__(self, files: dict[str, Path]):
        from safetensors import safe_open

        self._safe_open = safe_open
        self.files = files  # tensor name -> file
        self._handles: dict[tuple[Path, str], object] = {}

    def _handle(self, path: Path, framework: str):
        if (path, framework) not in self._handles:
            self._handles[(path, framework)] = self._safe_open(str(path), framework=framework)
        return self._handles[(path, framework)]

    def get(self, name: str) -> np.ndarray:
        path = self.files[name]
        f = self._handle(path, "np")
        if f.get_slice(name).get_dtype() != "BF16":
            return f.get_tensor(name)
        # safetensors' numpy backend rejects bf16; its flax backend builds a jax array. Pin that to
        # the CPU so a GPU host does not stage the checkpoint through accelerator memory.
        import jax

        with jax.default_device(jax.devices("cpu")[0]):
            return np.asarray(self._handle(path, "flax").get_tensor(name))


def read_safetensors(file) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file as host numpy (bf16 as ml_dtypes.bfloat16)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="np") as f:
        names = list(f.keys())
    reader = _ShardReader(dict.fromkeys(names, Path(file)))
    return {name: reader.get(name) for name in names}


def _tensor_files(path: Path) -> dict[str, Path]:
    from safetensors import safe_open

    if (path / _SAFETENSORS).exists():  # same precedence as transformers
        with safe_open(str(path / _SAFETENSORS), framework="np") as f:
            return {k: path / _SAFETENSORS for k in f.keys()}
    if (path / _INDEX).exists():
        weight_map = json.loads((path / _INDEX).read_text())["weight_map"]
        return {k: path / v for k, v in weight_map.items()}
    raise HFFormatError(f"{path}: no {_SAFETENSORS} or {_INDEX} (only safetensors checkpoints are supported)")


def read_model_config(path, dtype: str = "float32") -> ModelConfig:
    """The ModelConfig of a HF directory's config.json (`dtype` the compute dtype)."""
    config_file = Path(path) / "config.json"
    if not config_file.exists():
        raise HFFormatError(f"{path}: no config.json")
    return config_from_hf(json.loads(config_file.read_text()), dtype=dtype)


def load_hf_checkpoint(path, dtype="float32") -> tuple[ModelConfig, dict]:
    """Reads a HF directory into (ModelConfig, params); params are host numpy arrays of `dtype`."""
    path = Path(path)
    np_dtype = _np_dtype(dtype)
    cfg = read_model_config(path, dtype="float32" if np_dtype == np.float32 else "bfloat16")
    files = _tensor_files(path)

    found = {k for k in files if not k.endswith("rotary_emb.inv_freq")}  # buffers of old exports
    if cfg.tie_embeddings:
        found.discard("lm_head.weight")  # some tied exports store it anyway; HF ignores it too
    specs = _tensor_specs(cfg)
    expected = {}
    for hf_name, spec in specs.items():
        for i in range(cfg.n_layers) if "{i}" in hf_name else [None]:
            expected[hf_name.format(i=i)] = (spec, i)
    unexpected = found - expected.keys()
    unsupported = sorted(k for k in unexpected if k.endswith(("o_proj.bias", "mlp.gate_proj.bias",
                                                              "mlp.up_proj.bias", "mlp.down_proj.bias")))
    if unsupported:
        raise HFFormatError(f"{path}: unsupported bias tensors (jaxllm has no o_proj/MLP biases): "
                         f"{_name_list(unsupported)}")
    if missing := expected.keys() - found:
        raise HFFormatError(f"{path}: missing tensors: {_name_list(missing)}")
    if unexpected:
        raise HFFormatError(f"{path}: unexpected tensors: {_name_list(unexpected)}")

    # Preallocate the stacked [L, ...] arrays and fill layer by layer: peak host memory stays at
    # one copy of the model plus one tensor.
    shapes = param_shapes(cfg)
    params = {"layers": {k: np.empty(s, np_dtype) for k, s in shapes["layers"].items()}}
    reader = _ShardReader(files)
    for name, ((key, hf_shape, to_jax, _), i) in expected.items():
        w = reader.get(name)
        if tuple(w.shape) != hf_shape:
            raise HFFormatError(f"{path}: tensor {name} has shape {tuple(w.shape)}, expected {hf_shape}")
        w = to_jax(w).astype(np_dtype)
        if i is None:
            params[key] = np.ascontiguousarray(w)
        else:
            params["layers"][key][i] = w
    return cfg, params


# ----------------------------------------------------------------------------- saving


def _hf_tensors(cfg: ModelConfig, params: dict, np_dtype) -> dict[str, np.ndarray]:
    import jax

    params = jax.device_get(params)  # gathers sharded jax arrays to host
    shapes = param_shapes(cfg)

    def get(key, layered):
        tree, want = (params.get("layers", {}), shapes["layers"][key]) if layered else (params, shapes[key])
        if key not in tree:
            raise HFFormatError(f"params lack {'layers/' if layered else ''}{key}")
        w = np.asarray(tree[key])
        if w.shape != want:
            raise HFFormatError(f"param {'layers/' if layered else ''}{key} has shape {w.shape}, expected {want}")
        return w

    out = {}
    for hf_name, (key, _, _, to_hf) in _tensor_specs(cfg).items():
        if "{i}" in hf_name:
            stacked = get(key, True)
            for i in range(cfg.n_layers):
                out[hf_name.format(i=i)] = np.ascontiguousarray(to_hf(stacked[i]).astype(np_dtype))
        else:
            out[hf_name] = np.ascontiguousarray(to_hf(get(key, False)).astype(np_dtype))
    return out


def _shards(tensors: dict[str, np.ndarray], max_shard_bytes) -> list[dict[str, np.ndarray]]:
    if not max_shard_bytes or sum(w.nbytes for w in tensors.values()) <= max_shard_bytes:
        return [tensors]
    shards, cur, size = [], {}, 0
    for name, w in tensors.items():  # greedy in name order; a tensor larger than the cap gets its own shard
        if cur and size + w.nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = w
        size += w.nbytes
    return shards + [cur]


def save_hf_checkpoint(cfg: ModelConfig, params: dict, path, dtype="float32", max_shard_bytes=None) -> None:
    """Writes config.json plus model.safetensors (or shards + index) loadable by transformers.

    Files are written into a temporary sibling directory first; a new directory is then renamed
    into place, an existing one gets each file replaced (keeping e.g. tokenizer files there).
    """
    from safetensors.numpy import save_file

    path = Path(path)
    np_dtype = _np_dtype(dtype)
    tensors = _hf_tensors(cfg, params, np_dtype)
    shards = _shards(tensors, max_shard_bytes)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        if len(shards) == 1:
            save_file(shards[0], str(tmp / _SAFETENSORS), metadata={"format": "pt"})  # transformers checks format
        else:
            weight_map = {}
            for n, shard in enumerate(shards, 1):
                fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map |= dict.fromkeys(shard, fname)
            index = {"metadata": {"total_size": sum(w.nbytes for w in tensors.values())}, "weight_map": weight_map}
            (tmp / _INDEX).write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg, np_dtype.name), indent=2) + "\n")
        if not path.exists():
            os.rename(tmp, path)
            return
        # Drop weights of an earlier save that the new one does not overwrite: a stale
        # model.safetensors would otherwise shadow a new sharded index (or vice versa).
        new = {p.name for p in tmp.iterdir()}
        for old in path.iterdir():
            if old.name not in new and (old.name == _INDEX or old.name.startswith("model") and old.suffix == ".safetensors"):
                old.unlink()
        for name in sorted(new, key=lambda n: n == "config.json"):  # config last: it marks completion
            os.replace(tmp / name, path / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
