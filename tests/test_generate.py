import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.generate import _completion_text, generate, sample_logits, top_k_filter, top_p_filter
from jaxllm.models.llama import ModelConfig, forward, forward_cached, init_kv_cache, param_shapes

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  dtype="float32")
PROMPTS = [[5, 17, 3, 40, 22, 9, 11], [8], [30, 2, 61]]  # different lengths: left padding


@pytest.fixture(scope="module")
def params():
    # NumPy init: jax.random's threefry takes seconds per shape to compile on a busy CPU. A larger
    # std than training's (and non-unit norms) spreads the logits, so greedy argmaxes are not
    # near-ties that fp32 rounding differences between the cached and full paths could flip.
    rng = np.random.default_rng(0)
    is_shape = lambda x: isinstance(x, tuple)
    return jax.tree_util.tree_map_with_path(
        lambda path, shape: jnp.asarray((1.0 if path[-1].key.endswith("norm") else 0.0)
                                        + 0.3 * rng.standard_normal(shape), jnp.float32),
        param_shapes(CFG), is_leaf=is_shape)


_forward = jax.jit(forward, static_argnums=0)
WIDTH = 32


def full_logits(params, seq):
    """`forward` logits [len(seq), V], right-padded to a fixed width (causal attention: later
    pads cannot change earlier logits) so that it compiles once."""
    toks = np.zeros((1, WIDTH), np.int32)
    toks[0, :len(seq)] = seq
    # Slice in NumPy: an eager jnp slice would compile anew for every length.
    return np.asarray(_forward(CFG, params, jnp.asarray(toks)))[0, :len(seq)]


