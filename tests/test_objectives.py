"""Task objectives (sft, dpo, kto, reward) against float64 NumPy formulas on `forward` logits."""

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import Config, PreferenceConfig, SFTConfig, TrainerConfig
from jaxllm.models import ModelConfig, forward, hidden_states, param_shapes
from jaxllm.objectives import (DPOObjective, KTOObjective, LMObjective, RewardObjective, SFTObjective,
                               reward_scores, sequence_logps)
from jaxllm.objectives.preference import LOSSES, preference_loss
from jaxllm.objectives.sft import chunked_sft_stats
from jaxllm.tasks import make_task


def _objective(cfg):
    return make_task(cfg).objective


MODEL = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, dtype="float32")
CHUNK = 5  # does not divide the row lengths: the padded last chunk is exercised
RTOL = 2e-5


def config(task, chunk=CHUNK, **sections):
    return dataclasses.replace(Config(), task=task, model=MODEL, trainer=TrainerConfig(loss_chunk_size=chunk),
                               **sections)


# Objectives shared by tests, so that each compiles once per batch shape (see `run`).
SFT_MEAN = SFTObjective(config("sft", sft=SFTConfig(reduce_loss="mean", unlikelihood_weight=0.7)))
SFT_SUM = SFTObjective(config("sft", sft=SFTConfig(reduce_loss="sum")))
DPO_CHUNK = 16  # pair rows are 10 long: one chunk, fewer ops to compile (chunking: sequence_logps test)


def dpo(loss_type="sigmoid", **hp):
    return DPOObjective(config("dpo", chunk=DPO_CHUNK, preference=PreferenceConfig(loss_type=loss_type, **hp)))


SIGMOID = dpo(beta=0.3, label_smoothing=0.1)
REWARD = RewardObjective(config("reward"))


def np_params(cfg, seed):
    """init_params' layout with NumPy draws: no RNG programs to compile."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, shape: np.ones(shape, np.float32) if path[-1].key.endswith("norm")
        else (cfg.init_std * rng.standard_normal(shape)).astype(np.float32),
        param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))


@pytest.fixture(scope="module")
def params():
    return np_params(MODEL, 0)


@pytest.fixture(scope="module")
def ref_params(params):
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda x: (x + 0.02 * rng.standard_normal(x.shape)).astype(np.float32), params)


_forward = jax.jit(forward, static_argnums=0)
_hidden_states = jax.jit(hidden_states, static_argnums=0)


def np_logps(params, tokens, positions=None, segment_ids=None):
    """float64 log-softmax of `forward`'s logits [B, T, V]."""
    logits = np.asarray(_forward(MODEL, params, jnp.asarray(tokens), positions, segment_ids), np.float64)
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def target_logp(lp, targets):
    return np.take_along_axis(lp, np.asarray(targets)[..., None], -1)[..., 0]


def logsig(x):
    return -np.logaddexp(0.0, -x)


# ----------------------------------------------------------------------------- batches


