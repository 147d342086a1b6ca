"""The task interface in the shared step and loop: the registry and validation, the PPO-style
multi-update (epochs x mini-batches, each one optimizer update; accumulation inside a
mini-batch equals the unsplit one), and per-source eval sets of a mixture."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from jaxllm.config import Config, ConfigError, build, load_config
from jaxllm.parallel.mesh import make_mesh
from jaxllm.tasks import TASKS, RunContext, make_task
from jaxllm.tasks.pretrain import PretrainTask
from jaxllm.train import Trainer
from jaxllm.train.hooks import Evaluator
from tests.test_train import SEQ, _cfg

ONE_DEVICE = None


def _mesh():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def _identical_rows(rows: int, seed=0) -> dict:
    """A batch of `rows` copies of one packed row: any order and any split of it is the same."""
    rng = np.random.default_rng(seed)
    seq = (rng.integers(0, 100) + np.arange(SEQ + 1)) % 128
    one = {"tokens": seq[:-1], "targets": seq[1:], "positions": np.arange(SEQ), "segment_ids": np.ones(SEQ),
           "loss_mask": np.ones(SEQ)}
    return {k: np.repeat(v[None], rows, 0).astype(np.float32 if k == "loss_mask" else np.int32)
            for k, v in one.items()}


class _TwoByTwo(PretrainTask):
    update_epochs = 2
    mini_batches = 2


def test_registry_names_every_task_and_validation_reads_it():
    assert set(TASKS) == {"pretrain", "sft", "dpo", "reward", "rl", "rater", "edu"}
    with pytest.raises(ConfigError, match="task: 'ppo' is not one of pretrain, sft, dpo, reward, rl, rater, edu"):
        load_config("configs/tiny.yaml", ["task=ppo"])
    for name, cls in TASKS.items():
        assert isinstance(make_task(build(Config, {"task": name})), cls)


@pytest.mark.parametrize("accum", [1, 2])
def test_multi_update_is_epochs_times_minibatches_updates(accum):
    """2 epochs x 2 mini-batches of an 8-row batch = 4 plain updates on 4-row batches (rows
    identical, so the shuffle cannot matter); the schedule counts the 4 updates; one step."""
    cfg = _cfg(grad_accum_steps=accum)
    multi = Trainer(cfg, _mesh(), task=_TwoByTwo(cfg))
    plain_cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, total_steps=4 * 20))
    plain = Trainer(plain_cfg, _mesh())
    batch = _identical_rows(8)
    s_multi, m_multi = multi.train_step(multi.fresh_state(), multi.to_global(batch))
    s_plain, losses, lrs = plain.fresh_state(), [], []
    half = {k: v[:4] for k, v in batch.items()}
    for _ in range(4):
        s_plain, m = plain.train_step(s_plain, plain.to_global(half))
        losses.append(float(m["loss"]))
        lrs.append(float(m["lr"]))
    assert int(s_multi.step) == 1 and int(s_plain.step) == 4
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-7),
                 s_multi.params, s_plain.params)
    assert float(m_multi["loss"]) == pytest.approx(np.mean(losses), rel=1e-6)
    assert float(m_multi["lr"]) == pytest.approx(np.mean(lrs), rel=1e-6)
    assert float(m_multi["tokens"]) == pytest.approx(8 * SEQ)  # one pass over the batch


def test_minibatch_accumulation_equals_unsplit():
    """Inside a mini-batch, grad_accum_steps microbatches give the unsplit update."""
    rng = np.random.default_rng(3)
    batch = _identical_rows(8) | {"targets": rng.integers(0, 128, (8, SEQ)).astype(np.int32)}
    states = []
    for accum in (1, 4):
        cfg = _cfg(grad_accum_steps=accum)
        tr = Trainer(cfg, _mesh(), task=_TwoByTwo(cfg))
        states.append(tr.train_step(tr.fresh_state(), tr.to_global(batch))[0])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
                 states[0].params, states[1].params)


def test_mixture_sources_with_eval_files_get_eval_sets(tmp_path):
    from tests.test_mixture import TOK, _write_source

    rng = np.random.default_rng(0)
    for k, name in enumerate(("web", "code")):
        (tmp_path / name).mkdir()
        _write_source(tmp_path / name, k, 40, rng)
    (tmp_path / "held").mkdir()
    _write_source(tmp_path / "held", 4, 6, rng)
    raw = {"model": {"vocab_size": 128, "d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64,
                     "dtype": "float32"},
           "data": {"sources": [{"name": "web", "train": [str(tmp_path / "web")], "eval": [str(tmp_path / "held")]},
                                {"name": "code", "train": [str(tmp_path / "code")]}],
                    "stages": [{"weights": {"web": 1, "code": 1}}], "eval": [str(tmp_path / "web")],
                    "seq_len": 16, "tokenizer": "unused"},
           "trainer": {"batch_size": 4, "eval_batches": 1}}
    cfg = build(Config, raw)
    tr = Trainer(cfg, _mesh())

    class Tok(type(TOK)):
        vocab_size = 128

        def encode(self, text):  # the corpus's ids, folded into the tiny vocabulary
            return [3 + int(t) % 120 for t in text.split()]

    ctx = RunContext(str(tmp_path), Tok(), tr.to_global, lambda: None)
    sets = tr.task.eval_sets(ctx)
    assert set(sets) == {"", "web"}
    logged = []
    logger = type("L", (), {"log": lambda self, step, m: logged.append(m)})()
    summary = {}
    state = tr.fresh_state()
    out = Evaluator(sets, logger, summary)(tr, state, 0, initial=True)
    web = tr.evaluate(state, sets["web"])
    assert out["eval_loss/web"] == web["eval_loss"] and out["eval_ppl/web"] == web["eval_ppl"]
    assert out["eval_loss"] == tr.evaluate(state, sets[""])["eval_loss"] != web["eval_loss"]
    assert summary["initial_eval_loss"] == out["eval_loss"] and logged == [out]
    assert json.dumps(out)  # one JSON row
