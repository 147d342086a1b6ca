import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.generate import completion_text, completions
from jaxllm.models import decode
from jaxllm.models.decode import sample_logits, top_k_filter, top_p_filter
from jaxllm.models.llama import ModelConfig, forward, param_shapes

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  dtype="float32")
PROMPTS = [[5, 17, 3, 40, 22, 9, 11], [8], [30, 2, 61]]  # different lengths: left padding


@pytest.fixture(scope="module")
def params():
    return jax.tree.map(jnp.asarray, numpy_params())


def numpy_params():
    # NumPy init: jax.random's threefry takes seconds per shape to compile on a busy CPU. A larger
    # std than training's (and non-unit norms) spreads the logits, so greedy argmaxes are not
    # near-ties that fp32 rounding differences between the cached and full paths could flip.
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map_with_path(
        lambda path, shape: ((1.0 if path[-1].key.endswith("norm") else 0.0)
                             + 0.3 * rng.standard_normal(shape)).astype(np.float32),
        param_shapes(CFG), is_leaf=lambda x: isinstance(x, tuple))


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
    got = completions(CFG, params, PROMPTS, max_new_tokens=n, temperature=0.0)
    want = [reference_greedy(params, p, n) for p in PROMPTS]
    assert got == want
    assert len({tuple(w) for w in want}) > 1  # the model is not degenerate


def test_prefill_logits_match_forward(params):
    P = max(map(len, PROMPTS)) + 2  # extra pad columns on every row
    toks = np.zeros((len(PROMPTS), P), np.int32)
    for b, p in enumerate(PROMPTS):
        toks[b, P - len(p):] = p
    lengths = jnp.asarray([len(p) for p in PROMPTS], jnp.int32)
    prefill = jax.jit(lambda t, n: decode.prefill(CFG, params, t, n, P + 4, all_positions=True))
    logits, cache = prefill(jnp.asarray(toks), lengths)
    # Pad-slot queries must stay finite or NaN values would leak via 0*NaN.
    assert np.isfinite(np.asarray(logits)).all() and np.isfinite(np.asarray(cache.v)).all()
    for b, p in enumerate(PROMPTS):
        ref = full_logits(params, p)
        np.testing.assert_allclose(logits[b, P - len(p):], ref, atol=1e-5, rtol=1e-5)
    assert int(cache.index) == P and cache.k.shape == (CFG.n_layers, len(PROMPTS), P + 4, 2, 8)


# ----------------------------------------------------------------------------- decode.generate arrays


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def recomputed_logps(params, prompt, new, temperature):
    """Log-probs of `new` after `prompt` from ONE full forward over prompt + new."""
    logits = full_logits(params, list(prompt) + list(new))[len(prompt) - 1:-1] / temperature
    return np_log_softmax(logits)[np.arange(len(new)), new]


def test_generate_greedy_tokens_and_logps_match_full_forward(params):
    n = 10
    tokens, lengths = decode.pad_prompts(PROMPTS)
    gen = decode.generate(CFG, params, tokens, lengths, max_new_tokens=n, temperature=0.0)
    assert gen.tokens.shape == gen.logps.shape == (3, n) and gen.tokens.dtype == jnp.int32
    np.testing.assert_array_equal(gen.lengths, [n] * 3)
    for b, p in enumerate(PROMPTS):
        new = np.asarray(gen.tokens[b]).tolist()
        assert new == reference_greedy(params, p, n)
        np.testing.assert_allclose(gen.logps[b], recomputed_logps(params, p, new, 1.0), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.3, 5, 0.8)])
def test_sampled_logps_are_the_unfiltered_tempered_log_softmax(params, temperature, top_k, top_p):
    """RL compares these with log-probs recomputed by a forward pass: log_softmax(logits / T)
    at the sampled token, before top-k / top-p filtering."""
    n = 12
    tokens, lengths = decode.pad_prompts(PROMPTS)
    gen = decode.generate(CFG, params, tokens, lengths, max_new_tokens=n, temperature=temperature,
                          top_k=top_k, top_p=top_p, rng=3)
    for b, p in enumerate(PROMPTS):
        new = np.asarray(gen.tokens[b])
        np.testing.assert_allclose(gen.logps[b], recomputed_logps(params, p, new, temperature),
                                   atol=2e-5, rtol=1e-5)
        if top_k:  # every sampled token survived the filter
            step_logits = full_logits(params, list(p) + new.tolist())[len(p) - 1:-1]
            assert ((step_logits > step_logits[np.arange(n), new][:, None]).sum(-1) < top_k).all()


