"""LoRA in the shared train loop: only adapters train, the base stays put, checkpoints hold
adapters only, and `load_run` folds them into the rebuilt base."""

import dataclasses

import jax
import numpy as np

from jaxllm.checkpoint import Checkpointer
from jaxllm.config import dump_yaml
from jaxllm.models import forward
from jaxllm.models.lora import LoraConfig, merge_adapters
from jaxllm.parallel.mesh import make_mesh
from jaxllm.run import load_run
from jaxllm.train import Trainer
from tests.test_train import _batches, _cfg


def _lora_cfg(**lora):
    cfg = _cfg()
    return dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, lr=3e-2),
                               lora=LoraConfig(rank=4, alpha=8.0, targets=("wq", "wv", "w_up"), **lora))


def _train(cfg, steps, mesh=None):
    tr = Trainer(cfg, mesh or make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    state = tr.fresh_state()
    losses = []
    for b in _batches(steps):
        state, m = tr.train_step(state, tr.to_global(b))
        losses.append(float(m["loss"]))
    return tr, state, losses


def test_only_adapters_train_and_base_is_unchanged():
    cfg = _lora_cfg()
    tr, state, losses = _train(cfg, 16)
    assert set(state.params) == {"adapters"}
    assert set(state.params["adapters"]) == {"wq", "wv", "w_up"}
    # Adam state exists for the adapters only.
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
    n_adapters = sum(x.size for x in jax.tree.leaves(state.params))
    assert n_opt == 2 * n_adapters
    base0 = jax.device_get(tr.init_model(tr.keys.model))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen["base"]), base0)
    # A rank-4 adapter on a random base learns slowly, but it learns (4.87 -> ~4.55 here).
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.15
    # The effective params equal the explicitly merged model and differ from the base on targets only.
    merged = jax.device_get(tr.effective(state.params, state.frozen))
    ref = merge_adapters(cfg.lora, base0, jax.device_get(state.params["adapters"]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), merged, ref)
    assert not np.allclose(merged["layers"]["wq"], base0["layers"]["wq"])
    np.testing.assert_array_equal(merged["layers"]["wk"], base0["layers"]["wk"])


def test_lora_matches_on_a_sharded_mesh():
    cfg = _lora_cfg(dora=True)
    _, s1, l1 = _train(cfg, 4)
    _, s8, l8 = _train(cfg, 4, make_mesh(2, 2, 2, devices=jax.devices()[:8]))
    np.testing.assert_allclose(l8, l1, rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
                 s8.params, s1.params)


def test_checkpoint_holds_adapters_and_load_run_merges(tmp_path):
    cfg = dataclasses.replace(_lora_cfg(), trainer=dataclasses.replace(_cfg().trainer, run_dir=str(tmp_path)))
    tr, state, _ = _train(cfg, 3)
    dump_yaml(cfg, str(tmp_path / "config.yaml"))
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(3, state, {})
    ckpt.close()
    # Only the adapters are on disk (the base is a function of the config).
    restored_state, _ = Checkpointer(str(tmp_path)).restore(3, tr.abstract_state)
    assert set(restored_state.params) == {"adapters"}
    loaded_cfg, params = load_run(str(tmp_path))
    merged = jax.device_get(tr.effective(state.params, state.frozen))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), params, merged)
    tokens = _batches(1)[0]["tokens"][:2]
    np.testing.assert_allclose(forward(loaded_cfg.model, params, tokens), forward(cfg.model, merged, tokens),
                               rtol=1e-5, atol=1e-5)
    assert loaded_cfg.lora.enabled