def sft_batch(seed=0, B=4, T=12):
    """Packed rows: row 0 holds two documents, row 2 ends in padding."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 64, (B, T)).astype(np.int32)
    targets = rng.integers(0, 64, (B, T)).astype(np.int32)
    seg = np.ones((B, T), np.int32)
    pos = np.tile(np.arange(T, dtype=np.int32), (B, 1))
    seg[0, 7:], pos[0, 7:] = 2, np.arange(T - 7)
    seg[2, 9:], pos[2, 9:] = 0, 0
    real = (seg > 0).astype(np.float32)
    loss_mask = (rng.random((B, T)) < 0.6).astype(np.float32) * real
    ul_mask = (1 - loss_mask) * (rng.random((B, T)) < 0.7) * real
    return {"tokens": tokens, "targets": targets, "positions": pos, "segment_ids": seg,
            "loss_mask": loss_mask, "ul_mask": ul_mask.astype(np.float32)}


def rows(rng, B, T, prefix=""):
    """Unpacked rows of random lengths: segment 1 then padding; loss on a completion suffix."""
    n = rng.integers(5, T + 1, B)
    n[0] = T
    k = rng.integers(1, 4, B)  # prompt length
    t = np.arange(T)[None]
    seg = (t < n[:, None]).astype(np.int32)
    return {prefix + "tokens": rng.integers(0, 64, (B, T)).astype(np.int32) * seg,
            prefix + "targets": rng.integers(0, 64, (B, T)).astype(np.int32),
            prefix + "positions": (t * seg).astype(np.int32),
            prefix + "segment_ids": seg,
            prefix + "loss_mask": ((t >= k[:, None]) & (seg > 0)).astype(np.float32)}


def pair_batch(seed=0, pair_mask=(1, 1, 1, 0)):
    rng, B = np.random.default_rng(seed), len(pair_mask)
    # Rejected rows are shorter than chosen ones: the one-forward concatenation pads them.
    return {**rows(rng, B, 10, "chosen_"), **rows(rng, B, 8, "rejected_"),
            "index": np.arange(B, dtype=np.int32), "pair_mask": np.asarray(pair_mask, np.float32)}


def padded(batch, prefix, T=10):
    """A row set padded at the end to T: causal, so the real positions' outputs are unchanged, and
    every reference forward has one shape (one compilation)."""
    return [np.pad(batch[prefix + f], ((0, 0), (0, T - batch[prefix + f].shape[1])))
            for f in ("tokens", "targets", "positions", "segment_ids", "loss_mask")]


def np_seq_logps(params, batch, prefix):
    tokens, targets, positions, segment_ids, m = padded(batch, prefix)
    lp = np_logps(params, tokens, positions, segment_ids)
    return (target_logp(lp, targets) * m).sum(1), m.sum(1)


@functools.lru_cache(maxsize=None)
def _jit_loss(obj):
    # One compilation per objective (and batch shape): the machine is small and shared.
    return jax.jit(lambda p, b, r: obj.loss(p, b, ref_params=r))


def run(obj, params, batch, ref_params=None):
    return _jit_loss(obj)(params, batch, ref_params)


def finalize(obj, loss_sum, aux):
    return {k: float(v) for k, v in obj.finalize({"loss_sum": loss_sum, **aux}).items()}


def assert_halves_add_up(obj, params, batch, **kw):
    """Summed aux of two half batches finalizes to the whole batch's metrics."""
    whole = finalize(obj, *run(obj, params, batch, **kw))
    h = len(batch["pair_mask" if "pair_mask" in batch else "tokens"]) // 2
    sums = {}
    for half in ({k: v[:h] for k, v in batch.items()}, {k: v[h:] for k, v in batch.items()}):
        loss_sum, aux = run(obj, params, half, **kw)
        for k, v in {"loss_sum": loss_sum, **aux}.items():
            sums[k] = sums.get(k, 0.0) + np.asarray(v)
    split = {k: float(v) for k, v in obj.finalize(sums).items()}
    assert split.keys() == whole.keys()
    for k in whole:
        np.testing.assert_allclose(split[k], whole[k], rtol=1e-5, atol=1e-6, err_msg=k)


# ----------------------------------------------------------------------------- SFT