def test_per_row_stop_pads_after_the_stop_token(params):
    n = 10
    tokens, lengths = decode.pad_prompts(PROMPTS, pad_id=0)
    full = decode.generate(CFG, params, tokens, lengths, max_new_tokens=n, temperature=0.0)
    full_toks = np.asarray(full.tokens)
    stops = [int(full_toks[0, 3]), int(full_toks[1, 5])]  # rows 0 and 1 stop early, at the latest
    gen = decode.generate(CFG, params, tokens, lengths, max_new_tokens=n, temperature=0.0,
                          stop_ids=stops, pad_id=0)
    toks, logps, lens = (np.asarray(x) for x in gen)
    for b in range(3):
        hits = np.flatnonzero(np.isin(full_toks[b], stops))
        want = int(hits[0]) + 1 if hits.size else n  # the stop token counts
        assert lens[b] == want
        np.testing.assert_array_equal(toks[b, :want], full_toks[b, :want])
        np.testing.assert_array_equal(toks[b, want:], 0)
        np.testing.assert_array_equal(logps[b, want:], 0.0)
        np.testing.assert_allclose(logps[b, :want], np.asarray(full.logps)[b, :want], atol=1e-6)
    assert lens[0] <= 4 and lens[1] <= 6 and len(set(lens.tolist())) == 3 and lens.max() == n


def test_bucket_lengths():
    assert [decode.bucket_length(n) for n in (1, 16, 17, 100, 128, 129, 200, 1000, 1025)] == [
        16, 16, 32, 112, 128, 160, 224, 1024, 1280]
    tokens, lengths = decode.pad_prompts(PROMPTS, pad_id=9)
    assert tokens.shape == (3, 16) and lengths.tolist() == [7, 1, 3]
    assert tokens[1].tolist() == [9] * 15 + [8]


@pytest.mark.parametrize("rows", [3, 4])  # 3 does not divide over data*fsdp = 4: padded rows
def test_generate_on_a_2x2x2_mesh_matches_one_device(params, rows):
    from jaxllm.models import param_axes
    from jaxllm.parallel.mesh import make_mesh, tree_shardings

    mesh = make_mesh(2, 2, 2, devices=jax.devices()[:8])
    sharded = jax.device_put(params, tree_shardings(mesh, param_axes(CFG), param_shapes(CFG)))
    prompts = (PROMPTS + [[1, 2, 3, 4, 5]])[:rows]
    tokens, lengths = decode.pad_prompts(prompts)
    for kw in (dict(temperature=0.0), dict(temperature=0.9, top_k=10, top_p=0.9, rng=5)):
        one = decode.generate(CFG, params, tokens, lengths, max_new_tokens=8, stop_ids=[7], **kw)
        got = decode.generate(CFG, sharded, tokens, lengths, max_new_tokens=8, stop_ids=[7], mesh=mesh, **kw)
        np.testing.assert_array_equal(got.tokens, one.tokens)
        np.testing.assert_array_equal(got.lengths, one.lengths)
        np.testing.assert_allclose(got.logps, one.logps, atol=1e-5, rtol=1e-5)
        assert got.tokens.sharding.mesh.shape == mesh.shape
        assert got.tokens.sharding.is_fully_replicated == (rows % 4 != 0)
    # The params' own mesh is the default.
    again = decode.generate(CFG, sharded, tokens, lengths, max_new_tokens=8, temperature=0.0, stop_ids=[7])
    assert again.tokens.sharding.mesh.shape == mesh.shape


