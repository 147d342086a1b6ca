"""Llama-family decoder as pure functions over a params pytree.

Covers Llama 2/3, SmolLM2 and Qwen2 shapes: RMSNorm, RoPE (with Llama-3.1 frequency scaling),
grouped-query attention, SwiGLU, optional qkv biases and tied embeddings. Layers are stacked along
a leading `layers` axis and run with `lax.scan`, so compile time does not grow with depth.

`decoder_layer` is the one layer function: training (`hidden_states`) and cached decoding
(`jaxllm.models.decode`) differ only in the `attend` function they give it.

Einsum letters: B batch, T query length, S key length, D embed, N heads, K kv heads,
G heads per kv head, H head dim, F mlp, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp

from jaxllm.kernels.attention import attention, check_name
from jaxllm.parallel.mesh import constrain


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    type: Literal["none", "llama3"] = "none"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 0  # 0: d_model // n_heads
    d_ff: int = 768
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    init_std: float = 0.02
    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # compute dtype; params are always fp32
    attention: str = "xla"  # a name in jaxllm.kernels.attention.REGISTRY
    remat: Literal["none", "full", "save_dots"] = "none"
    # False unrolls the layer loop: longer compiles, but faster small models (e.g. on CPU).
    scan_layers: bool = True
    # Start from these weights instead of a random init: a jaxllm run or params directory (e.g. a
    # PMA merge) or a Hugging Face directory (config.json + safetensors). Shapes must match.
    init_from: str = ""

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be > 0")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({self.n_kv_heads})")
        if self.head_dim == 0 and self.d_model % self.n_heads:
            raise ValueError("model.d_model must be divisible by model.n_heads when model.head_dim is 0")
        if self.hd % 2:
            raise ValueError("the head dimension must be even for RoPE")
        check_name(self.attention)

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def num_params(self, include_embeddings: bool = True) -> int:
        d, f, h, kv, hd = self.d_model, self.d_ff, self.n_heads, self.n_kv_heads, self.hd
        per_layer = 2 * d + d * hd * (h + 2 * kv) + h * hd * d + 3 * d * f
        if self.qkv_bias:
            per_layer += hd * (h + 2 * kv)
        n = self.n_layers * per_layer + d
        if include_embeddings:
            n += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        elif not self.tie_embeddings:
            n += self.vocab_size * d  # the output projection is a matmul, counted in FLOPs
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * matmul params + causal attention (PaLM appendix B)."""
        matmul_params = self.num_params(include_embeddings=False) + (
            self.vocab_size * self.d_model if self.tie_embeddings else 0)
        attn = 6 * self.n_layers * self.n_heads * self.hd * seq_len  # 12*L*H*Dh*T, halved for causal
        return 6 * matmul_params + attn


