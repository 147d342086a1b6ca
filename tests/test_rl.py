"""task: rl end to end and its step: rollout log-probs equal the training forward's, the first
update has ratio 1, a killed run resumes exactly, a two-token bandit learns, microbatches equal
the unsplit mini-batch, Lopti's passes use the low then the high tokens, bad prompt records are
counted, and config mistakes are one-line errors."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import Config, ConfigError, build
from jaxllm.data import synthetic
from jaxllm.data.tokenizer import Tokenizer, train_sentencepiece
from jaxllm.parallel.mesh import make_mesh
from jaxllm.rl.advantages import group_advantages
from jaxllm.rl.lopti import lopti_masks
from jaxllm.rl.prompts import train_prompts
from jaxllm.rl.rewards import Response, Rewards
from jaxllm.train import Trainer, train

MODEL = {"vocab_size": 384, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128,
         "dtype": "float32", "max_seq_len": 128}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    synthetic.write(str(root / "data"), seed=0, n_train=200, n_eval=16)
    texts = [r["text"] for r in synthetic.read_jsonl(str(root / "data" / "pretrain.jsonl"))]
    return {"root": root, "tokenizer": train_sentencepiece(texts * 4, 384, str(root / "sp"))}


def _cfg(data, run_dir, steps=4, **rl):
    d = data["root"] / "data"
    raw = {"task": "rl", "model": MODEL,
           "data": {"train": [str(d / "rl_train.jsonl")], "eval": [str(d / "rl_eval.jsonl")],
                    "tokenizer": data["tokenizer"], "seq_len": 64},
           "sft": {"template": "tulu"},
           "rl": {"prompts_per_step": 4, "rollout_n": 4, "max_prompt_len": 32, "response_len": 6, **rl},
           "optimizer": {"lr": 1e-3, "weight_decay": 0.0},
           "schedule": {"name": "constant", "warmup_steps": 0},
           "trainer": {"total_steps": steps, "run_dir": str(run_dir), "eval_every_steps": steps, "eval_batches": 1,
                       "sample_tokens": 0, "seed": 3},
           "checkpoint": {"every_steps": 2, "keep": 3, "async_save": False},
           "logging": {"every_steps": 1, "progress_bar": False, "tensorboard": False},
           "mesh": {"data": 4, "tensor": 2}}  # the 8 test devices: rows over 4, heads over 2
    return build(Config, raw)


def _rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _steps(run_dir):
    return {r["step"]: r for r in _rows(run_dir) if "loss" in r}


def test_rollout_logps_match_the_training_forward_and_the_first_update_has_ratio_one(data, tmp_path):
    cfg = _cfg(data, tmp_path / "run", steps=2, kl_coef=0.05)
    summary = train(cfg)
    first = _steps(cfg.trainer.run_dir)[1]
    assert first["rollout/logp_gap_max"] < 1e-5  # decode's log-probs vs the recomputed old log-probs
    assert first["clipfrac"] == 0 and first["clipfrac_lower"] == 0 and abs(first["ppo_kl"]) < 1e-6
    assert first["rollout/kl_ref"] == 0  # the policy is the reference before the first update
    assert first["rollout/response_tokens"] == sum(1 for _ in range(16)) * first["response_length/mean"]
    assert {"eval_reward", "eval_accuracy", "eval_accuracy/exact"} <= set(summary["final_eval"])


def test_killed_rl_run_resumes_exactly(data, tmp_path):
    """Lopti, 2 PPO epochs x 2 mini-batches, KL loss: drop the last checkpoint and the rerun
    reproduces the rollouts (rewards, lengths) and the updates bit for bit."""
    cfg = _cfg(data, tmp_path / "run", steps=4, ppo_epochs=2, mini_batch_prompts=2, lopti_eta=0.5,
               adv_reweight_alpha=0.3, kl_coef=0.05, temperature=1.2)
    train(cfg)
    full = _steps(cfg.trainer.run_dir)
    shutil.rmtree(os.path.join(cfg.trainer.run_dir, "checkpoints", "4"))
    resumed = train(cfg)
    assert resumed["start_step"] == 2
    again = _steps(cfg.trainer.run_dir)
    keys = ("loss", "grad_norm", "reward/mean", "response_length/mean", "rollout/entropy", "clipfrac", "ppo_kl")
    for step in (3, 4):
        assert {k: again[step][k] for k in keys} == {k: full[step][k] for k in keys}, step
    assert full[4]["ppo_kl"] != 0  # later updates move away from the rollout policy


# ----------------------------------------------------------------------------- the step on hand-made batches


def _trainer(cfg, **rl):
    cfg = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, **rl))
    return Trainer(cfg, make_mesh(1, 1, 1, devices=jax.devices()[:1]))


def _batch(tr, state, seed=0, T=12):
    """Random prompt + response rows with old log-probs from the current policy."""
    rng = np.random.default_rng(seed)
    B = tr.cfg.rl.rows_per_step
    start = rng.integers(1, 4, (B, 1))
    resp_len = rng.integers(1, T - 5, B)
    idx = np.arange(T)[None]
    rows = {"tokens": rng.integers(3, 300, (B, T)).astype(np.int32), "targets": rng.integers(3, 300, (B, T)).astype(np.int32),
            "positions": np.maximum(idx - start, 0).astype(np.int32), "segment_ids": (idx >= start).astype(np.int32),
            "loss_mask": ((idx >= 5) & (idx < 5 + resp_len[:, None])).astype(np.float32)}
    old_logp, _ = jax.jit(tr.objective.token_stats)(state.params, rows)
    scores = rng.normal(size=B).astype(np.float32)
    groups = np.repeat(np.arange(tr.cfg.rl.prompts_per_step), tr.cfg.rl.rollout_n)
    adv = group_advantages(scores, groups, rows["loss_mask"], estimator="grpo")
    batch = rows | {"old_logp": np.asarray(old_logp), "ref_logp": np.asarray(old_logp), "advantages": np.asarray(adv)}
    eta = float(np.exp(np.median(np.asarray(old_logp)[rows["loss_mask"] > 0])))  # half the tokens each side
    low, high = lopti_masks(old_logp, rows["loss_mask"], eta=eta)
    return batch | {"loss_mask_low": np.asarray(low), "loss_mask_high": np.asarray(high)}


def test_two_token_bandit_probability_rises_every_step(data, tmp_path):
    """One prompt token, 8 responses of one token: 'a' rewarded 1, 'b' 0 (GRPO advantages)."""
    tr = _trainer(_cfg(data, tmp_path), prompts_per_step=1, rollout_n=8, ppo_epochs=1)
    a, b = 10, 11
    rows = {"tokens": np.full((8, 1), 1, np.int32), "targets": np.array([[a]] * 4 + [[b]] * 4, np.int32),
            "positions": np.zeros((8, 1), np.int32), "segment_ids": np.ones((8, 1), np.int32),
            "loss_mask": np.ones((8, 1), np.float32)}
    adv = np.asarray(group_advantages(np.array([1.0] * 4 + [0.0] * 4), np.zeros(8, np.int32), rows["loss_mask"],
                                      estimator="grpo"))
    state = tr.fresh_state()
    probs = []
    stats = jax.jit(tr.objective.token_stats)
    for _ in range(6):
        logp = np.asarray(stats(state.params, rows)[0])
        probs.append(float(np.exp(logp[0, 0])))
        batch = rows | {"old_logp": logp, "ref_logp": logp, "advantages": adv}
        state, _ = tr.train_step(state, tr.to_global(batch))
    assert all(later > earlier for earlier, later in zip(probs, probs[1:])), probs
    assert probs[-1] > 3 * probs[0]


def test_microbatches_equal_the_unsplit_minibatch(data, tmp_path):
    cfg = _cfg(data, tmp_path)
    states = []
    for accum in (1, 4):
        c = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, grad_accum_steps=accum))
        tr = _trainer(c, ppo_epochs=2, mini_batch_prompts=2, loss_agg="seq-mean-token-sum-norm", kl_coef=0.1)
        state = tr.fresh_state()
        states.append(tr.train_step(state, tr.to_global(_batch(tr, state)))[0])
    # Four Adam updates: a gradient entry near 0 differs in its last bits between the two sums.
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=1e-5),
                 states[0].params, states[1].params)


def test_lopti_updates_the_low_then_the_high_probability_tokens(data, tmp_path):
    cfg = _cfg(data, tmp_path)
    lopti = _trainer(cfg, ppo_epochs=1, lopti_eta=0.02)
    state = lopti.fresh_state()
    batch = _batch(lopti, state)
    low, high = batch["loss_mask_low"], batch["loss_mask_high"]
    assert low.sum() > 0 and high.sum() > 0 and np.array_equal(low + high, batch["loss_mask"])
    got, _ = lopti.train_step(state, lopti.to_global(batch))
    plain = _trainer(dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, total_steps=8)), ppo_epochs=1)

    def two_updates(masks):
        state = plain.fresh_state()
        for mask in masks:
            state, _ = plain.train_step(state, plain.to_global(batch | {"loss_mask": mask}))
        return jax.tree.leaves(jax.device_get(state.params))

    want, reverse = two_updates((low, high)), two_updates((high, low))
    # The multi-update shuffles the rows first (sums in another order) and Adam scales an entry's
    # rounding by 1 / sqrt(v): equal to 1e-5, while the other order differs by ~lr = 1e-3.
    for g, w, r in zip(jax.tree.leaves(jax.device_get(got.params)), want, reverse):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    assert max(float(np.max(np.abs(g - r))) for g, r in zip(jax.tree.leaves(jax.device_get(got.params)), reverse)) > 1e-4


# ----------------------------------------------------------------------------- data, rewards and config


def test_bad_prompt_records_are_counted_and_skipped(data, tmp_path):
    good = {"messages": [{"role": "user", "content": "What is 2 + 2?"}], "ground_truth": "4", "dataset": "exact"}
    records = [good, {"prompt": "Say hi", "dataset": "exact"},  # exact needs a ground truth
               {"prompt": "Say hi", "ground_truth": "hi", "dataset": "no_such_verifier"},
               {"messages": [{"role": "robot", "content": "?"}], "ground_truth": "1", "dataset": "exact"},
               "not json", good | {"ground_truth": "5"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    cfg = _cfg(data, tmp_path / "run", prompts_per_step=2)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=(str(path),)))
    tok = Tokenizer(data["tokenizer"])
    it = train_prompts(cfg, tok, Rewards(cfg.rl).verifier_for, process_index=0, process_count=1)
    batches = [next(it) for _ in range(3)]
    truths = sorted(json.loads(str(t)) for b in batches for t in b["ground_truth"])
    assert set(truths) == {"4", "5"} and len(truths) == 6
    assert it.source_skipped == {"malformed JSON": 1}
    assert sum(it.skipped.values()) >= 3 and any("exact" in r for r in it.skipped)
    assert any("no verifier" in r for r in it.skipped) and any("role" in r for r in it.skipped)


def test_rewards_combine_by_weight_with_the_non_stop_penalty(data, tmp_path):
    cfg = _cfg(data, tmp_path, rewards={"verifiable": 10.0, "format": 0.5}, format_pattern=r"^\d+$",
               non_stop_penalty=-10.0, verifiers={"gsm8k": "math"})
    rewards = Rewards(cfg.rl)
    assert rewards.verifier_for("gsm8k") == ("math", True)
    empty = np.zeros(0, np.int32)
    responses = [Response("42", True, "math", "42", empty, empty), Response("41", True, "math", "42", empty, empty),
                 Response("The answer is 42", False, "math", "#### 42", empty, empty)]
    totals, parts = rewards(responses)
    np.testing.assert_allclose(totals, [10.5, 0.5, 10.0 - 10.0])
    np.testing.assert_array_equal(parts["verifiable"], [1, 0, 1])


@pytest.mark.parametrize("rl, message", [
    ({"rollout_n": 1}, "rollout_n must be >= 2"),
    ({"rewards": {"bogus": 1.0}}, "rl.rewards: bogus not among verifiable"),
    ({"verifiers": {"gsm8k": "calculator"}}, "rl.verifiers: calculator not among"),
    ({"rewards": {"reward_model": 1.0}}, "set rl.reward_model"),
    ({"value_init": "runs/rm"}, "the critic is for estimator gae"),
    ({"mini_batch_prompts": 3}, "must divide prompts_per_step"),
])
def test_config_mistakes_are_one_line_errors(data, tmp_path, rl, message):
    from jaxllm.config import validate

    with pytest.raises(ConfigError, match=message):
        validate(_cfg(data, tmp_path, **rl))