def test_sample_text_with_sharded_params(params):
    """`sample_text` as the train loop calls it at the end of a run: params sharded, a mesh."""
    from types import SimpleNamespace

    from jaxllm.generate import sample_text
    from jaxllm.models import param_axes
    from jaxllm.parallel.mesh import make_mesh, tree_shardings

    cfg = SimpleNamespace(model=CFG, data=SimpleNamespace(add_bos=True))  # what it reads of a Config
    mesh = make_mesh(2, 2, 2, devices=jax.devices()[:8])
    sharded = jax.device_put(params, tree_shardings(mesh, param_axes(CFG), param_shapes(CFG)))
    got = sample_text(cfg, sharded, LetterTokenizer(), "abc", max_new_tokens=6, temperature=0.8, seed=1, mesh=mesh)
    assert got == sample_text(cfg, params, LetterTokenizer(), "abc", max_new_tokens=6, temperature=0.8, seed=1)
    assert isinstance(got, str) and len(got) <= 6


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
    a = completions(CFG, params, PROMPTS, rng=jax.random.key(7), **kw)
    b = completions(CFG, params, PROMPTS, rng=jax.random.key(7), **kw)
    c = completions(CFG, params, PROMPTS, rng=jax.random.key(8), **kw)
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
    full = completions(CFG, params, PROMPTS, max_new_tokens=10, temperature=0.0)
    stop = full[0][3]
    got = completions(CFG, params, PROMPTS, max_new_tokens=10, temperature=0.0, stop_tokens=(stop, 63))
    for f, g in zip(full, got):
        cut = next((j for j, t in enumerate(f) if t in (stop, 63)), len(f))
        assert g == f[:cut]  # the stop token is excluded
    assert len(got[0]) <= 3
    # Every row stopping at once ends the loop early without changing the result.
    first = [f[0] for f in full]
    assert completions(CFG, params, PROMPTS, max_new_tokens=10, temperature=0.0,
                       stop_tokens=first) == [[], [], []]


def test_edge_cases(params):
    assert completions(CFG, params, PROMPTS, max_new_tokens=0) == [[], [], []]
    with pytest.raises(ValueError):
        completions(CFG, params, [[1], []], max_new_tokens=2)


def test_generate_cli_on_a_trained_run_equals_library_call(trained_run):
    """`python -m jaxllm.generate --greedy` prints exactly what `generate` returns in-process."""
    import subprocess
    import sys

    from conftest import ROOT
    from jaxllm.run import load_run
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
    outs = completions(cfg.model, params, ids, max_new_tokens=12, temperature=0.0, stop_tokens=(tok.eos_id,))
    blocks = proc.stdout.split("-" * 40 + "\n")
    for prompt, block, p_ids, new in zip(prompts, blocks, ids, outs):
        assert block == prompt + completion_text(tok, p_ids, new) + "\n"
    assert any(len(o) > 0 for o in outs)


def test_generate_prompts_file_writes_n_completions_per_record(trained_run, tmp_path, capsys):
    """`--prompts P.jsonl --n N --out F`: each record keeps its fields and gets N replies to its
    chat prompt (rendered with the run's template); greedy replies equal the library's, sampled
    ones are reproducible from the seed."""
    from jaxllm import generate
    from jaxllm.data.preference_data import PromptCompletionEncoder
    from jaxllm.data.tokenizer import run_tokenizer
    from jaxllm.run import load_run

    base, env, run_dir = trained_run
    records = [{"id": "a", "messages": [{"role": "user", "content": "def f(x):"}]}, {"id": "b", "prompt": "import os"}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))

    def run(*flags):
        out = tmp_path / f"out{len(flags)}{flags[-1]}.jsonl"
        argv = ["--checkpoint", str(run_dir), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "6"]
        assert generate.main(argv + list(flags)) == 0
        return [json.loads(line) for line in out.read_text().splitlines()]

    greedy = run("--n", "2", "--greedy")
    cfg, params = load_run(str(run_dir))
    tok = run_tokenizer(cfg, str(run_dir))
    enc = PromptCompletionEncoder(tok, cfg.sft.template, seq_len=cfg.data.seq_len, add_bos=cfg.data.add_bos)
    msgs = [records[0]["messages"], [{"role": "user", "content": "import os"}]]
    ids = [enc.encode(m, "x")[0].tolist() for m in msgs]
    want = [generate.reply_text(tok, n) for n in completions(cfg.model, params, ids, max_new_tokens=6, temperature=0.0,
                                                               stop_tokens=(tok.eos_id,))]
    assert [r["id"] for r in greedy] == ["a", "b"]
    assert [r["completions"] for r in greedy] == [[w, w] for w in want]
    sampled = run("--n", "3", "--seed", "1")
    assert all(len(r["completions"]) == 3 for r in sampled) and sampled == run("--n", "3", "--seed", "1")


