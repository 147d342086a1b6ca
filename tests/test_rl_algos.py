"""RL estimators and losses against independent NumPy loops written from veRL's
`core_algos.py` (and its `masked_whiten`), on random masked inputs with the edge cases: a group
of one, a response of length 1, all advantages negative."""

import numpy as np
import pytest

from jaxllm.objectives.rl import agg_loss, kl_penalty, policy_loss, value_loss
from jaxllm.rl.advantages import gae, group_advantages, reinforce_pp
from jaxllm.rl.lopti import lopti_masks, reweight_advantages

B, T = 7, 9
RTOL, ATOL = 2e-5, 2e-6


def _mask(rng, lengths=None):
    lengths = rng.integers(1, T + 1, B) if lengths is None else np.asarray(lengths)
    lengths[0] = 1  # a response of length 1
    return (np.arange(T)[None] < lengths[:, None]).astype(np.float32)


# ----------------------------------------------------------------------------- NumPy references


def np_masked_mean(x, m):
    return (x * m).sum() / m.sum()


def np_whiten(x, m):
    mean = np_masked_mean(x, m)
    var = np_masked_mean((x - mean) ** 2, m) * m.sum() / (m.sum() - 1)
    return (x - mean) / np.sqrt(var + 1e-8)


def np_gae(r, v, m, gamma, lam):
    next_v, last = np.zeros(B), np.zeros(B)
    adv = np.zeros((B, T))
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_v - v[:, t]
        cur = delta + gamma * lam * last
        next_v = v[:, t] * m[:, t] + (1 - m[:, t]) * next_v
        last = cur * m[:, t] + (1 - m[:, t]) * last
        adv[:, t] = last
    return np_whiten(adv, m), adv + v


def np_group(scores, ids, m, estimator, eps=1e-6, norm=True):
    out = np.zeros(B)
    for i in range(B):
        group = scores[ids == ids[i]]
        n = len(group)
        mean = group.mean() if n > 1 else 0.0
        if estimator == "grpo":
            std = group.std(ddof=1) if n > 1 else 1.0
            out[i] = (scores[i] - mean) / (std + eps) if norm else scores[i] - mean
        elif estimator == "rloo":
            out[i] = scores[i] * n / (n - 1) - mean * n / (n - 1) if n > 1 else scores[i]
        else:
            out[i] = scores[i] - mean
    adv = out[:, None] * m
    return np_whiten(adv, m) * m if estimator == "reinforce_pp_baseline" else adv


def np_reinforce_pp(r, m, gamma):
    ret, running = np.zeros((B, T)), np.zeros(B)
    for t in reversed(range(T)):
        running = r[:, t] + gamma * running
        ret[:, t] = running
        running = running * m[:, t]
    return np_whiten(ret, m) * m, ret


def np_agg(l, m, mode):
    if mode == "token-mean":
        return (l * m).sum() / m.sum()
    if mode == "seq-mean-token-sum":
        return (l * m).sum(1).mean()
    if mode == "seq-mean-token-mean":
        return ((l * m).sum(1) / m.sum(1)).mean()
    return (l * m).sum() / m.shape[1]


