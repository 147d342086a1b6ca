"""LoRA (Hu et al. 2021) and DoRA (Liu et al. 2024) adapters over the Llama params pytree.

Adapters live in their own pytree, separate from the frozen base params, so a trainer can
differentiate with respect to `adapters` alone and keep optimizer state only for them (the
train state's LoRA roles are in `jaxllm.tasks.params`). `apply_adapters` returns an ordinary params pytree holding the effective (merged) weights,
so `forward(cfg, apply_adapters(...), tokens)` and every loss work unchanged.

Each target weight is viewed as a matrix [in, out] by flattening its input and output dims,
keeping the leading `layers` axis of stacked leaves: wq [L, D, N, H] -> [L, D, N*H],
wo [L, N, H, D] -> [L, N*H, D]. For a target with a layers axis the adapter tree holds
`a` [L, in, r], `b` [L, r, out] (and for DoRA `m` [L, out]); `lm_head` [D, V] has no layers
axis, so its adapter is `a` [D, r], `b` [r, V], `m` [V].
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

# name -> (path in the params tree, number of leading stacked axes, number of input dims).
_TARGETS = {
    "wq": (("layers", "wq"), 1, 1),
    "wk": (("layers", "wk"), 1, 1),
    "wv": (("layers", "wv"), 1, 1),
    "wo": (("layers", "wo"), 1, 2),
    "w_gate": (("layers", "w_gate"), 1, 1),
    "w_up": (("layers", "w_up"), 1, 1),
    "w_down": (("layers", "w_down"), 1, 1),
    "lm_head": (("lm_head",), 0, 1),
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 0  # 0 disables adapters
    alpha: float = 16.0  # scale = alpha / rank
    dropout: float = 0.0
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo")
    dora: bool = False

    def __post_init__(self):
        if isinstance(self.targets, str):  # a bare string would be split into letters
            raise ValueError(f"lora.targets must be a tuple of names, got the string {self.targets!r}")
        object.__setattr__(self, "targets", tuple(self.targets))
        for t in self.targets:
            if t not in _TARGETS:
                raise ValueError(f"lora.targets: unknown target {t!r}; choose from {sorted(_TARGETS)}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"lora.targets has duplicates: {self.targets}")
        if not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"lora.rank must be an int >= 0, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0 and bool(self.targets)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    """Copy of `tree` with `path` replaced; untouched subtrees are shared, not copied."""
    if len(path) == 1:
        return {**tree, path[0]: value}
    return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def _leaf(params, name):
    path, _, _ = _TARGETS[name]
    try:
        return _get(params, path)
    except KeyError:
        raise ValueError(f"lora target {name!r} is not in the params (tied embeddings have no lm_head)") from None


def _matrix_shape(shape, name):
    """(lead dims, in, out) of a leaf viewed as a (stacked) matrix."""
    _, n_lead, n_in = _TARGETS[name]
    lead, rest = tuple(shape[:n_lead]), shape[n_lead:]
    return lead, math.prod(rest[:n_in]), math.prod(rest[n_in:])


def _as_matrix(w, name):
    lead, d_in, d_out = _matrix_shape(w.shape, name)
    return w.reshape(*lead, d_in, d_out)


def _col_norm(v):
    """Per-output-column L2 norm over the input dim: [..., in, out] -> [..., out]."""
    v = v.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(v * v, axis=-2))


def init_adapters(lora_cfg: LoraConfig, params: dict, rng: jax.Array) -> dict:
    """{target: {"a", "b"[, "m"]}}; `b` is zero, so the adapted model equals the base at init.

    `a` is uniform(+-1/sqrt(in)), PEFT's kaiming_uniform_(a=sqrt(5)) on its [r, in] lora_A.
    DoRA's `m` starts at the base weight's column norms, so W' = m * W / ||W|| = W.
    """
    if not lora_cfg.enabled:
        return {}
    r = lora_cfg.rank
    adapters = {}
    for name, key in zip(lora_cfg.targets, jax.random.split(rng, len(lora_cfg.targets))):
        w = _leaf(params, name)
        lead, d_in, d_out = _matrix_shape(w.shape, name)
        bound = 1.0 / math.sqrt(d_in)
        ad = {"a": jax.random.uniform(key, (*lead, d_in, r), jnp.float32, -bound, bound),
              "b": jnp.zeros((*lead, r, d_out), jnp.float32)}
        if lora_cfg.dora:
            ad["m"] = _col_norm(_as_matrix(w, name))
        adapters[name] = ad
    return adapters


def _effective_weight(lora_cfg, w, ad, name, drop_key):
    shape, dtype = w.shape, w.dtype
    w = _as_matrix(w, name).astype(jnp.float32)
    a = ad["a"]
    if drop_key is not None:
        # LoRA dropout acts on the adapter's input x before A. Merged weights cannot hold a
        # per-token mask, so the mask drops input features (rows of A) for the whole call: the
        # same features are dropped for every token and batch row, fresh per call and per layer.
        keep = jax.random.bernoulli(drop_key, 1.0 - lora_cfg.dropout, a.shape[:-1] + (1,))
        a_used = jnp.where(keep, a / (1.0 - lora_cfg.dropout), 0.0)
    else:
        a_used = a
    delta = lora_cfg.scale * jnp.einsum("...ir,...ro->...io", a_used, ad["b"])
    w_new = w + delta
    if lora_cfg.dora:
        # DoRA: W' = m * V / ||V||_c. As in the paper (sec. 4.3) and PEFT, ||V||_c is detached from
        # the gradient graph (treated as a constant), which saves memory and barely changes
        # accuracy. The norm uses the undropped adapter, as PEFT computes it from the weights
        # while the dropout only reaches the low-rank branch.
        v_norm = _col_norm(w + lora_cfg.scale * jnp.einsum("...ir,...ro->...io", a, ad["b"]))
        w_new = w_new * (ad["m"] / jax.lax.stop_gradient(v_norm))[..., None, :]
    return w_new.astype(dtype).reshape(shape)


def apply_adapters(lora_cfg: LoraConfig, params: dict, adapters: dict, rng=None,
                   deterministic: bool = True) -> dict:
    """Params with every target replaced by its effective weight (see module docstring)."""
    if not lora_cfg.enabled or not adapters:
        return params
    use_dropout = not deterministic and lora_cfg.dropout > 0
    if use_dropout and rng is None:
        raise ValueError("apply_adapters needs an rng for dropout when deterministic=False")
    keys = jax.random.split(rng, len(lora_cfg.targets)) if use_dropout else [None] * len(lora_cfg.targets)
    out = params
    for name, key in zip(lora_cfg.targets, keys):
        w = _leaf(params, name)
        out = _set(out, _TARGETS[name][0], _effective_weight(lora_cfg, w, adapters[name], name, key))
    return out


def merge_adapters(lora_cfg: LoraConfig, params: dict, adapters: dict) -> dict:
    """Plain params with the adapters folded in (no dropout), for export and inference."""
    return apply_adapters(lora_cfg, params, adapters, deterministic=True)


def adapter_param_count(adapters: dict) -> int:
    """Trainable parameters: sum over targets of L*r*(in+out) (+ L*out for DoRA)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(adapters))


def adapter_decay_mask(adapters: dict):
    """Weight decay for `a` and `b` only: decaying DoRA's magnitude `m` would shrink the weights."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) != "m",
                                            adapters)
