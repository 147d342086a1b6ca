"""Pallas flash attention against `reference_attention`, in interpret mode on CPU.

Interpret mode is slow to compile, so each case checks the output and all three gradients from one
compiled function, cases are picked to cover the features rather than their cross product, and
compilation skips XLA's costly optimisation passes on CPU.
"""

import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from jaxllm.kernels.attention import attention, reference_attention
from jaxllm.kernels.flash_attention import flash_attention
from jaxllm.kernels.splash_attention import splash_attention

_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compile(fn, *args):
    options = _FAST_COMPILE if jax.default_backend() == "cpu" else None
    return jax.jit(fn).lower(*args).compile(compiler_options=options)


def _inputs(B, T, S, N, K, H, dtype, seed=0):
    rng = np.random.default_rng(seed)  # numpy: jax.random would compile for every shape
    shapes = ((B, T, N, H), (B, S, K, H), (B, S, K, H), (B, T, N, H))  # q, k, v, dout
    return tuple(jnp.asarray(rng.standard_normal(s, np.float32), dtype) for s in shapes)


def _with_grads(attn):
    def fn(q, k, v, do):
        o, vjp = jax.vjp(attn, q, k, v)
        return (o, *vjp(do))
    return fn


def _segments(kind, B, T):
    if kind is None:
        return None
    if kind == "one":  # every row a single document
        return jnp.zeros((B, T), jnp.int32)
    if kind == "many":  # short documents, lengths 1..12, not aligned to blocks
        lengths = np.resize(np.arange(1, 13), T)
        return jnp.asarray(np.broadcast_to(np.repeat(np.arange(T), lengths)[:T], (B, T)), jnp.int32)
    if kind == "mixed":  # short documents then padding (id 0); a second row is one document
        short = np.where(np.arange(T) < T - 20, 1 + np.arange(T) // 7, 0)
        return jnp.asarray(np.stack([short, np.ones(T, int)] * B)[:B], jnp.int32)
    raise ValueError(kind)


def _assert_close(got, want, tol, name):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.all(np.isfinite(got)), f"{name}: non-finite values"
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.max(np.abs(want)), err_msg=name)


def _check(impl, B, T, S, N, K, H, causal, seg, dtype, tol, sm_scale=None, interpret=True, **kw):
    q, k, v, do = _inputs(B, T, S, N, K, H, dtype)
    segment_ids = _segments(seg, B, T)
    got = _compile(_with_grads(lambda q, k, v: impl(
        q, k, v, segment_ids=segment_ids, causal=causal, sm_scale=sm_scale, interpret=interpret,
        **kw)), q, k, v, do)(q, k, v, do)
    want = _compile(_with_grads(lambda q, k, v: reference_attention(
        q, k, v, segment_ids=segment_ids, causal=causal, sm_scale=sm_scale)), q, k, v, do)(
        q, k, v, do)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        _assert_close(g, w, tol, name)


