"""Preference losses against independent float64 NumPy formulas, plus their known limits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.objectives.preference import LOSSES, kto_kl_estimate, kto_loss, preference_loss

B = 16
RTOL, ATOL = 1e-5, 1e-6


def logsig(x):
    return -np.logaddexp(0.0, -x)


def batch(seed=0):
    rng = np.random.default_rng(seed)
    lc = rng.integers(3, 40, B).astype(np.float64)
    lr = rng.integers(3, 40, B).astype(np.float64)
    # Mean token logps between -3 and -0.05; float32 values so both sides see the same inputs.
    pc, pr, rc, rr = (-(rng.uniform(0.05, 3.0, B) * l).astype(np.float32).astype(np.float64)
                      for l in (lc, lr, lc, lr))
    return dict(pc=pc, pr=pr, rc=rc, rr=rr, lc=lc, lr=lr)


def call(loss_type, d, **hp):
    losses, metrics = preference_loss(loss_type, jnp.asarray(d["pc"], jnp.float32), jnp.asarray(d["pr"], jnp.float32),
                                      jnp.asarray(d["rc"], jnp.float32), jnp.asarray(d["rr"], jnp.float32),
                                      d["lc"], d["lr"], **hp)
    return np.asarray(losses, np.float64), {k: np.asarray(v, np.float64) for k, v in metrics.items()}


def reference(loss_type, d, beta=0.1, gamma=0.5, alpha=0.01, delta=1.0, nll_weight=1.0, label_smoothing=0.0):
    """Returns (losses, rewards_chosen, rewards_rejected), written from the papers' formulas."""
    pc, pr, rc, rr, lc, lr = (d[k] for k in ("pc", "pr", "rc", "rr", "lc", "lr"))
    ls = label_smoothing
    nll = -pc / lc
    if loss_type in ("sigmoid", "hinge", "rdpo"):
        h = (pc - rc) - (pr - rr)
        rew = beta * (pc - rc), beta * (pr - rr)
        loss = {"sigmoid": -(1 - ls) * logsig(beta * h) - ls * logsig(-beta * h),
                "hinge": np.maximum(0.0, 1 - beta * h),
                "rdpo": -logsig(beta * h + alpha * (lc - lr))}[loss_type]
    elif loss_type in ("dpo_norm", "ipo"):
        cr, rj = pc / lc - rc / lc, pr / lr - rr / lr
        h = cr - rj
        rew = beta * cr, beta * rj
        loss = (-(1 - ls) * logsig(beta * h) - ls * logsig(-beta * h) if loss_type == "dpo_norm"
                else (h - 1 / (2 * beta)) ** 2)
    elif loss_type == "simpo":
        z = beta * (pc / lc - pr / lr) - gamma
        loss, rew = -(1 - ls) * logsig(z) - ls * logsig(-z), (beta * pc / lc, beta * pr / lr)
    elif loss_type == "cpo":
        z = beta * (pc - pr)
        loss, rew = -(1 - ls) * logsig(z) - ls * logsig(-z) + nll_weight * nll, (beta * pc, beta * pr)
    elif loss_type == "orpo":
        ac, ar = pc / lc, pr / lr
        log_odds = (ac - ar) - (np.log(1 - np.exp(ac)) - np.log(1 - np.exp(ar)))
        loss, rew = nll - beta * logsig(log_odds), (beta * ac, beta * ar)
    elif loss_type == "rrhf":
        loss, rew = np.maximum(0.0, pr / lr - pc / lc) + nll_weight * nll, (pc / lc, pr / lr)
    elif loss_type == "slic":
        loss, rew = np.maximum(0.0, delta - (pc - pr)) + nll_weight * nll, (pc, pr)
    return loss, rew[0], rew[1]


CASES = [("sigmoid", {}), ("sigmoid", {"beta": 0.3, "label_smoothing": 0.2}), ("dpo_norm", {"beta": 2.0}),
         ("ipo", {"beta": 0.5}), ("hinge", {"beta": 0.05}), ("rdpo", {"beta": 0.2, "alpha": 0.02}),
         ("simpo", {"beta": 2.0, "gamma": 1.0}), ("simpo", {"label_smoothing": 0.1}), ("cpo", {"nll_weight": 0.5}),
         ("orpo", {"beta": 0.25}), ("rrhf", {"nll_weight": 2.0}), ("slic", {"delta": 5.0, "nll_weight": 0.1}),
         ("slic", {})]


def test_every_loss_type_is_tested():
    assert {c[0] for c in CASES} == set(LOSSES)