def test_sft_loss_equals_numpy_cross_entropy_mean_and_sum(params):
    batch = sft_batch()
    batch["loss_mask"][3] = 0  # a row with no assistant token: no weight under sum
    (mean_sum, mean_aux), (sum_sum, sum_aux) = jax.jit(
        lambda p, b: (SFT_MEAN.loss(p, b), SFT_SUM.loss(p, b)))(params, batch)
    lp = target_logp(np_logps(params, batch["tokens"], batch["positions"], batch["segment_ids"]), batch["targets"])
    ce = -(lp * batch["loss_mask"]).sum()
    ul = -(np.log1p(-np.exp(lp)) * batch["ul_mask"]).sum()  # unlikelihood: -log(1 - p)
    n, n_ul = batch["loss_mask"].sum(), batch["ul_mask"].sum()
    assert ul > 0 and n_ul > 5

    # sum: the token sum, weight 1 per row with loss tokens; no unlikelihood (weight 0), no ul stats.
    rows = int((batch["loss_mask"].sum(axis=1) > 0).sum())
    assert 1 < rows < len(batch["loss_mask"])  # the batch has a row without loss tokens
    np.testing.assert_allclose(sum_sum, ce, rtol=RTOL)
    assert float(sum_aux["weight"]) == rows and "ul_sum" not in sum_aux
    m = finalize(SFT_SUM, sum_sum, sum_aux)
    np.testing.assert_allclose(m["loss"], ce / rows, rtol=RTOL)
    np.testing.assert_allclose(m["nll"], ce / n, rtol=RTOL)  # the per-token mean, reported either way

    # mean, with unlikelihood weight 0.7: (ce + 0.7 ul) / loss tokens.
    np.testing.assert_allclose(mean_aux["ul_sum"], ul, rtol=RTOL)
    np.testing.assert_allclose(mean_sum, ce + 0.7 * ul, rtol=RTOL)
    assert float(mean_aux["weight"]) == n
    assert float(mean_aux["tokens"]) == (batch["segment_ids"] > 0).sum() == 45
    m = finalize(SFT_MEAN, mean_sum, mean_aux)
    np.testing.assert_allclose(m["loss"], (ce + 0.7 * ul) / n, rtol=RTOL)
    np.testing.assert_allclose(m["nll"], ce / n, rtol=RTOL)
    np.testing.assert_allclose(m["ul"], ul / n_ul, rtol=RTOL)
    logits = np.asarray(_forward(MODEL, params, batch["tokens"], batch["positions"], batch["segment_ids"]))
    assert m["accuracy"] == pytest.approx(((logits.argmax(-1) == batch["targets"]) * batch["loss_mask"]).sum() / n)

    assert_halves_add_up(SFT_MEAN, params, batch)


def test_unlikelihood_is_stable_near_p_one():
    """p(target) -> 1: -log(1 - p) matches float64 while fp32 resolves it, then clamps at
    -log(eps) instead of inf; the gradient stays finite."""
    D, V = 4, 8
    w = jnp.zeros((D, V)).at[0, 3].set(1.0)
    targets, zero, one = jnp.full((1, 1), 3), jnp.zeros((1, 1)), jnp.ones((1, 1))

    @jax.jit
    @jax.vmap
    def ul_and_grad(s):  # one position whose target logit leads the 7 others by s
        def ul(s):
            h = jnp.zeros((1, 1, D)).at[0, 0, 0].set(s)
            return chunked_sft_stats(h, w, targets, zero, one, 1)[2]
        return jax.value_and_grad(ul)(s)

    values, grads = ul_and_grad(jnp.array([0.5, 2.0, 8.0, 60.0]))
    want = np.log1p(np.exp([0.5, 2.0, 8.0]) / 7.0)  # -log(1 - e^s / (e^s + 7))
    np.testing.assert_allclose(values[:3], want, rtol=2e-3)
    assert 15.0 < float(values[3]) < 16.5
    assert np.all(np.isfinite(np.asarray(grads)))


def test_sequence_logps_equal_numpy(params):
    batch = pair_batch(3)
    logps, counts = jax.jit(sequence_logps, static_argnums=(0, 7))(
        MODEL, params, *(batch["chosen_" + f] for f in ("tokens", "targets", "positions", "segment_ids", "loss_mask")),
        CHUNK)
    want, n = np_seq_logps(params, batch, "chosen_")
    np.testing.assert_allclose(logps, want, rtol=RTOL)
    np.testing.assert_array_equal(counts, n)
    assert logps.shape == (4,) and logps.dtype == jnp.float32


# ----------------------------------------------------------------------------- DPO