# Logical axis names of every parameter; jaxllm.parallel maps them to mesh axes.
def param_axes(cfg: ModelConfig) -> dict:
    layers = {
        "attn_norm": ("layers", "embed"),
        "wq": ("layers", "embed", "heads", "head_dim"),
        "wk": ("layers", "embed", "kv_heads", "head_dim"),
        "wv": ("layers", "embed", "kv_heads", "head_dim"),
        "wo": ("layers", "heads", "head_dim", "embed"),
        "mlp_norm": ("layers", "embed"),
        "w_gate": ("layers", "embed", "mlp"),
        "w_up": ("layers", "embed", "mlp"),
        "w_down": ("layers", "mlp", "embed"),
    }
    if cfg.qkv_bias:
        layers |= {"bq": ("layers", "heads", "head_dim"), "bk": ("layers", "kv_heads", "head_dim"),
                   "bv": ("layers", "kv_heads", "head_dim")}
    axes = {"embed": ("vocab", "embed"), "layers": layers, "final_norm": ("embed",)}
    if not cfg.tie_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def param_shapes(cfg: ModelConfig) -> dict:
    L, D, N, K, H, F, V = (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.hd,
                           cfg.d_ff, cfg.vocab_size)
    layers = {
        "attn_norm": (L, D), "wq": (L, D, N, H), "wk": (L, D, K, H), "wv": (L, D, K, H),
        "wo": (L, N, H, D), "mlp_norm": (L, D), "w_gate": (L, D, F), "w_up": (L, D, F),
        "w_down": (L, F, D),
    }
    if cfg.qkv_bias:
        layers |= {"bq": (L, N, H), "bk": (L, K, H), "bv": (L, K, H)}
    shapes = {"embed": (V, D), "layers": layers, "final_norm": (D,)}
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict:
    """fp32 params: normal(init_std) matrices, unit norms, zero biases."""
    shapes = param_shapes(cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(rng, len(flat))
    leaves = []
    for (path, shape), key in zip(flat, keys):
        name = path[-1].key
        if name.endswith("norm"):
            leaves.append(jnp.ones(shape, jnp.float32))
        elif name in ("bq", "bk", "bv"):
            leaves.append(jnp.zeros(shape, jnp.float32))
        else:
            leaves.append(cfg.init_std * jax.random.normal(key, shape, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, leaves)


# ----------------------------------------------------------------------------- building blocks


def rms_norm(x, weight, eps):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight * x32).astype(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies [H/2], with Llama-3.1 scaling when configured."""
    H = cfg.hd
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
    s = cfg.rope_scaling
    if s.type == "llama3":
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wavelen, inv / s.factor, inv)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = jnp.where(medium, smoothed, scaled)
    return inv


def apply_rope(x_BTNH, positions_BT, inv_freq):
    """Rotates pairs (i, i + H/2), the layout Hugging Face Llama checkpoints use."""
    angles = positions_BT[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x = x_BTNH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


def _qkv(cfg, p, x_BTD, positions_BT, inv_freq):
    q = jnp.einsum("BTD,DNH->BTNH", x_BTD, p["wq"])
    k = jnp.einsum("BTD,DKH->BTKH", x_BTD, p["wk"])
    v = jnp.einsum("BTD,DKH->BTKH", x_BTD, p["wv"])
    if cfg.qkv_bias:
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    q = constrain(apply_rope(q, positions_BT, inv_freq), ("batch", "length", "heads", "head_dim"))
    k = constrain(apply_rope(k, positions_BT, inv_freq), ("batch", "length", "kv_heads", "head_dim"))
    v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
    return q, k, v


def _mlp(p, x_BTD):
    gate = jnp.einsum("BTD,DF->BTF", x_BTD, p["w_gate"])
    up = jnp.einsum("BTD,DF->BTF", x_BTD, p["w_up"])
    h = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
    return jnp.einsum("BTF,FD->BTD", h, p["w_down"])


def cast_params(cfg: ModelConfig, params):
    """Params in the compute dtype (they are stored in fp32)."""
    return jax.tree.map(lambda a: a.astype(cfg.compute_dtype), params)


def embed_tokens(cfg: ModelConfig, params_c: dict, tokens_BT):
    """Input embeddings [B, T, D] from compute-dtype params."""
    # Gather from a table whole along vocab: a vocab-sharded gather would be rematerialised anyway.
    table = constrain(params_c["embed"], (None, "embed"))
    return constrain(jnp.take(table, tokens_BT, axis=0), ("batch", "length", "embed"))


def decoder_layer(cfg: ModelConfig, p: dict, x_BTD, positions_BT, inv_freq, attend):
    """One pre-norm layer. `attend(q_BTNH, k_BTKH, v_BTKH) -> (att_BTNH, aux)` does the attention
    (training: over the row itself; decoding: against a KV cache it updates, returned as aux).
    Returns (x_BTD, aux)."""
    h = rms_norm(x_BTD, p["attn_norm"], cfg.norm_eps)
    q, k, v = _qkv(cfg, p, h, positions_BT, inv_freq)
    att, aux = attend(q, k, v)
    x_BTD = x_BTD + jnp.einsum("BTNH,NHD->BTD", att, p["wo"])
    x_BTD = constrain(x_BTD, ("batch", "length", "embed"))
    x_BTD = x_BTD + _mlp(p, rms_norm(x_BTD, p["mlp_norm"], cfg.norm_eps))
    return constrain(x_BTD, ("batch", "length", "embed")), aux


_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


def hidden_states(cfg: ModelConfig, params: dict, tokens_BT, positions=None, segment_ids=None):
    """Final-norm hidden states [B, T, D] in the compute dtype."""
    B, T = tokens_BT.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    params = cast_params(cfg, params)
    x = embed_tokens(cfg, params, tokens_BT)
    inv_freq = rope_frequencies(cfg)

    def attend(q, k, v):
        return attention(q, k, v, impl=cfg.attention, causal=True, segment_ids=segment_ids), None

    def layer(x, p):
        return decoder_layer(cfg, p, x, positions, inv_freq, attend)[0]

    if cfg.remat != "none":
        layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[cfg.remat])
    x, _ = jax.lax.scan(lambda x, p: (layer(x, p), None), x, params["layers"], unroll=not cfg.scan_layers)
    return rms_norm(x, params["final_norm"], cfg.norm_eps)


def output_embedding(cfg: ModelConfig, params: dict):
    """The [D, V] output projection (the transposed input embedding when tied)."""
    return params["embed"].T if cfg.tie_embeddings else params["lm_head"]


def lm_logits(cfg: ModelConfig, params: dict, h_BTD):
    """fp32 logits [B, T, V] of final-norm hidden states."""
    w = output_embedding(cfg, params).astype(cfg.compute_dtype)
    return jnp.einsum("BTD,DV->BTV", h_BTD, w, preferred_element_type=jnp.float32)


def forward(cfg: ModelConfig, params: dict, tokens, positions=None, segment_ids=None):
    """Logits [B, T, V] in fp32. Training uses `hidden_states` with a chunked loss instead."""
    return lm_logits(cfg, params, hidden_states(cfg, params, tokens, positions, segment_ids))