@pytest.mark.parametrize("loss_type,hp", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_loss_matches_numpy(loss_type, hp):
    d = batch(seed=len(hp))
    losses, m = call(loss_type, d, **hp)
    want, rc, rr = reference(loss_type, d, **hp)
    assert losses.shape == (B,)
    np.testing.assert_allclose(losses, want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(m["rewards_chosen"], rc, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(m["rewards_rejected"], rr, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(m["margin"], rc - rr, rtol=RTOL, atol=1e-5)
    np.testing.assert_array_equal(m["accuracy"], (m["rewards_chosen"] > m["rewards_rejected"]).astype(float))
    np.testing.assert_allclose(m["logps_chosen"], d["pc"], rtol=RTOL)
    np.testing.assert_allclose(m["logps_rejected"], d["pr"], rtol=RTOL)


def test_reference_free_losses_ignore_and_do_not_need_ref():
    d = batch(1)
    for loss_type in ("simpo", "cpo", "orpo", "rrhf", "slic"):
        with_ref, _ = call(loss_type, d)
        without, _ = preference_loss(loss_type, d["pc"], d["pr"], chosen_lengths=d["lc"], rejected_lengths=d["lr"])
        np.testing.assert_allclose(np.asarray(without), with_ref, rtol=RTOL)


def test_dpo_at_policy_equal_reference_is_log2():
    d = batch(2)
    losses, m = preference_loss("sigmoid", d["pc"], d["pr"], d["pc"], d["pr"], beta=0.7)
    np.testing.assert_allclose(np.asarray(losses), np.log(2.0), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(m["margin"]), 0.0)


def test_label_smoothing_half_is_symmetric_with_minimum_log2_at_zero_margin():
    # cDPO at ls = 0.5 is 0.5 * (softplus(z) + softplus(-z)), z = beta * h: not log 2 for every
    # margin, but even in z with its minimum log 2 at z = 0 (the labels carry no information).
    d = batch(3)
    z = (d["pc"] - d["rc"]) - (d["pr"] - d["rr"])
    losses, _ = call("sigmoid", d, beta=1.0, label_smoothing=0.5)
    np.testing.assert_allclose(losses, 0.5 * (np.logaddexp(0, z) + np.logaddexp(0, -z)), rtol=RTOL)
    swapped, _ = preference_loss("sigmoid", d["pr"], d["pc"], d["rr"], d["rc"], beta=1.0, label_smoothing=0.5)
    np.testing.assert_allclose(np.asarray(swapped), losses, rtol=RTOL)
    assert np.all(losses >= np.log(2.0) - 1e-7)
    h = jnp.linspace(-4.0, 4.0, 81)
    zero = jnp.zeros_like(h)
    at = np.asarray(preference_loss("sigmoid", h, zero, zero, zero, beta=1.0, label_smoothing=0.5)[0])
    assert abs(float(h[np.argmin(at)])) < 1e-6
    np.testing.assert_allclose(at.min(), np.log(2.0), rtol=1e-6)


def test_ipo_is_minimised_at_h_equal_one_over_two_beta():
    beta = 0.25
    target = 1 / (2 * beta)
    h = jnp.linspace(target - 3, target + 3, 61)  # step 0.1, includes the target
    ones = jnp.ones_like(h)
    # Length 1 makes the length-averaged margin equal h itself.
    losses, _ = preference_loss("ipo", h, jnp.zeros_like(h), jnp.zeros_like(h), jnp.zeros_like(h), ones, ones,
                                beta=beta)
    losses = np.asarray(losses)
    assert abs(float(h[np.argmin(losses)]) - target) < 1e-5 and losses.min() < 1e-10
    grad = jax.grad(lambda x: preference_loss("ipo", x, 0.0, 0.0, 0.0, 1.0, 1.0, beta=beta)[0])(jnp.float32(target))
    assert abs(float(grad)) < 1e-6


def test_simpo_at_equal_normalised_logps_is_minus_logsigmoid_minus_gamma():
    lc, lr = jnp.array([4.0, 10.0, 7.0]), jnp.array([8.0, 5.0, 7.0])
    pc, pr = -1.3 * lc, -1.3 * lr
    for gamma in (0.0, 0.5, 2.0):
        losses, m = preference_loss("simpo", pc, pr, chosen_lengths=lc, rejected_lengths=lr, beta=2.0, gamma=gamma)
        np.testing.assert_allclose(np.asarray(losses), -logsig(-gamma), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(m["margin"]), 0.0, atol=1e-6)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    d = batch(4)
    args = [jnp.asarray(d[k], jnp.float32) for k in ("pc", "pr", "rc", "rr")]

    def total(pc, pr):
        return jnp.sum(preference_loss("sigmoid", pc, pr, args[2], args[3])[0])

    g_c, g_r = jax.grad(total, argnums=(0, 1))(args[0], args[1])
    assert np.all(np.asarray(g_c) < 0) and np.all(np.asarray(g_r) > 0)
    # Metrics are detached: a loss built on them has no gradient.
    g = jax.grad(lambda pc: jnp.sum(preference_loss("sigmoid", pc, *args[1:])[1]["rewards_chosen"]))(args[0])
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_orpo_stays_finite_at_certain_completions():
    # A mean token logp of exactly 0 (probability 1) must not give NaN losses or gradients.
    pc, pr, l = jnp.array([0.0, -0.5]), jnp.array([-1.0, 0.0]), jnp.array([3.0, 3.0])
    g = jax.grad(lambda pc: jnp.sum(preference_loss("orpo", pc, pr, chosen_lengths=l, rejected_lengths=l)[0]))(pc)
    assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.isfinite(np.asarray(preference_loss("orpo", pc, pr, chosen_lengths=l, rejected_lengths=l)[0])))


def test_jit_and_bfloat16_inputs():
    d = batch(5)
    f = jax.jit(lambda *a: preference_loss("dpo_norm", *a, beta=0.5)[0])
    out = f(*(jnp.asarray(d[k], jnp.bfloat16) for k in ("pc", "pr", "rc", "rr")), d["lc"], d["lr"])
    assert out.dtype == jnp.float32 and out.shape == (B,)


def test_kto_matches_numpy():
    rng = np.random.default_rng(6)
    pol = (-rng.uniform(5, 60, B)).astype(np.float32)
    ref = (pol + rng.normal(0, 3, B)).astype(np.float32)
    labels = rng.random(B) < 0.5
    pkl = (-rng.uniform(5, 60, B)).astype(np.float32)
    rkl = (pkl - rng.normal(1.0, 2.0, B)).astype(np.float32)
    kl = kto_kl_estimate(pkl, rkl)
    want_kl = max(np.mean(pkl.astype(np.float64) - rkl), 0.0)
    np.testing.assert_allclose(float(kl), want_kl, rtol=RTOL, atol=ATOL)
    beta, wd, wu = 0.2, 1.0, 1.33
    losses, m = kto_loss(pol, ref, labels, kl, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    lr = pol.astype(np.float64) - ref
    sig = lambda x: 1 / (1 + np.exp(-x))
    want = np.where(labels, wd * (1 - sig(beta * (lr - want_kl))), wu * (1 - sig(beta * (want_kl - lr))))
    np.testing.assert_allclose(np.asarray(losses), want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(m["rewards"]), beta * lr, rtol=RTOL, atol=ATOL)


def test_kto_kl_is_clamped_and_detached():
    p = jnp.array([-10.0, -20.0])
    assert float(kto_kl_estimate(p, p + 5.0)) == 0.0  # negative estimate -> 0
    g = jax.grad(lambda p: kto_kl_estimate(p, p - 3.0))(p)
    np.testing.assert_array_equal(np.asarray(g), 0.0)
    # A raw (negative, differentiable) estimate passed straight in is clamped and detached too.
    losses_raw, _ = kto_loss(p, p, jnp.array([True, False]), jnp.float32(-4.0))
    losses_zero, _ = kto_loss(p, p, jnp.array([True, False]), 0.0)
    np.testing.assert_allclose(np.asarray(losses_raw), np.asarray(losses_zero))
    g = jax.grad(lambda k: jnp.sum(kto_loss(p, p - 1.0, jnp.array([True, False]), k)[0]))(jnp.float32(2.0))
    assert float(g) == 0.0


def test_bad_names_and_missing_inputs_raise():
    x = jnp.zeros(2)
    with pytest.raises(ValueError, match="valid:.*sigmoid"):
        preference_loss("dpo2", x, x, x, x)
    with pytest.raises(ValueError, match=r"takes hyperparameters \['beta', 'label_smoothing'\].*\['gamma'\]"):
        preference_loss("sigmoid", x, x, x, x, gamma=1.0)
    with pytest.raises(ValueError, match="unknown.*'bta'"):
        preference_loss("simpo", x, x, chosen_lengths=x, rejected_lengths=x, bta=1.0)
    with pytest.raises(ValueError, match="needs ref_chosen_logps"):
        preference_loss("sigmoid", x, x)
    with pytest.raises(ValueError, match="needs ref_chosen_logps"):
        preference_loss("ipo", x, x, x, None, x, x)
    for loss_type in ("dpo_norm", "ipo", "rdpo", "simpo", "cpo", "orpo", "rrhf", "slic"):
        with pytest.raises(ValueError, match="needs chosen_lengths"):
            preference_loss(loss_type, x, x, x, x, chosen_lengths=x)
    with pytest.raises(ValueError, match="beta must be > 0"):
        preference_loss("sigmoid", x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss("sigmoid", x, x, x, x, label_smoothing=0.7)