def test_dpo_with_reference_equal_to_policy_is_log2(params):
    batch = pair_batch()
    loss_sum, aux = run(SIGMOID, params, batch, params)
    assert float(aux["weight"]) == 3.0  # the padding pair does not count
    m = finalize(SIGMOID, loss_sum, aux)
    assert m["loss"] == pytest.approx(math.log(2.0), rel=1e-6)  # label smoothing: still log 2 at h = 0
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert m[k] == 0.0, k
    pc, _ = np_seq_logps(params, batch, "chosen_")
    pr, _ = np_seq_logps(params, batch, "rejected_")
    np.testing.assert_allclose(m["logps/chosen"], pc[:3].mean(), rtol=RTOL)
    np.testing.assert_allclose(m["logps/rejected"], pr[:3].mean(), rtol=RTOL)


def test_dpo_gradient_matches_independent_reimplementation(params, ref_params):
    """jax.grad of the objective against forward-mode derivatives of a plain reimplementation
    (full logits, no chunking, no concatenation) along one random direction per parameter."""
    batch = pair_batch(1)
    beta, ls = 0.3, 0.1
    ref = {p: np_seq_logps(ref_params, batch, p)[0] for p in ("chosen_", "rejected_")}
    rows_ = {p: padded(batch, p) for p in ("chosen_", "rejected_")}

    def seq(p, prefix):
        tokens, targets, positions, segment_ids, m = rows_[prefix]
        lp = jnp.take_along_axis(jax.nn.log_softmax(forward(MODEL, p, tokens, positions, segment_ids)),
                                 targets[..., None], -1)[..., 0]
        return (lp * m).sum(1) - ref[prefix]

    def independent(p):
        h = seq(p, "chosen_") - seq(p, "rejected_")
        losses = -(1 - ls) * jax.nn.log_sigmoid(beta * h) - ls * jax.nn.log_sigmoid(-beta * h)
        return jnp.sum(losses * batch["pair_mask"])

    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(2)
    # Direction i is random on leaf i and zero elsewhere: every leaf's gradient gets checked.
    dirs = tree.unflatten([np.stack([rng.standard_normal(x.shape).astype(np.float32) * (i == j)
                                     for j in range(len(leaves))]) for i, x in enumerate(leaves)])

    @jax.jit
    def both(p, r, d):
        loss, grad = jax.value_and_grad(lambda p: SIGMOID.loss(p, batch, ref_params=r)[0])(p)
        l_ind, dl_ind = jax.vmap(lambda v: jax.jvp(independent, (p,), (v,)))(d)
        dl_obj = jax.vmap(lambda v: sum(jnp.vdot(g, x) for g, x in zip(jax.tree.leaves(grad), jax.tree.leaves(v))))(d)
        return loss, l_ind[0], dl_obj, dl_ind

    loss, l_ind, dl_obj, dl_ind = both(params, ref_params, dirs)
    np.testing.assert_allclose(loss, l_ind, rtol=1e-5)
    assert np.all(np.abs(dl_ind) > 1e-4)
    np.testing.assert_allclose(dl_obj, dl_ind, rtol=1e-3, atol=1e-6)


def test_dpo_cached_reference_equals_live(params, ref_params):
    batch = pair_batch(2)
    obj = dpo("ipo")
    fields, live, cached = jax.jit(lambda p, r, b: (
        obj.reference_fields(r, b), obj.loss(p, b, ref_params=r),
        obj.loss(p, {**b, **obj.reference_fields(r, b)})))(params, ref_params, batch)
    assert set(fields) == {"ref_chosen_logps", "ref_rejected_logps"}
    np.testing.assert_allclose(fields["ref_chosen_logps"], np_seq_logps(ref_params, batch, "chosen_")[0], rtol=RTOL)
    np.testing.assert_allclose(fields["ref_rejected_logps"], np_seq_logps(ref_params, batch, "rejected_")[0], rtol=RTOL)
    for k, v in {"loss_sum": live[0], **live[1]}.items():
        np.testing.assert_allclose({"loss_sum": cached[0], **cached[1]}[k], v, rtol=1e-6, atol=1e-7, err_msg=k)