def np_policy(logp, old, adv, m, lo, hi, c, mode):
    nk = np.clip(logp - old, -20, 20)
    ratio = np.exp(nk)
    l1, l2 = -adv * ratio, -adv * np.clip(ratio, 1 - lo, 1 + hi)
    clipped = np.maximum(l1, l2)
    l3 = -adv * c
    losses = np.where(adv < 0, np.minimum(l3, clipped), clipped)
    return (np_agg(losses, m, mode), np_masked_mean((l2 > l1).astype(float), m), np_masked_mean(-nk, m),
            np_masked_mean(((clipped > l3) & (adv < 0)).astype(float), m))


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
def test_gae_matches_verl_recursion(gamma, lam):
    rng = np.random.default_rng(0)
    m = _mask(rng)
    r, v = rng.normal(size=(B, T)), rng.normal(size=(B, T))
    adv, ret = gae(r, v, m, gamma=gamma, lam=lam)
    want_adv, want_ret = np_gae(r, v, m, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ret, want_ret, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("estimator, norm", [("grpo", True), ("grpo", False), ("rloo", True),
                                             ("reinforce_pp_baseline", True)])
def test_group_advantages_match_verl(estimator, norm):
    rng = np.random.default_rng(1)
    m = _mask(rng)
    ids = np.array([0, 0, 0, 1, 1, 2, 3])  # groups of 3, 2, 1 (a group of one) and 1
    scores = rng.normal(size=B)
    got = group_advantages(scores, ids, m, estimator=estimator, norm_by_std=norm)
    np.testing.assert_allclose(got, np_group(scores, ids, m, estimator, norm=norm), rtol=RTOL, atol=ATOL)
    if estimator == "grpo" and norm:  # a group of one: mean 0, std 1, so its advantage is its score
        np.testing.assert_allclose(np.asarray(got)[5, 0], scores[5] / (1 + 1e-6), rtol=1e-6)


def test_grpo_equal_scores_in_a_group_give_zero_advantage():
    m = np.ones((B, T), np.float32)
    got = np.asarray(group_advantages(np.array([1.0, 1.0, 1.0, 0.0, 2.0, 5.0, 5.0]), np.array([0, 0, 0, 1, 1, 2, 2]),
                                      m, estimator="grpo"))
    assert np.all(got[[0, 1, 2, 5, 6]] == 0) and got[3, 0] < 0 < got[4, 0]


def test_reinforce_pp_matches_verl():
    rng = np.random.default_rng(2)
    m = _mask(rng)
    r = rng.normal(size=(B, T)) * m
    adv, ret = reinforce_pp(r, m, gamma=0.97)
    want_adv, want_ret = np_reinforce_pp(r, m, 0.97)
    np.testing.assert_allclose(adv, want_adv, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ret, want_ret, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("sign", ["mixed", "negative"])
def test_policy_loss_matches_verl(mode, sign):
    rng = np.random.default_rng(3)
    m = _mask(rng)
    old = -rng.uniform(0.1, 3.0, (B, T))
    logp = old + rng.normal(scale=0.5 if sign == "mixed" else 1.2, size=(B, T))
    adv = rng.normal(size=(B, T)) * 2
    if sign == "negative":  # all advantages negative: the dual clip acts
        adv = -np.abs(adv) - 0.1
    loss, metrics = policy_loss(logp, old, adv, m, clip_low=0.2, clip_high=0.28, dual_clip=3.0, agg=mode)
    want, clipfrac, ppo_kl, lower = np_policy(logp, old, adv, m, 0.2, 0.28, 3.0, mode)
    np.testing.assert_allclose(loss, want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose([metrics["clipfrac"], metrics["ppo_kl"], metrics["clipfrac_lower"]],
                               [clipfrac, ppo_kl, lower], rtol=RTOL, atol=ATOL)
    if sign == "negative":
        assert metrics["clipfrac_lower"] > 0
    np.testing.assert_allclose(agg_loss(adv, m, mode), np_agg(adv, m, mode), rtol=RTOL, atol=ATOL)


def test_ratio_one_means_no_clipping():
    rng = np.random.default_rng(4)
    m, logp, adv = _mask(rng), -rng.uniform(0.1, 3, (B, T)), rng.normal(size=(B, T))
    loss, metrics = policy_loss(logp, logp, adv, m)
    assert float(metrics["clipfrac"]) == 0 and float(metrics["ppo_kl"]) == 0 and float(metrics["clipfrac_lower"]) == 0
    np.testing.assert_allclose(loss, -np_masked_mean(adv, m), rtol=1e-5)


def test_kl_penalties_match_schulman_estimators():
    rng = np.random.default_rng(5)
    logp, ref = -rng.uniform(0.1, 4, (B, T)), -rng.uniform(0.1, 4, (B, T))
    d = logp - ref
    np.testing.assert_allclose(kl_penalty(logp, ref, "k1"), d, rtol=1e-6)
    np.testing.assert_allclose(kl_penalty(logp, ref, "abs"), np.abs(d), rtol=1e-6)
    np.testing.assert_allclose(kl_penalty(logp, ref, "k2"), 0.5 * d ** 2, rtol=1e-6)
    np.testing.assert_allclose(kl_penalty(logp, ref, "k3"), np.clip(np.exp(-d) + d - 1, -10, 10), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="k1, abs, k2, k3"):
        kl_penalty(logp, ref, "kl")


def test_value_loss_matches_verl():
    rng = np.random.default_rng(6)
    m = _mask(rng)
    v, old, ret = (rng.normal(size=(B, T)).astype(np.float32) for _ in range(3))
    loss, metrics = value_loss(v, old, ret, m, clip=0.2)
    vc = np.clip(v, old - np.float32(0.2), old + np.float32(0.2))
    l1, l2 = (v - ret) ** 2, (vc - ret) ** 2
    np.testing.assert_allclose(loss, 0.5 * np_masked_mean(np.maximum(l1, l2), m), rtol=RTOL)
    np.testing.assert_allclose(metrics["vf_clipfrac"], np_masked_mean((l2 > l1).astype(float), m), rtol=RTOL)


def test_lopti_masks_partition_the_response_and_reweighting_is_linear_in_p():
    rng = np.random.default_rng(7)
    m = _mask(rng)
    old = np.log(rng.uniform(0.01, 1.0, (B, T)))
    low, high = (np.asarray(x) for x in lopti_masks(old, m, eta=0.5))
    assert np.all(low * high == 0) and np.array_equal(low + high, m)
    assert np.all(np.exp(old)[low > 0] < 0.5) and np.all(np.exp(old)[high > 0] >= 0.5)
    adv = rng.normal(size=(B, T))
    np.testing.assert_allclose(reweight_advantages(adv, old, alpha=0.3), (0.3 * np.exp(old) + 0.7) * adv, rtol=1e-6)
    np.testing.assert_array_equal(reweight_advantages(adv, old, alpha=0.0), adv.astype(np.float32))