# (B, T, S, N, K, H, causal, segments, block_q, block_k): GQA ratios 1, 2, 4, 8; lengths that are
# not multiples of the blocks; q and kv blocks of different sizes in both directions.
CASES = {
    "causal-mha": (1, 64, 64, 2, 2, 32, True, None, 16, 16),
    "causal-gqa2-len100": (1, 100, 100, 4, 2, 32, True, None, 32, 16),
    "full-gqa4-len100": (1, 100, 100, 4, 1, 16, False, None, 16, 32),
    "causal-gqa8-many-segments": (1, 128, 128, 8, 1, 16, True, "many", 32, 32),
    "full-gqa2-mixed-segments": (2, 100, 100, 4, 2, 32, False, "mixed", 32, 32),
    "causal-one-segment": (2, 64, 64, 2, 1, 16, True, "one", 16, 32),
    "causal-q-shorter-than-kv": (1, 48, 80, 4, 2, 16, True, None, 16, 32),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_fp32_matches_reference(case):
    B, T, S, N, K, H, causal, seg, bq, bk = case
    _check(flash_attention, B, T, S, N, K, H, causal, seg, jnp.float32, 1e-5, block_q=bq,
           block_k=bk)


def test_bf16_matches_reference():
    _check(flash_attention, 1, 96, 96, 4, 2, 64, True, "many", jnp.bfloat16, 3e-2, block_q=32,
           block_k=32)


def test_fp16_default_blocks_odd_head_dim():
    # Default tiles shrink to the sequence; head_dim 24 is padded to 32 inside.
    q, k, v, _ = _inputs(1, 40, 40, 2, 1, 24, jnp.float16)
    got = _compile(lambda q, k, v: flash_attention(q, k, v, sm_scale=0.5, interpret=True),
                   q, k, v)(q, k, v)
    assert got.dtype == jnp.float16
    _assert_close(got, reference_attention(q, k, v, sm_scale=0.5), 1e-2, "out")


def test_gqa_never_materialises_repeated_kv():
    # kv_len differs from q_len, so an array [B, kv_len, N, H] can only be a repeated k or v.
    B, T, S, N, K, H = 1, 32, 48, 4, 1, 16
    q, k, v, do = _inputs(B, T, S, N, K, H, jnp.float32)
    fn = _with_grads(lambda q, k, v: flash_attention(q, k, v, causal=False, interpret=True))
    text = str(jax.make_jaxpr(fn)(q, k, v, do))  # includes the nested kernel jaxprs
    assert f"f32[{B},{S},{K},{H}]" in text and f"f32[{B},{S},{N},{H}]" not in text


def test_splash_wrapper_matches_reference():
    # The TPU path, through splash's own interpreter: GQA, segments, length padded to 128s.
    _check(splash_attention, 1, 200, 200, 4, 2, 64, True, "mixed", jnp.float32, 1e-5)
    # No segment ids, not causal: the wrapper must mask the padded keys itself.
    _check(splash_attention, 1, 100, 150, 2, 1, 64, False, None, jnp.float32, 1e-5, sm_scale=0.3)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (Triton lowering)")
@pytest.mark.parametrize("H", [64, 128, 256])
def test_gpu_kernel_matches_reference(H):
    # The compiled kernels with their default tiles (run with JAX_PLATFORMS=cuda: conftest picks
    # CPU otherwise).
    _check(flash_attention, 2, 1000, 1000, 8, 2, H, True, "mixed", jnp.bfloat16, 3e-2,
           interpret=False)
    with jax.default_matmul_precision("highest"):  # else XLA's fp32 reference may use TF32
        _check(flash_attention, 1, 300, 300, 4, 4, H, False, None, jnp.float32, 1e-4,
               interpret=False)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU error")
def test_cpu_without_interpret_raises():
    q, k, v, _ = _inputs(1, 32, 32, 2, 1, 16, jnp.float32)
    with pytest.raises(RuntimeError, match="needs a GPU or TPU"):
        flash_attention(q, k, v)
    with pytest.raises(RuntimeError, match="interpret=True"):
        attention(q, k, v, impl="pallas")


fa = importlib.import_module("jaxllm.kernels.flash_attention")  # the module, not the function


@pytest.mark.parametrize("rows,cols", [(16, 16), (32, 16), (16, 64)])
def test_segment_block_ranges_cover_exactly_the_blocks_that_share_a_document(rows, cols):
    """Every (row block, column block) pair with a token pair in one segment lies inside the
    range; for packed rows (non-decreasing ids) nothing outside those pairs does either."""
    rng = np.random.default_rng(1)
    L = 128
    packed = np.cumsum(rng.random((3, L)) < 0.08, axis=1)  # documents of random lengths
    packed[2] = 0  # a row that is one document
    shuffled = rng.integers(0, 4, (2, L))  # ids that recur along the row: ranges only bound
    for seg, exact in ((packed, True), (shuffled, False)):
        lo, hi = (np.asarray(x) for x in fa._segment_block_ranges(jnp.asarray(seg, jnp.int32),
                                                                    rows, cols))
        for b in range(seg.shape[0]):
            for i in range(L // rows):
                r = seg[b, i * rows:(i + 1) * rows]
                needed = [j for j in range(L // cols)
                          if np.intersect1d(r, seg[b, j * cols:(j + 1) * cols]).size]
                assert lo[b, i] <= min(needed) and max(needed) < hi[b, i]
                if exact:
                    assert (lo[b, i], hi[b, i]) == (min(needed), max(needed) + 1)
    # A row of 8-token documents: a 16-row block meets only its own 16-column block.
    lo, hi = fa._segment_block_ranges(jnp.repeat(jnp.arange(16), 8)[None], 16, 16)
    np.testing.assert_array_equal(np.asarray(hi - lo), 1)


def _lower_for(platform: str, monkeypatch, fn, *shapes) -> str:
    """Lower `fn` for a platform this CPU machine lacks (jax.export), with `flash_attention`
    believing it runs there. The kernels' custom calls carry no serialisation guarantee, which
    is fine: the module is inspected, never stored."""
    monkeypatch.setattr(fa.jax, "default_backend", lambda: {"cuda": "gpu"}.get(platform, platform))
    checks = [export.DisabledSafetyCheck.custom_call(t)
              for t in ("__gpu$xla.gpu.triton", "tpu_custom_call")]
    return export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*shapes).mlir_module()


@pytest.mark.parametrize("H", [64, 128, 256])
@pytest.mark.parametrize("with_segments", [False, True])
def test_gpu_path_lowers_through_triton(H, with_segments, monkeypatch):
    """The GPU (non-interpret) path with its default tiles goes through Pallas' Triton lowering:
    bf16, GQA 4, a length no tile divides, forward and the two backward kernels."""
    B, T, N, K = 2, 1000, 8, 2
    q = jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((B, T), jnp.int32)

    def loss_and_grads(q, k, v, seg):
        f = lambda q, k, v: flash_attention(q, k, v, segment_ids=seg if with_segments else None)
        return jax.value_and_grad(lambda *a: f(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

    text = _lower_for("cuda", monkeypatch, loss_and_grads, q, kv, kv, seg)
    assert text.count("xla.gpu.triton") == 3
    assert re.findall(r'name = "(flash_attention_\w+)"', text) == [
        "flash_attention_fwd", "flash_attention_dkdv", "flash_attention_dq"]


def test_tuning_settings_reach_the_triton_launch_and_are_checked(monkeypatch):
    q = jax.ShapeDtypeStruct((1, 256, 4, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
    f = lambda q, k, v: flash_attention(q, k, v, block_q=32, block_k=64, num_warps=2, num_stages=3)
    text = _lower_for("cuda", monkeypatch, f, q, kv, kv)
    assert re.findall(r"(grid_x|num_warps|num_stages) = (\d+)", text) == [
        ("grid_x", "8"), ("num_stages", "3"), ("num_warps", "2")]  # 256 / block_q programs
    with pytest.raises(ValueError, match="num_warps must be a power of 2"):
        flash_attention(*(jnp.zeros(x.shape, x.dtype) for x in (q, kv, kv)), num_warps=3)
    monkeypatch.setattr(fa.jax, "default_backend", lambda: "tpu")
    with pytest.raises(ValueError, match="block_q, num_stages tune the GPU"):
        flash_attention(*(jnp.zeros(x.shape, x.dtype) for x in (q, kv, kv)), block_q=32, num_stages=3)


def test_benchmark_sweeps_every_pallas_setting():
    from benchmarks import attention as bench

    args = bench.parse_args(["--pallas-tiles", "128x64,64x32", "--pallas-warps", "4,8"])
    assert bench.pallas_variants(args) == [
        {"block_q": 128, "block_k": 64, "num_warps": 4}, {"block_q": 128, "block_k": 64, "num_warps": 8},
        {"block_q": 64, "block_k": 32, "num_warps": 4}, {"block_q": 64, "block_k": 32, "num_warps": 8}]
    assert bench.pallas_variants(bench.parse_args([])) == [{}]


def test_tpu_path_lowers_to_splash_kernels(monkeypatch):
    """On TPU `flash_attention` hands off to splash attention: its Mosaic TPU kernels lower
    (forward, and the dq and dk/dv kernels of the backward)."""
    q = jax.ShapeDtypeStruct((2, 1000, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 1000, 2, 128), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((2, 1000), jnp.int32)

    def loss_and_grads(q, k, v, seg):
        f = lambda q, k, v: flash_attention(q, k, v, segment_ids=seg)
        return jax.value_and_grad(lambda *a: f(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

    text = _lower_for("tpu", monkeypatch, loss_and_grads, q, kv, kv, seg)
    assert text.count("tpu_custom_call") == 3


def test_bad_arguments_raise():
    q, k, v, _ = _inputs(1, 32, 48, 3, 2, 16, jnp.float32)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        flash_attention(q, k, v, interpret=True, causal=False)
    q, k, v, _ = _inputs(1, 48, 32, 2, 1, 16, jnp.float32)
    with pytest.raises(ValueError, match="q_len <= kv_len"):
        flash_attention(q, k, v, interpret=True)
    with pytest.raises(ValueError, match="power of 2"):
        flash_attention(q, k, v, interpret=True, causal=False, block_q=24)


def test_pallas_path_under_a_multi_device_mesh_runs_per_shard():
    """`attention(impl="pallas")` inside `activation_sharding` (what the model does on a mesh):
    shard_map over batch (data, fsdp) and heads (tensor) gives the reference values and grads."""
    from jax.sharding import NamedSharding

    from jaxllm.parallel.mesh import activation_sharding, logical_to_spec, make_mesh

    mesh = make_mesh(2, 2, 2, devices=jax.devices()[:8])
    B, T, N, K, H = 4, 64, 4, 2, 16
    q, k, v, do = _inputs(B, T, T, N, K, H, jnp.float32)
    segment_ids = _segments("many", B, T)
    put = lambda x, names: jax.device_put(x, NamedSharding(mesh, logical_to_spec(names)))
    q, do = (put(x, ("batch", "length", "heads", "head_dim")) for x in (q, do))
    k, v = (put(x, ("batch", "length", "kv_heads", "head_dim")) for x in (k, v))
    segment_ids = put(segment_ids, ("batch", "length"))

    def sharded(q, k, v):
        with activation_sharding(mesh):
            return attention(q, k, v, impl="pallas", causal=True, segment_ids=segment_ids, interpret=True)

    got = _compile(_with_grads(sharded), q, k, v, do)(q, k, v, do)
    want = _compile(_with_grads(lambda q, k, v: reference_attention(
        q, k, v, segment_ids=segment_ids, causal=True)), q, k, v, do)(q, k, v, do)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        _assert_close(g, w, 2e-5, name)
    # The output stays sharded like q: no gather to one device around the kernel.
    assert got[0].sharding.spec == logical_to_spec(("batch", "length", "heads", "head_dim"))


def test_model_trains_the_same_with_pallas_and_xla_attention(monkeypatch):
    """`model.attention=pallas` (interpreted here) against `xla` in the Llama model: packed
    documents, GQA, five Adam steps; the losses agree step by step."""
    import functools

    import optax

    from jaxllm.models import ModelConfig, forward, init_params
    from jaxllm.models import llama

    monkeypatch.setattr(llama, "attention", functools.partial(attention, interpret=True))
    base = dict(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                dtype="float32")
    rng = np.random.default_rng(0)
    B, T = 2, 80
    tokens = jnp.asarray(rng.integers(0, 64, (B, T + 1)), jnp.int32)
    seg = np.cumsum(rng.random((B, T)) < 0.1, axis=1)
    starts = np.maximum.accumulate(np.where(np.diff(seg, prepend=-1, axis=1) != 0, np.arange(T), 0), axis=1)
    segments, positions = jnp.asarray(seg, jnp.int32), jnp.asarray(np.arange(T) - starts, jnp.int32)

    def losses(impl):
        cfg = ModelConfig(**base, attention=impl)
        params = init_params(cfg, jax.random.PRNGKey(0))
        opt = optax.adam(3e-3)

        def loss_fn(p):
            logits = forward(cfg, p, tokens[:, :-1], positions, segments)
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        def step(carry, _):
            p, s = carry
            loss, g = jax.value_and_grad(loss_fn)(p)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), loss

        run = lambda p: jax.lax.scan(step, (p, opt.init(p)), None, length=5)[1]
        return np.asarray(_compile(run, params)(params))

    xla, pallas = losses("xla"), losses("pallas")
    assert xla[-1] < xla[0] - 0.1  # it is training
    np.testing.assert_allclose(pallas, xla, rtol=2e-5)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (Triton lowering)")
def test_training_run_with_pallas_matches_xla_on_gpu(tmp_path):
    """`python -m jaxllm.train` with model.attention=pallas against xla: 30 steps of packed
    rows (segment ids), fp32 with full-precision matmuls, losses equal step by step."""
    import json

    from jaxllm.config import Config, build
    from jaxllm.data import synthetic
    from jaxllm.data.tokenizer import train_sentencepiece
    from jaxllm.train import train

    files = synthetic.write(str(tmp_path / "data"), seed=0, n_train=400, n_eval=32)
    texts = [r["text"] for r in synthetic.read_jsonl(files["pretrain.jsonl"])]
    sp = train_sentencepiece(texts * 4, 384, str(tmp_path / "sp"))
    losses = {}
    for impl in ("xla", "pallas"):
        run_dir = tmp_path / impl
        cfg = build(Config, {
            "model": {"vocab_size": 384, "d_model": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                      "d_ff": 256, "dtype": "float32", "attention": impl},
            "data": {"train": [files["pretrain.jsonl"]], "eval": [files["pretrain_eval.jsonl"]],
                     "tokenizer": sp, "seq_len": 256},
            "schedule": {"warmup_steps": 5},
            "trainer": {"total_steps": 30, "batch_size": 8, "run_dir": str(run_dir), "eval_every_steps": 30,
                        "eval_batches": 2, "sample_tokens": 0},
            "checkpoint": {"enabled": False},
            "logging": {"every_steps": 1, "progress_bar": False, "tensorboard": False},
        })
        with jax.default_matmul_precision("highest"):
            train(cfg)
        with open(run_dir / "metrics.jsonl") as f:
            losses[impl] = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    assert len(losses["xla"]) == 30 and losses["xla"][-1] < losses["xla"][0] - 1.0
    np.testing.assert_allclose(losses["pallas"], losses["xla"], rtol=1e-3)


# ----------------------------------------------------------------------------- the registry


def test_registry_messages_for_config_and_machine():
    from jaxllm.errors import ConfigError
    from jaxllm.kernels.attention import check_available
    from jaxllm.models import ModelConfig

    with pytest.raises(ValueError, match="model.attention: 'flash' is not one of xla, cudnn, pallas"):
        ModelConfig(attention="flash")
    for impl, platform, message in [
        ("cudnn", "cpu", "model.attention=cudnn needs an NVIDIA GPU, this machine has cpu devices; valid here: xla"),
        ("cudnn", "tpu", "model.attention=cudnn needs an NVIDIA GPU, this machine has tpu devices; valid here: "
                         "xla, pallas"),
        ("pallas", "cpu", "model.attention=pallas needs a GPU or TPU, this machine has cpu devices; valid here: xla"),
        ("flash", "gpu", "model.attention: 'flash' is not one of xla, cudnn, pallas"),
    ]:
        with pytest.raises(ConfigError) as e:
            check_available(impl, platform)
        assert str(e.value) == message
    for impl, platform in [("xla", "cpu"), ("xla", "tpu"), ("cudnn", "gpu"), ("pallas", "gpu"), ("pallas", "tpu")]:
        check_available(impl, platform)


def test_one_registry_entry_serves_config_check_training_and_decoding(monkeypatch):
    """A new entry is accepted by ModelConfig and check_available, and the model's training
    forward, prefill and decode steps dispatch to its functions on the target platform."""
    import types

    from jaxllm.errors import ConfigError
    from jaxllm.models import ModelConfig, decode, forward, init_params

    attn = importlib.import_module("jaxllm.kernels.attention")  # the module, not the function

    calls = []

    def fn(q, k, v, *, platform, **kw):
        calls.append(("fn", platform, q.shape[1]))
        return attn.REGISTRY["xla"].fn(q, k, v, platform=platform, **kw)

    def dec(q, k, v, **kw):
        calls.append(("decode", q.shape[1]))
        return attn.masked_xla(q, k, v, **kw)

    with pytest.raises(ValueError, match="'fake' is not one of"):
        ModelConfig(attention="fake")
    monkeypatch.setitem(attn.REGISTRY, "fake", attn.Implementation(("cpu", "tpu"), "a CPU or TPU", fn, dec))
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, dtype="float32")
    cfg, ref_cfg = ModelConfig(**base, attention="fake"), ModelConfig(**base)
    attn.check_available("fake", "tpu")
    with pytest.raises(ConfigError, match="needs a CPU or TPU, this machine has gpu devices; valid here: xla, cudnn, "
                                          "pallas$"):
        attn.check_available("fake", "gpu")

    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jnp.asarray([[3, 1, 4, 1, 5, 9]])
    np.testing.assert_array_equal(forward(cfg, params, tokens), forward(ref_cfg, params, tokens))
    assert calls and set(calls) == {("fn", "cpu", 6)}
    calls.clear()
    toks, lens = decode.pad_prompts([[3, 1, 4], [1]])
    got = decode.generate(cfg, params, toks, lens, max_new_tokens=3, temperature=0.0)
    want = decode.generate(ref_cfg, params, toks, lens, max_new_tokens=3, temperature=0.0)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert ("fn", "cpu", 16) in calls and ("decode", 1) in calls  # prefill, then steps

    # The platform is the target devices' (the active mesh's), not the host's backend.
    fake_mesh = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform="tpu")]), size=1)
    monkeypatch.setattr(attn, "active_mesh", lambda: fake_mesh)
    calls.clear()
    q, k, v, _ = _inputs(1, 8, 8, 2, 1, 16, jnp.float32)
    attn.attention(q, k, v, impl="fake")
    assert calls == [("fn", "tpu", 8)]
    with pytest.raises(RuntimeError, match="needs an NVIDIA GPU, but the target devices are 'tpu'"):
        attn.attention(q, k, v, impl="cudnn")


def test_decoding_with_pallas_prefills_with_the_kernel(monkeypatch):
    """model.attention=pallas: the prompt runs through the Pallas kernel (interpreted here) and
    the steps through the entry's named decode function; tokens and log-probs match xla."""
    import functools

    from jaxllm.models import ModelConfig, decode, init_params

    monkeypatch.setattr(decode, "attention", functools.partial(attention, interpret=True))
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, dtype="float32")
    params = init_params(ModelConfig(**base), jax.random.PRNGKey(1))
    toks, lens = decode.pad_prompts([[3, 1, 4, 1, 5, 9, 2, 6], [5, 3], [8, 9, 7, 9]])
    got, want = (decode.generate(ModelConfig(**base, attention=impl), params, toks, lens, max_new_tokens=5,
                                 temperature=1.0, rng=2) for impl in ("pallas", "xla"))
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logps, want.logps, atol=1e-5)