def test_every_pairwise_loss_equals_preference_loss_on_numpy_logps(params, ref_params):
    batch = pair_batch(4)
    pc, lc = np_seq_logps(params, batch, "chosen_")
    pr, lr = np_seq_logps(params, batch, "rejected_")
    rc, rr = np_seq_logps(ref_params, batch, "chosen_")[0], np_seq_logps(ref_params, batch, "rejected_")[0]
    cached = {**batch, "ref_chosen_logps": rc.astype(np.float32), "ref_rejected_logps": rr.astype(np.float32)}
    objs = {lt: dpo(lt) for lt in LOSSES}
    for lt, obj in objs.items():
        assert obj.needs_reference == LOSSES[lt][1]
        if obj.needs_reference:
            with pytest.raises(ValueError, match="needs reference log-probs"):
                obj.loss(params, batch)  # raised before any forward pass
        else:
            assert obj.reference_fields(params, batch) == {}
    out = jax.jit(lambda p, b: {lt: o.loss(p, b) for lt, o in objs.items()})(params, cached)  # one compilation
    mask = batch["pair_mask"]
    for lt, (loss_sum, aux) in out.items():
        ref = (rc, rr) if LOSSES[lt][1] else (None, None)
        hp = {k: getattr(PreferenceConfig(), k) for k in LOSSES[lt][0]}
        losses, metrics = preference_loss(lt, pc, pr, *ref, lc, lr, **hp)
        np.testing.assert_allclose(loss_sum, (np.asarray(losses) * mask).sum(), rtol=1e-4, atol=1e-6, err_msg=lt)
        np.testing.assert_allclose(aux["margin"], (np.asarray(metrics["margin"]) * mask).sum(), rtol=1e-4, atol=1e-5,
                                   err_msg=lt)
        names = set(finalize(objs[lt], loss_sum, aux))
        assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"} <= names
        assert ("nll_loss" in names) == (lt in ("cpo", "orpo", "rrhf", "slic"))


def test_dpo_metrics_of_half_batches_add_up(params, ref_params):
    assert_halves_add_up(SIGMOID, params, pair_batch(5), ref_params=ref_params)


