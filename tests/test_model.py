import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.models import ModelConfig, RopeScaling, forward, init_params
from jaxllm.models.llama import rope_frequencies
from jaxllm.objectives.lm import chunked_cross_entropy

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, dtype="float32")


def _params(cfg=CFG, seed=0):
    return init_params(cfg, jax.random.PRNGKey(seed))


def test_causality_through_gradients():
    """d logits[t] / d embedding[s] is zero for every s > t."""
    params = _params()
    tokens = jnp.arange(12)[None] % CFG.vocab_size
    x0 = jnp.take(params["embed"], tokens, axis=0)

    def logits_at(t, x):
        p = dict(params)
        # Feed embeddings directly by making the table the identity over these 12 rows.
        p["embed"] = jnp.zeros_like(params["embed"]).at[:12].set(x[0])
        return forward(CFG, p, jnp.arange(12)[None])[0, t].sum()

    for t in (0, 5, 11):
        g = jax.grad(lambda x: logits_at(t, x))(x0)
        per_pos = np.abs(np.asarray(g[0])).sum(-1)
        assert np.all(per_pos[t + 1:] == 0), per_pos
        assert np.all(per_pos[: t + 1] > 0)


def test_packed_segments_equal_separate_documents():
    params = _params()
    a, b = jnp.array([3, 9, 4, 1, 7]), jnp.array([11, 2, 8, 5, 6, 10, 12])
    packed = jnp.concatenate([a, b])[None]
    positions = jnp.concatenate([jnp.arange(5), jnp.arange(7)])[None]
    segments = jnp.array([1] * 5 + [2] * 7)[None]
    out = forward(CFG, params, packed, positions, segments)
    np.testing.assert_allclose(out[0, :5], forward(CFG, params, a[None])[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[0, 5:], forward(CFG, params, b[None])[0], rtol=1e-5, atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    params = _params()
    mha = ModelConfig(**{**CFG.__dict__, "n_kv_heads": 4})
    p2 = jax.tree.map(lambda x: x, params)
    p2["layers"] = dict(params["layers"])
    for name in ("wk", "wv"):
        p2["layers"][name] = jnp.repeat(params["layers"][name], 2, axis=2)
    tokens = jnp.array([[1, 5, 9, 2, 33, 7]])
    np.testing.assert_allclose(forward(CFG, params, tokens), forward(mha, p2, tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_remat_changes_memory_not_gradients(remat):
    params = _params()
    tokens = jnp.array([[1, 5, 9, 2, 33, 7, 3, 3]])

    def loss(cfg, p):
        return jnp.mean(forward(cfg, p, tokens) ** 2)

    g0 = jax.grad(lambda p: loss(CFG, p))(params)
    g1 = jax.grad(lambda p: loss(ModelConfig(**{**CFG.__dict__, "remat": remat}), p))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)


def test_llama3_rope_scaling_matches_reference_formula():
    s = RopeScaling(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
    cfg = ModelConfig(d_model=4096, n_heads=32, n_kv_heads=8, rope_theta=500000.0, rope_scaling=s)
    got = np.asarray(rope_frequencies(cfg))
    # Independent scalar transcription of Meta's `apply_scaling` (llama-models, Llama 3.1).
    base = 1.0 / (500000.0 ** (np.arange(0, 128, 2) / 128))
    want = []
    for f in base:
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4.0:
            want.append(f)
        elif wavelen > 8192 / 1.0:
            want.append(f / 8.0)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            want.append((1 - smooth) * f / 8.0 + smooth * f)
    np.testing.assert_allclose(got, np.array(want), rtol=1e-5)
    assert got[-1] == pytest.approx(base[-1] / 8, rel=1e-5) and got[0] == pytest.approx(base[0], rel=1e-6)


def test_bf16_compute_stays_close_to_fp32():
    params = _params()
    tokens = jnp.array([[1, 5, 9, 2, 33, 7]])
    bf = ModelConfig(**{**CFG.__dict__, "dtype": "bfloat16"})
    np.testing.assert_allclose(forward(bf, params, tokens), forward(CFG, params, tokens), atol=0.05)


def test_chunked_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    B, T, D, V = 2, 13, 8, 11
    h = rng.normal(size=(B, T, D)).astype(np.float32)
    w = rng.normal(size=(D, V)).astype(np.float32)
    y = rng.integers(0, V, size=(B, T))
    m = (rng.random((B, T)) > 0.3).astype(np.float32)
    logits = h @ w
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    want = ((lse - np.take_along_axis(logits, y[..., None], -1)[..., 0]) * m).sum()
    for chunk in (1, 4, 13, 64):
        got, correct = chunked_cross_entropy(jnp.asarray(h), jnp.asarray(w), jnp.asarray(y), jnp.asarray(m), chunk)
        assert float(got) == pytest.approx(want, rel=1e-5)
        assert float(correct) == ((logits.argmax(-1) == y) * m).sum()
