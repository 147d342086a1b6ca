"""Checkpoint merging: SMA/EMA/WMA against NumPy, sharding kept, mismatches named, and the CLI."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxllm.merge import Merger, merge_params, merge_weights, select_steps


def trees(n, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return [{"w": jnp.asarray(rng.normal(size=(4, 6)), dtype),
             "layers": [{"b": jnp.asarray(rng.normal(size=(6,)), dtype)}, {"b": jnp.asarray(rng.normal(size=(6,)), dtype)}],
             "s": jnp.asarray(rng.normal(), dtype)} for _ in range(n)]


def numpy_merge(ts, weights):
    leaves = [[np.asarray(x, np.float64) for x in jax.tree.leaves(t)] for t in ts]
    return [sum(w * l[j] for w, l in zip(weights, leaves)) for j in range(len(leaves[0]))]


def np_weights(method, n, alpha=None):
    if method == "sma":
        return np.full(n, 1 / n)
    if method == "wma":
        w = np.arange(1, n + 1, dtype=np.float64)
        return w / w.sum()
    # EMA closed form: theta_1 weighs (1-a)^(N-1); theta_i (i >= 2) weighs a (1-a)^(N-i).
    return np.array([(1 - alpha) ** (n - 1)] + [alpha * (1 - alpha) ** (n - i) for i in range(2, n + 1)])


@pytest.mark.parametrize("method,alpha,n", [("sma", None, 4), ("wma", None, 5), ("ema", 0.3, 5), ("ema", 1.0, 3),
                                            ("sma", None, 1)])
def test_merge_matches_numpy(method, alpha, n):
    ts = trees(n)
    out = merge_params(ts, method, alpha)
    w = np_weights(method, n, alpha)
    np.testing.assert_allclose(merge_weights(method, n, alpha), w, rtol=1e-12)
    assert abs(sum(w) - 1) < 1e-12
    assert jax.tree.structure(out) == jax.tree.structure(ts[0])
    for got, want in zip(jax.tree.leaves(out), numpy_merge(ts, w)):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_ema_fold_equals_recursion_and_generator_input():
    ts = trees(4, seed=1)
    m = [np.asarray(x, np.float64) for x in jax.tree.leaves(ts[0])]
    for t in ts[1:]:
        m = [0.25 * np.asarray(x, np.float64) + 0.75 * a for x, a in zip(jax.tree.leaves(t), m)]
    out = merge_params((t for t in ts), "ema", alpha=0.25)
    for got, want in zip(jax.tree.leaves(out), m):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_bfloat16_accumulates_in_fp32_and_keeps_dtype():
    # 64 copies of 1 + 2^-7 (exact in bf16): a bf16 running sum would round, fp32 gives it back.
    x = jnp.full((8,), 1 + 2 ** -7, jnp.bfloat16)
    out = merge_params([{"x": x}] * 64, "sma")["x"]
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.float32(1 + 2 ** -7))


def test_sharded_inputs_keep_their_sharding():
    mesh = Mesh(np.asarray(jax.devices()[:2]), ("fsdp",))
    specs = {"w": P("fsdp", None), "layers": [{"b": P("fsdp")}, {"b": P()}], "s": P()}
    shard = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
    ts = [jax.device_put(t, shard) for t in trees(3, seed=2)]
    for method, alpha in (("sma", None), ("ema", 0.5), ("wma", None)):
        out = merge_params(ts, method, alpha)
        jax.tree.map(lambda o, s: (o.sharding == s) or pytest.fail(f"{o.sharding} != {s}"), out, shard)
        for got, want in zip(jax.tree.leaves(out), numpy_merge(ts, np_weights(method, 3, alpha))):
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    assert ts[0]["w"].addressable_shards[0].data.shape == (2, 6)  # inputs untouched (not donated)


def test_mismatches_name_the_leaf():
    a, b = trees(2)
    bad_shape = {**b, "layers": [b["layers"][0], {"b": jnp.zeros(7)}]}
    with pytest.raises(ValueError, match=r"\['layers'\]\[1\]\['b'\] has shape \(7,\)"):
        merge_params([a, bad_shape], "sma")
    missing = {k: v for k, v in b.items() if k != "s"}
    with pytest.raises(ValueError, match=r"leaf \['s'\] missing"):
        merge_params([a, missing], "wma")
    extra = {**b, "t": jnp.zeros(())}
    with pytest.raises(ValueError, match=r"unexpected leaf \['t'\]"):
        merge_params([a, extra], "wma")


def test_bad_arguments_raise():
    a, b = trees(2)
    for method, alpha in (("ema", None), ("ema", 0.0), ("ema", 1.5), ("sma", 0.5), ("mean", None)):
        with pytest.raises(ValueError):
            merge_params([a, b], method, alpha)
    with pytest.raises(ValueError, match="no checkpoints"):
        merge_params([], "sma")
    assert select_steps([4, 8, 12, 16, 20, 24], 2, interval=8) == [16, 24]
    assert select_steps([24, 20], 2) == [20, 24]
    with pytest.raises(ValueError, match=r"available steps: \[20, 24\]"):
        select_steps([20, 24], 3)
    m = Merger("wma")
    m.add(a)
    m.add(b)
    assert m.weights() == pytest.approx([1 / 3, 2 / 3])


# ----------------------------------------------------------------------------- CLI on a real run


def run_merge(env, *args):
    from conftest import ROOT

    return subprocess.run([sys.executable, "-m", "jaxllm.merge", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_sma_of_last_two_equals_numpy_average(trained_run, tmp_path):
    from jaxllm.checkpoint import Checkpointer
    from jaxllm.run import abstract_params, load_run
    from jaxllm.config import load_config

    base, env, run_dir = trained_run
    out = tmp_path / "merged"
    proc = run_merge(env, "--method", "sma", "--checkpoints", str(run_dir), "--last", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert "step 20 x 0.5" in proc.stdout and "step 24 x 0.5" in proc.stdout, proc.stdout

    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    ckpt = Checkpointer(str(run_dir), async_save=False)
    assert ckpt.all_steps() == [20, 24]
    p20, p24 = (ckpt.restore_params(s, abstract_params(cfg.model)) for s in (20, 24))
    ckpt.close()
    merged_cfg, merged = load_run(str(out))
    assert merged_cfg.model == cfg.model
    assert jax.tree.structure(merged) == jax.tree.structure(p20)
    for m, a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(p20), jax.tree.leaves(p24)):
        want = (np.asarray(a, np.float64) + np.asarray(b, np.float64)) / 2
        np.testing.assert_allclose(np.asarray(m), want, rtol=1e-6, atol=1e-7)


def test_cli_asking_for_too_many_checkpoints_fails_in_one_line(trained_run, tmp_path):
    base, env, run_dir = trained_run
    out = tmp_path / "merged"
    proc = run_merge(env, "--method", "wma", "--checkpoints", str(run_dir), "--last", "3", "--out", str(out))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "available steps: [20, 24]" in lines[0], proc.stderr
    assert not out.exists()