def test_bad_preference_settings_raise():
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo(beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        dpo(label_smoothing=0.7)
    with pytest.raises(ValueError, match="not a pairwise loss"):
        DPOObjective(config("dpo", preference=PreferenceConfig(loss_type="kto")))


# ----------------------------------------------------------------------------- KTO


def kto_batch(seed=0):
    rng = np.random.default_rng(seed)
    return {**rows(rng, 4, 10), **rows(rng, 4, 10, "kl_"), "label": np.array([1, 0, 1, 0], np.float32),
            "index": np.arange(4, dtype=np.int32), "pair_mask": np.array([1, 1, 1, 0], np.float32)}


def test_kto_equals_numpy(params, ref_params):
    # Swapped so that the KL estimate is positive here (it is clamped at 0): it matters.
    params, ref_params = ref_params, params
    batch = kto_batch()
    beta, dw, uw = 0.2, 1.5, 0.8
    obj = _objective(config("dpo", chunk=DPO_CHUNK, preference=PreferenceConfig(
        loss_type="kto", beta=beta, desirable_weight=dw, undesirable_weight=uw)))
    assert isinstance(obj, KTOObjective) and obj.needs_reference
    with pytest.raises(ValueError, match="needs reference log-probs"):
        obj.loss(params, batch)
    fields, live, cached = jax.jit(lambda p, r, b: (
        obj.reference_fields(r, b), obj.loss(p, b, ref_params=r),
        obj.loss(p, {**b, **obj.reference_fields(r, b)})))(params, ref_params, batch)
    np.testing.assert_allclose(cached[0], live[0], rtol=1e-6)

    p, _ = np_seq_logps(params, batch, "")
    r, _ = np_seq_logps(ref_params, batch, "")
    pkl, _ = np_seq_logps(params, batch, "kl_")
    rkl, _ = np_seq_logps(ref_params, batch, "kl_")
    np.testing.assert_allclose(fields["ref_logps"], r, rtol=RTOL)
    np.testing.assert_allclose(fields["ref_kl_logps"], rkl, rtol=RTOL)
    valid = batch["pair_mask"] > 0
    kl = max((pkl - rkl)[valid].mean(), 0.0)  # padding rows do not count
    assert kl > 0
    sig = lambda x: 1 / (1 + np.exp(-x))
    d = batch["label"] > 0
    losses = np.where(d, dw * (1 - sig(beta * (p - r - kl))), uw * (1 - sig(beta * (kl - (p - r)))))
    loss_sum, aux = live
    np.testing.assert_allclose(loss_sum, losses[valid].sum(), rtol=1e-5)
    assert float(aux["weight"]) == 3.0
    m = finalize(obj, loss_sum, aux)
    np.testing.assert_allclose(m["kl"], kl, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m["loss"], losses[valid].mean(), rtol=1e-5)
    np.testing.assert_allclose(m["rewards/chosen"], beta * (p - r)[valid & d].mean(), rtol=1e-4)
    np.testing.assert_allclose(m["rewards/rejected"], beta * (p - r)[valid & ~d].mean(), rtol=1e-4)
    np.testing.assert_allclose(m["logps/rejected"], p[valid & ~d].mean(), rtol=1e-5)


# ----------------------------------------------------------------------------- reward


@pytest.fixture(scope="module")
def reward_params(params):
    rng = np.random.default_rng(7)
    return {**params, "reward_head": {"w": rng.standard_normal(32).astype(np.float32), "b": np.float32(0.3)}}


def np_rewards(p, batch, prefix):
    tokens, _, positions, segment_ids, _ = padded(batch, prefix)
    h = np.asarray(_hidden_states(MODEL, p, tokens, positions, segment_ids), np.float64)
    last = segment_ids.sum(1) - 1  # rows are one segment then padding
    w, b = (np.asarray(p["reward_head"][k], np.float64) for k in ("w", "b"))
    return h[np.arange(len(last)), last] @ w + b


def test_reward_bradley_terry_equals_numpy_with_and_without_margin(reward_params):
    batch = pair_batch(6)
    margin = np.array([0.5, 2.0, -1.0, 3.0], np.float32)
    plain, with_margin = jax.jit(lambda p, b, mg: (REWARD.loss(p, b), REWARD.loss(p, {**b, "margin": mg})))(
        reward_params, batch, margin)
    rc, rr = np_rewards(reward_params, batch, "chosen_"), np_rewards(reward_params, batch, "rejected_")
    valid = batch["pair_mask"] > 0
    for (loss_sum, aux), mg in ((plain, 0.0), (with_margin, margin)):
        np.testing.assert_allclose(loss_sum, -logsig(rc - rr - mg)[valid].sum(), rtol=1e-5)
        m = finalize(REWARD, loss_sum, aux)
        assert m["accuracy"] == pytest.approx((rc > rr)[valid].mean())
        np.testing.assert_allclose(m["rewards/chosen"], rc[valid].mean(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(m["rewards/rejected"], rr[valid].mean(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(m["rewards/margins"], (rc - rr)[valid].mean(), rtol=1e-5, atol=1e-6)
    assert 0 < finalize(REWARD, *plain)["accuracy"] < 1
    assert float(with_margin[0]) != pytest.approx(float(plain[0]))
    assert_halves_add_up(REWARD, reward_params, batch)


def test_reward_head_reads_last_real_token(reward_params):
    batch = pair_batch(7)
    cols = ("chosen_tokens", "chosen_positions", "chosen_segment_ids")
    score = lambda b: np.asarray(jax.jit(reward_scores, static_argnums=0)(MODEL, reward_params, *(b[c] for c in cols)))
    base = score(batch)
    np.testing.assert_allclose(base, np_rewards(reward_params, batch, "chosen_"), rtol=1e-5, atol=1e-5)
    seg = batch["chosen_segment_ids"]
    assert (seg[1:] == 0).any()  # some rows end in padding
    changed = dict(batch, chosen_tokens=np.where(seg > 0, batch["chosen_tokens"], 63 - batch["chosen_tokens"]))
    np.testing.assert_array_equal(score(changed), base)  # padding after the last real token is not read
    last = seg.sum(1) - 1
    tok = batch["chosen_tokens"].copy()
    tok[np.arange(4), last] = (tok[np.arange(4), last] + 1) % 64
    assert np.all(score(dict(batch, chosen_tokens=tok)) != base)  # the last real token is


def test_reward_head_init_axes_and_untrained_loss(params):
    extra = REWARD.extra_params(MODEL, jax.random.PRNGKey(0))
    assert jax.tree.map(jnp.shape, extra) == {"reward_head": {"w": (32,), "b": ()}}
    assert REWARD.extra_param_axes(MODEL) == {"reward_head": {"w": ("embed",), "b": ()}}
    loss_sum, aux = run(REWARD, {**params, **extra}, pair_batch(8))  # same shapes: no new compilation
    assert finalize(REWARD, loss_sum, aux)["loss"] == pytest.approx(math.log(2.0))


def test_tasks_pick_objectives():
    assert isinstance(_objective(config("pretrain")), LMObjective)
    assert isinstance(_objective(config("sft")), SFTObjective)
    assert isinstance(_objective(config("dpo")), DPOObjective)
    assert isinstance(_objective(config("reward")), RewardObjective)
    assert _objective(config("dpo", preference=PreferenceConfig(loss_type="simpo"))).needs_reference is False
    for task in ("pretrain", "sft", "dpo"):
        assert _objective(config(task)).extra_params(MODEL, jax.random.PRNGKey(0)) == {}


# ----------------------------------------------------------------------------- scoring CLI


SENTENCES = ["You are terse.", "Hi there", "Hello! How can I help you today?", "Add 2 and 3.", "The answer is 5.",
             "Write a short poem about the sea.", "def add(a, b): return a + b"] * 5


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    from jaxllm.run import save_params
    from jaxllm.config import DataConfig
    from jaxllm.data.tokenizer import train_sentencepiece

    base = tmp_path_factory.mktemp("score")
    sp = train_sentencepiece(SENTENCES, 300, str(base / "tok"))
    model = dataclasses.replace(MODEL, vocab_size=320)
    decoder = np_params(model, 3)
    p = {**decoder, "reward_head": {"w": np.random.default_rng(4).standard_normal(32).astype(np.float32),
                                    "b": np.float32(0.25)}}
    cfg = dataclasses.replace(Config(), task="reward", data=DataConfig(tokenizer=sp, seq_len=96))
    save_params(model, p, str(base / "rm"), cfg)
    save_params(model, decoder, str(base / "sft"), dataclasses.replace(cfg, task="sft"))
    return base, model, p


def test_score_cli_matches_reward_scores(reward_run, tmp_path, capsys):
    """Records become the rows training builds (the rendered conversation up to the reply's end
    marker; tokens = ids[:-1]); the head reads the last real token; output keeps the records."""
    from jaxllm import score
    from jaxllm.data.chat import load_template, tokenize_conversation
    from jaxllm.data.tokenizer import Tokenizer

    base, model, p = reward_run
    msgs = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "The answer is 5."}]
    long_reply = "Hello! How can I help you today? " * 6
    records = [{"prompt": "Add 2 and 3.", "completion": "The answer is 5."},
               {"messages": msgs},
               {"prompt": msgs[:1], "completion": [{"role": "assistant", "content": "5"}], "id": 7},
               {"prompt": "Hi there", "completion": long_reply}]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in records))
    # Batches of 3: a full one, then one with two filler rows.
    assert score.main(["--checkpoint", str(base / "rm"), "--input", str(inp), "--batch-size", "3"]) == 0
    captured = capsys.readouterr()
    out = [json.loads(line) for line in captured.out.splitlines()]
    assert [{k: v for k, v in o.items() if k != "score"} for o in out] == records
    assert out[0]["score"] == out[1]["score"]  # the same conversation
    assert "1 of 4 records were cut to data.seq_len + 1 (97) tokens" in captured.err

    tok = Tokenizer(str(base / "tok.model"))
    convs = [msgs, msgs, msgs[:1] + [{"role": "assistant", "content": "5"}],
             [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": long_reply}]]
    rows = []
    for conv in convs:
        ids, mask = tokenize_conversation(conv, tok, load_template("chatml"), max_len=1000, add_bos=True)
        ids = ids[:np.flatnonzero(mask)[-1] + 1][:97]  # up to the reply's end marker, cut to seq_len + 1
        rows.append(ids[:-1])  # inputs; the last id is only a target
    assert len(rows[3]) == 96 and len(rows[0]) < 96
    seg = np.array([[1] * len(r) + [0] * (96 - len(r)) for r in rows], np.int32)
    tokens = np.array([list(r) + [0] * (96 - len(r)) for r in rows], np.int32)
    want = jax.jit(reward_scores, static_argnums=0)(model, p, tokens, np.cumsum(seg, 1) * seg - seg, seg)
    np.testing.assert_allclose([o["score"] for o in out], want, rtol=1e-5, atol=1e-5)

    out_file = tmp_path / "out.jsonl"
    assert score.main(["--checkpoint", str(base / "rm"), "--input", str(inp), "--output", str(out_file),
                       "--batch-size", "3"]) == 0
    assert [json.loads(line)["score"] for line in out_file.read_text().splitlines()] == [o["score"] for o in out]


def test_score_cli_errors_are_one_line(reward_run, tmp_path, capsys):
    from jaxllm import score

    base, _, _ = reward_run
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt": "Hi", "completion": "Hello"}) + "\n")
    assert score.main(["--checkpoint", str(base / "sft"), "--input", str(inp)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a reward model" in err
    inp.write_text(json.dumps({"prompt": "Hi"}) + "\n")
    assert score.main(["--checkpoint", str(base / "rm"), "--input", str(inp)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{inp}:1: needs prompt and completion" in err
    inp.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    assert score.main(["--checkpoint", str(base / "rm"), "--input", str(inp)]) == 2
    assert "must end with an assistant message" in capsys.readouterr().err


def test_score_pairs_picks_the_best_and_worst_reply(reward_run, tmp_path, capsys):
    """`--pairs`: each record's completions scored as the plain scoring CLI scores them; the
    highest and lowest become chosen / rejected; a record whose replies tie gives no pair."""
    from jaxllm import score

    base, _, _ = reward_run
    replies = ["The answer is 5.", "5", "Hello! How can I help you today?", "def add(a, b): return a + b"]
    records = [{"id": 1, "messages": [{"role": "user", "content": "Add 2 and 3."}], "completions": replies},
               {"id": 2, "prompt": "Hi there", "completions": ["Hi", "Hi"]}]
    inp, pairs = tmp_path / "completions.jsonl", tmp_path / "pairs.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert score.main(["--checkpoint", str(base / "rm"), "--input", str(inp), "--pairs", str(pairs)]) == 0
    err = capsys.readouterr().err
    assert "wrote 1 pairs" in err and "(1 prompts skipped: all replies scored the same)" in err
    [pair] = [json.loads(line) for line in pairs.read_text().splitlines()]
    single = tmp_path / "single.jsonl"
    single.write_text("".join(json.dumps({"prompt": "Add 2 and 3.", "completion": r}) + "\n" for r in replies))
    assert score.main(["--checkpoint", str(base / "rm"), "--input", str(single)]) == 0
    each = [json.loads(line)["score"] for line in capsys.readouterr().out.splitlines()]
    prompt = records[0]["messages"]
    assert pair["id"] == 1 and pair["prompt"] == prompt
    assert pair["chosen"] == prompt + [{"role": "assistant", "content": replies[int(np.argmax(each))]}]
    assert pair["rejected"] == prompt + [{"role": "assistant", "content": replies[int(np.argmin(each))]}]
    np.testing.assert_allclose([pair["chosen_score"], pair["rejected_score"]], [max(each), min(each)], rtol=1e-6)