def reference_greedy(params, prompt, n):
    """Greedy decoding that recomputes the full forward over the growing sequence each step."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(full_logits(params, seq)[-1])))
    return seq[len(prompt):]


def test_greedy_cached_matches_full_recompute(params):
    n = 10
    got = generate(CFG, params, PROMPTS, max_new_tokens=n, temperature=0.0)
    want = [reference_greedy(params, p, n) for p in PROMPTS]
    assert got == want
    assert len({tuple(w) for w in want}) > 1  # the model is not degenerate


def test_prefill_logits_match_forward(params):
    P = max(map(len, PROMPTS)) + 2  # extra pad columns on every row
    toks = np.zeros((len(PROMPTS), P), np.int32)
    pos = np.zeros((len(PROMPTS), P), np.int32)
    valid = np.zeros((len(PROMPTS), P + 4), bool)
    for b, p in enumerate(PROMPTS):
        toks[b, P - len(p):] = p
        pos[b, P - len(p):] = np.arange(len(p))
        valid[b, P - len(p):] = True
    prefill = jax.jit(lambda t, p, v: forward_cached(CFG, params, t, p,
                                                     init_kv_cache(CFG, len(PROMPTS), P + 4), 0, v))
    logits, cache = prefill(jnp.asarray(toks), jnp.asarray(pos), jnp.asarray(valid))
    # Pad-slot queries see no valid key; they must stay finite or NaN values would leak via 0*NaN.
    assert np.isfinite(np.asarray(logits)).all() and np.isfinite(np.asarray(cache["v"])).all()
    for b, p in enumerate(PROMPTS):
        ref = full_logits(params, p)
        np.testing.assert_allclose(logits[b, P - len(p):], ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- filters vs NumPy


def np_top_k(x, k):
    if k <= 0 or k >= x.shape[-1]:
        return x
    kth = np.sort(x, axis=-1)[..., -k][..., None]
    return np.where(x >= kth, x, -np.inf)


def np_top_p(x, p):
    out = np.full_like(x, -np.inf)
    for r in range(x.shape[0]):
        order = np.argsort(-x[r], kind="stable")
        probs = np.exp(x[r][order] - x[r].max())
        probs /= probs.sum()
        m = 1
        while m < len(order) and probs[:m].sum() < p:  # smallest prefix with mass >= p
            m += 1
        m = len(order) if p >= 1 else m
        out[r, order[:m]] = x[r, order[:m]]
    return out


CRAFTED = np.array([
    [0.0, 0.0, 0.0, 0.0, -np.inf, -np.inf],  # exact quarters: ties and exact mass boundaries
    [3.0, 1.0, 1.0, 1.0, 0.5, -2.0],  # ties below the top
    [2.0, 2.0, 1.0, -1.0, -1.0, -5.0],  # tie at the top
], np.float32)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5, 6, 10])
def test_top_k_filter(k):
    x = np.concatenate([CRAFTED, np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)])
    np.testing.assert_array_equal(np.asarray(top_k_filter(jnp.asarray(x), k)), np_top_k(x, k))


@pytest.mark.parametrize("p", [0.0, 1e-6, 0.25, 0.5, 0.6, 0.75, 0.9, 0.999, 1.0])
def test_top_p_filter(p):
    x = np.concatenate([CRAFTED, np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32)])
    got = np.asarray(top_p_filter(jnp.asarray(x), p))
    np.testing.assert_array_equal(got, np_top_p(x, p))
    assert (np.isfinite(got).sum(-1) >= 1).all()


def test_top_p_exact_boundaries():
    q = jnp.asarray(CRAFTED[:1])
    n_kept = lambda p: int(np.isfinite(np.asarray(top_p_filter(q, p))).sum())
    # Quarters: mass 0.5 is reached by exactly 2 tokens, so 0.5 keeps 2 and 0.5+eps keeps 3.
    assert [n_kept(p) for p in (0.0, 0.25, 0.26, 0.5, 0.51, 1.0)] == [1, 1, 2, 2, 3, 4]
    # Tied tokens are taken in index order.
    np.testing.assert_array_equal(np.isfinite(np.asarray(top_p_filter(q, 0.5)))[0],
                                  [True, True, False, False, False, False])


# ----------------------------------------------------------------------------- sampling


def test_sampling_reproducible(params):
    kw = dict(max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9)
    a = generate(CFG, params, PROMPTS, rng=jax.random.key(7), **kw)
    b = generate(CFG, params, PROMPTS, rng=jax.random.key(7), **kw)
    c = generate(CFG, params, PROMPTS, rng=jax.random.key(8), **kw)
    assert a == b and a != c
    assert all(len(r) == 8 for r in a)


def test_sampling_frequencies():
    logits = jnp.asarray([1.0, 0.5, 0.0, -0.5, -1.0, 2.0], jnp.float32)
    settings = [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.5, 3, 1.0), (1.0, 0, 0.8), (2.0, 4, 0.7)]
    n = 20000
    keys = jax.random.split(jax.random.key(0), n)

    @jax.jit  # all settings in one compilation
    def draw(keys):
        return [jax.vmap(lambda k: sample_logits(logits, k, temperature=t, top_k=k_, top_p=p))(keys)
                for t, k_, p in settings]

    for (t, k, p), samples in zip(settings, draw(keys)):
        freq = np.bincount(np.asarray(samples), minlength=6) / n
        x = np_top_p(np_top_k(np.asarray(logits)[None] / t, k), p)[0]
        want = np.exp(x - x.max())
        want /= want.sum()
        np.testing.assert_allclose(freq, want, atol=0.015, err_msg=str((t, k, p)))  # ~4 sigma
        assert (freq[want == 0] == 0).all()


def test_stop_tokens_cut_output(params):
    full = generate(CFG, params, PROMPTS, max_new_tokens=10, temperature=0.0)
    stop = full[0][3]
    got = generate(CFG, params, PROMPTS, max_new_tokens=10, temperature=0.0, stop_tokens=(stop, 63))
    for f, g in zip(full, got):
        cut = next((j for j, t in enumerate(f) if t in (stop, 63)), len(f))
        assert g == f[:cut]  # the stop token is excluded
    assert len(got[0]) <= 3
    # Every row stopping at once ends the loop early without changing the result.
    first = [f[0] for f in full]
    assert generate(CFG, params, PROMPTS, max_new_tokens=10, temperature=0.0,
                    stop_tokens=first) == [[], [], []]


def test_edge_cases(params):
    assert generate(CFG, params, PROMPTS, max_new_tokens=0) == [[], [], []]
    with pytest.raises(ValueError):
        generate(CFG, params, [[1], []], max_new_tokens=2)


def test_generate_cli_on_a_trained_run_equals_library_call(trained_run):
    """`python -m jaxllm.generate --greedy` prints exactly what `generate` returns in-process."""
    import subprocess
    import sys

    from conftest import ROOT
    from jaxllm.checkpoint import load_run
    from jaxllm.data.tokenizer import load_tokenizer

    base, env, run_dir = trained_run
    proc = subprocess.run([sys.executable, "-m", "jaxllm.generate", "--checkpoint", str(run_dir),
                           "--prompt", "def ", "--prompt", "import heapq\n", "--greedy",
                           "--max-new-tokens", "12"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-1500:]
    cfg, params = load_run(str(run_dir))
    tok = load_tokenizer(cfg.data, cfg.model.vocab_size)
    prompts = ["def ", "import heapq\n"]
    ids = [[tok.bos_id] + tok.encode(p) for p in prompts]
    outs = generate(cfg.model, params, ids, max_new_tokens=12, temperature=0.0, stop_tokens=(tok.eos_id,))
    blocks = proc.stdout.split("-" * 40 + "\n")
    for prompt, block, p_ids, new in zip(prompts, blocks, ids, outs):
        assert block == prompt + _completion_text(tok, p_ids, new) + "\n"
    assert any(len(o) > 0 for o in outs)


def test_generate_cli_without_checkpoint_is_one_line_error(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run([sys.executable, "-m", "jaxllm.generate", "--checkpoint", str(tmp_path / "nope"),
                           "--prompt", "x"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "no config.yaml" in proc.stderr