def test_generate_cli_without_checkpoint_is_one_line_error(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run([sys.executable, "-m", "jaxllm.generate", "--checkpoint", str(tmp_path / "nope"),
                           "--prompt", "x"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2  # an expected user error: one line, no traceback
    assert proc.stderr.strip().count("\n") == 0 and "no config.yaml" in proc.stderr


TWO_PROCESS_SCRIPT = '''
import json, os, sys
import json

import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[2], num_processes=2, process_id=int(sys.argv[1]))
import numpy as np
import test_generate as t
from jaxllm.models import decode, param_axes, param_shapes
from jaxllm.parallel.mesh import make_mesh, tree_shardings

mesh = make_mesh(2, 2, 2)  # 4 devices in each process
host = t.numpy_params()
params = jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]), host,
                      tree_shardings(mesh, param_axes(t.CFG), param_shapes(t.CFG)))
assert not params["embed"].is_fully_addressable
print(json.dumps(t.two_process_outputs(params, mesh)), flush=True)
'''


def two_process_outputs(params, mesh=None):
    from types import SimpleNamespace

    from jaxllm.generate import sample_text

    cfg = SimpleNamespace(model=CFG, data=SimpleNamespace(add_bos=True))
    text = sample_text(cfg, params, LetterTokenizer(), "abc", max_new_tokens=6, seed=1, mesh=mesh)
    greedy = completions(CFG, params, PROMPTS, max_new_tokens=8, temperature=0.0, stop_tokens=[7], mesh=mesh)
    gen = decode.generate(CFG, params, *decode.pad_prompts(PROMPTS + [[4, 5]]), max_new_tokens=8,
                          temperature=0.9, top_k=10, rng=5, mesh=mesh)
    tokens, logps = decode.host_values((gen.tokens, gen.logps))
    return {"text": text, "greedy": greedy, "tokens": tokens.tolist(), "logps": logps.tolist()}


class LetterTokenizer:  # token i is the letter chr(97 + (i - 3) % 26)
    bos_id, eos_id, pad_id = 1, 2, 0

    def encode(self, text):
        return [3 + (ord(c) - 97) % 26 for c in text]

    def decode(self, ids):
        return "".join(chr(97 + (i - 3) % 26) for i in ids if i > 2)


def test_sample_text_and_generate_on_a_two_process_mesh(tmp_path):
    """Params sharded over two processes (no process holds them whole): every process calls
    and gets what one device computes."""
    import json
    import os
    import socket
    import subprocess
    import sys

    from conftest import ROOT

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "two.py").write_text(TWO_PROCESS_SCRIPT)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": os.path.join(ROOT, "tests") + os.pathsep + ROOT}
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "two.py"), str(i), f"127.0.0.1:{port}"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    got = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    want = two_process_outputs(numpy_params())
    for g in got:
        assert (g["text"], g["greedy"], g["tokens"]) == (want["text"], want["greedy"], want["tokens"])
        np.testing.assert_allclose(g["logps"], want["logps"], atol=1e-5)
    assert want["text"] and any(want["greedy"])


def test_generate_cli_checks_the_attention_kernel_against_the_machine(trained_run):
    """A run trained with cudnn attention, decoded on CPU: one line naming --attention, exit 2;
    `--attention xla` decodes it."""
    import subprocess
    import sys

    from conftest import ROOT

    base, env, run_dir = trained_run
    cmd = [sys.executable, "-m", "jaxllm.generate", "--checkpoint", str(run_dir), "--prompt", "def ",
           "--max-new-tokens", "2", "--attention"]
    proc = subprocess.run(cmd + ["cudnn"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr[-1500:]
    assert "model.attention=cudnn needs an NVIDIA GPU" in proc.stderr and "--attention" in proc.stderr
    proc = subprocess.run(cmd + ["flash"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "'flash' is not one of xla, cudnn, pallas" in proc.stderr
    proc = subprocess.run(cmd + ["xla"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("def "), proc.stderr[-1500:]
