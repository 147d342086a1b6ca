import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm.config import OptimizerConfig
from jaxllm.models import ModelConfig, forward, param_shapes
from jaxllm.models.lora import LoraConfig, adapter_param_count, apply_adapters, init_adapters, merge_adapters
from jaxllm.objectives.lm import lm_loss
from jaxllm.optim import make_optimizer
from jaxllm.tasks import params as params_lib

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, dtype="float32")
ALL = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "lm_head")
# Number of input dims of each target's leaf after the layers axis (lm_head has no layers axis).
SPLIT = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1, "lm_head": 1}
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 8)), jnp.int32)
fwd = jax.jit(lambda p, t: forward(CFG, p, t))


def _params(seed=0):
    """NumPy-made params (no init_params compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.ones(s, jnp.float32) if path[-1].key.endswith("norm")
        else jnp.asarray(0.05 * rng.standard_normal(s), jnp.float32),
        param_shapes(CFG), is_leaf=lambda x: isinstance(x, tuple))


def _leaf(params, name):
    return params["lm_head"] if name == "lm_head" else params["layers"][name]


def _randomise(adapters, seed=1, field="b"):
    rng = np.random.default_rng(seed)
    return {k: {**v, field: jnp.asarray(rng.standard_normal(v[field].shape), jnp.float32)}
            for k, v in adapters.items()}


def _np_matrix(w, name):
    """The [(L,) in, out] view computed independently in NumPy."""
    w = np.asarray(w)
    lead = () if name == "lm_head" else w.shape[:1]
    rest = w.shape[len(lead):]
    n_in = SPLIT[name]
    return w.reshape(*lead, int(np.prod(rest[:n_in])), int(np.prod(rest[n_in:])))


@pytest.mark.parametrize("dora", [False, True])
def test_init_is_identity(dora):
    params = _params()
    lc = LoraConfig(rank=4, alpha=8.0, targets=ALL, dora=dora)
    adapters = init_adapters(lc, params, jax.random.PRNGKey(0))
    assert all(np.all(np.asarray(a["b"]) == 0) and np.any(np.asarray(a["a"]) != 0) for a in adapters.values())
    adapted = apply_adapters(lc, params, adapters)
    np.testing.assert_array_equal(fwd(adapted, TOKENS), fwd(params, TOKENS))


def test_merge_matches_numpy_and_apply():
    params = _params()
    lc = LoraConfig(rank=3, alpha=6.0, targets=ALL, dropout=0.5)
    adapters = _randomise(init_adapters(lc, params, jax.random.PRNGKey(0)))
    merged = merge_adapters(lc, params, adapters)
    for name in ALL:
        a, b = np.asarray(adapters[name]["a"]), np.asarray(adapters[name]["b"])
        want = _np_matrix(_leaf(params, name), name) + 2.0 * a @ b
        got = np.asarray(_leaf(merged, name))
        assert got.shape == _leaf(params, name).shape
        np.testing.assert_allclose(_np_matrix(got, name), want, rtol=1e-5, atol=1e-6)
    # Non-targets are the very same arrays.
    assert merged["embed"] is params["embed"] and merged["layers"]["attn_norm"] is params["layers"]["attn_norm"]
    # deterministic=True ignores dropout and equals the merged export.
    applied = apply_adapters(lc, params, adapters, jax.random.PRNGKey(5), deterministic=True)
    np.testing.assert_array_equal(fwd(merged, TOKENS), fwd(applied, TOKENS))
    assert not np.allclose(fwd(merged, TOKENS), fwd(params, TOKENS), atol=1e-3)


def test_dora_decomposition():
    params = _params()
    lc = LoraConfig(rank=4, alpha=4.0, targets=("wq", "wo", "w_down", "lm_head"), dora=True)
    init = init_adapters(lc, params, jax.random.PRNGKey(0))
    # m = base column norms and b = 0: the weight is unchanged.
    same = merge_adapters(lc, params, init)
    for name in lc.targets:
        np.testing.assert_allclose(_leaf(same, name), _leaf(params, name), rtol=1e-6, atol=1e-7)
    adapters = _randomise(_randomise(init), seed=2, field="m")
    merged = merge_adapters(lc, params, adapters)
    for name in lc.targets:
        ad = {k: np.asarray(v, np.float64) for k, v in adapters[name].items()}
        v = _np_matrix(_leaf(params, name), name) + ad["a"] @ ad["b"]
        got = _np_matrix(_leaf(merged, name), name)
        norms = np.linalg.norm(got, axis=-2)
        np.testing.assert_allclose(norms, np.abs(ad["m"]), rtol=1e-5)
        direction = v / np.linalg.norm(v, axis=-2, keepdims=True)
        np.testing.assert_allclose(got / ad["m"][..., None, :], direction, rtol=1e-4, atol=1e-6)


def _batch():
    rng = np.random.default_rng(3)
    seq = rng.integers(0, CFG.vocab_size, (2, 9))
    return {"tokens": jnp.asarray(seq[:, :-1], jnp.int32), "targets": jnp.asarray(seq[:, 1:], jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8)),
            "segment_ids": jnp.ones((2, 8), jnp.int32), "loss_mask": jnp.ones((2, 8), jnp.float32)}


def _mean_lm_loss(params, batch):
    loss_sum, metrics = lm_loss(CFG, params, batch)
    return loss_sum / metrics["weight"]


@pytest.mark.parametrize("dora", [False, True])
def test_gradients_reach_only_adapters_and_training_lowers_loss(dora):
    params = _params()
    before = jax.tree.map(np.array, params)
    lc = LoraConfig(rank=4, alpha=8.0, targets=("wq", "wv", "w_down", "lm_head"), dora=dora)
    adapters = init_adapters(lc, params, jax.random.PRNGKey(0))
    batch = _batch()

    # The train step's LoRA path: trainable {"adapters"}, frozen {"base"}, effective params.
    def loss_fn(adapters, base_params, rng):
        params = params_lib.effective_params(lc, {"adapters": adapters}, {"base": base_params}, rng,
                                             deterministic=False)
        return _mean_lm_loss(params, batch)

    @jax.jit
    def step(adapters, opt_state, base_params, rng):
        loss, grads = jax.value_and_grad(loss_fn)(adapters, base_params, rng)
        updates, opt_state = opt.update({"adapters": grads}, opt_state, {"adapters": adapters})
        return optax.apply_updates(adapters, updates["adapters"]), opt_state, loss, grads

    opt = make_optimizer(OptimizerConfig(lr=1e-2), optax.constant_schedule(1e-2), decay_mask=params_lib.decay_mask(lc))
    opt_state = opt.init({"adapters": adapters})
    losses = []
    for i in range(6):
        new, opt_state, loss, grads = step(adapters, opt_state, params, jax.random.PRNGKey(i))
        if i == 0:  # gradients have exactly the adapter structure; b = 0 zeroes d/dA at init
            assert jax.tree.structure(grads) == jax.tree.structure(adapters)
            for g in grads.values():
                assert np.all(np.asarray(g["a"]) == 0) and np.any(np.asarray(g["b"]) != 0)
                if dora:
                    assert np.any(np.asarray(g["m"]) != 0)
        adapters = new
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.05, losses
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), before)


@pytest.mark.parametrize("dora", [False, True])
def test_param_count(dora):
    params = _params()
    lc = LoraConfig(rank=5, alpha=1.0, targets=ALL, dora=dora)
    adapters = init_adapters(lc, params, jax.random.PRNGKey(0))
    L, D, N, K, H, F, V = 2, 32, 4, 2, 8, 64, 64
    dims = {"wq": (D, N * H), "wk": (D, K * H), "wv": (D, K * H), "wo": (N * H, D), "w_gate": (D, F),
            "w_up": (D, F), "w_down": (F, D), "lm_head": (D, V)}
    want = sum((1 if t == "lm_head" else L) * (5 * (i + o) + (o if dora else 0)) for t, (i, o) in dims.items())
    assert adapter_param_count(adapters) == want
    assert LoraConfig(rank=0, targets=ALL).enabled is False
    assert init_adapters(LoraConfig(rank=0), params, jax.random.PRNGKey(0)) == {}


def test_dropout():
    params = _params()
    lc = LoraConfig(rank=4, alpha=8.0, targets=("wq", "w_up"), dropout=0.5)
    adapters = _randomise(init_adapters(lc, params, jax.random.PRNGKey(0)))
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    w = lambda p: np.asarray(p["layers"]["wq"])
    p1 = apply_adapters(lc, params, adapters, k1, deterministic=False)
    np.testing.assert_array_equal(w(p1), w(apply_adapters(lc, params, adapters, k1, deterministic=False)))
    assert not np.allclose(w(p1), w(apply_adapters(lc, params, adapters, k2, deterministic=False)))
    merged = merge_adapters(lc, params, adapters)
    assert not np.allclose(w(p1), w(merged))
    # deterministic=True ignores the rng and the dropout rate.
    no_drop = dataclasses.replace(lc, dropout=0.0)
    np.testing.assert_array_equal(w(apply_adapters(lc, params, adapters, k1, deterministic=True)),
                                  w(merge_adapters(no_drop, params, adapters)))
    # Dropout zeroes whole input features of the delta (rows of A), scaling the rest by 1/(1-p).
    delta = _np_matrix(w(p1), "wq") - _np_matrix(w(params), "wq")
    full = _np_matrix(w(merged), "wq") - _np_matrix(w(params), "wq")
    dropped = np.all(delta == 0, axis=-1)
    assert dropped.any() and (~dropped).any()
    np.testing.assert_allclose(delta[~dropped], 2.0 * full[~dropped], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="rng"):
        apply_adapters(lc, params, adapters, None, deterministic=False)


def test_bad_config():
    with pytest.raises(ValueError, match="'w_qkv'"):
        LoraConfig(rank=4, targets=("wq", "w_qkv"))
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(rank=-1)
    with pytest.raises(ValueError, match="alpha"):
        LoraConfig(rank=4, alpha=0.0)
    with pytest.raises(ValueError, match="dropout"):
        LoraConfig(rank=4, dropout=1.0)
    tied = {k: v for k, v in _params().items() if k != "lm_head"}
    with pytest.raises(ValueError, match="lm_head"):
        init_adapters(LoraConfig(rank=2, targets=("lm_head",)), tied, jax.random.PRNGKey(0))
