"""The train step: sharded equals single-device, accumulation equals the big batch, loss falls."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxllm.config import Config, build
from jaxllm.models import param_axes
from jaxllm.parallel.mesh import LOGICAL_AXIS_RULES, logical_to_spec, make_mesh
from jaxllm.train import Trainer

SEQ, BATCH = 32, 8


def _cfg(**trainer):
    return build(Config, {
        "model": {"vocab_size": 128, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                  "d_ff": 128, "dtype": "float32"},
        "data": {"seq_len": SEQ}, "schedule": {"warmup_steps": 2},
        "optimizer": {"lr": 3e-3},
        "trainer": {"batch_size": BATCH, "total_steps": 20, **trainer}})


def _batches(n, seed=0):
    """Packed rows of a learnable sequence (token t+1 follows t), two documents per row."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        start = rng.integers(0, 100, (BATCH, 1))
        seq = (start + np.arange(SEQ + 1)) % 128
        split = SEQ // 2
        seg = np.where(np.arange(SEQ) < split, 1, 2)[None].repeat(BATCH, 0)
        pos = np.where(np.arange(SEQ) < split, np.arange(SEQ), np.arange(SEQ) - split)[None].repeat(BATCH, 0)
        mask = np.ones((BATCH, SEQ), np.float32)
        mask[:, split - 1] = 0  # the last token of document 1 has no target inside it
        mask[:3, -5:] = 0  # some padding-like masked tail, uneven across rows
        out.append({"tokens": seq[:, :-1].astype(np.int32), "targets": seq[:, 1:].astype(np.int32),
                    "positions": pos.astype(np.int32), "segment_ids": seg.astype(np.int32), "loss_mask": mask})
    return out


def _run(cfg, mesh, batches):
    tr = Trainer(cfg, mesh)
    state = tr.fresh_state()
    losses = []
    for b in batches:
        state, m = tr.train_step(state, tr.to_global(b))
        losses.append(float(m["loss"]))
    return losses, state, tr


@pytest.fixture(scope="module")
def single_device_run():
    return _run(_cfg(), make_mesh(1, 1, 1, devices=jax.devices()[:1]), _batches(4))


def test_2x2x2_mesh_matches_one_device(single_device_run):
    assert jax.device_count() >= 8, "conftest sets 8 fake CPU devices"
    ref, ref_state, _ = single_device_run
    got, state, _ = _run(_cfg(), make_mesh(2, 2, 2, devices=jax.devices()[:8]), _batches(4))
    np.testing.assert_allclose(got, ref, rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
                 state.params, ref_state.params)


def test_param_and_optimizer_shardings_follow_rules():
    cfg = _cfg()
    mesh = make_mesh(2, 2, 2, devices=jax.devices()[:8])
    tr = Trainer(cfg, mesh)
    state = tr.fresh_state()
    axes = param_axes(cfg.model)
    flat_axes = jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0]
    for path, names in flat_axes:
        leaf = state.params
        for k in path:
            leaf = leaf[k.key]
        expected = logical_to_spec(names)
        assert leaf.sharding.spec == expected, (path, leaf.sharding.spec, expected)
        # Each device holds only its shard: params are never whole on one device when sharded.
        shard = leaf.addressable_shards[0].data.shape
        for dim, full, ax in zip(shard, leaf.shape, expected):
            n = 1 if ax is None else np.prod([mesh.shape[a] for a in ((ax,) if isinstance(ax, str) else ax)])
            assert dim == full // n
    assert LOGICAL_AXIS_RULES["mlp"] == "tensor" and state.params["layers"]["w_up"].sharding.spec == P(None, "fsdp", "tensor")
    adam = state.opt_state[1][0]
    assert adam.mu["layers"]["wq"].sharding.spec == state.params["layers"]["wq"].sharding.spec
    assert adam.nu["embed"].sharding.spec == state.params["embed"].sharding.spec


def test_gradient_accumulation_equals_big_batch(single_device_run):
    ref, ref_state, _ = single_device_run
    got, state, tr = _run(_cfg(grad_accum_steps=4), make_mesh(1, 1, 1, devices=jax.devices()[:1]), _batches(4))
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
                 state.params, ref_state.params)
    # Evaluation runs in the same microbatches (memory of one microbatch) and gives the whole
    # batch's metrics.
    single = Trainer(_cfg(), make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    whole, split = single.evaluate(state, _batches(2, seed=1)), tr.evaluate(state, _batches(2, seed=1))
    assert set(whole) == set(split) and "eval_loss" in whole
    for k in whole:
        np.testing.assert_allclose(split[k], whole[k], rtol=1e-5, err_msg=k)


def test_loss_falls_on_a_learnable_sequence():
    losses, state, tr = _run(_cfg(), make_mesh(1, 1, 1, devices=jax.devices()[:1]), _batches(20))
    assert losses[0] > 4.5  # ~ln(128) at init
    assert losses[-1] < 0.5 * losses[0]
    ev = tr.evaluate(state, _batches(2, seed=1))
    assert ev["eval_loss"] < 0.5 * losses[0]
