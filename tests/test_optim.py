import numpy as np
import pytest

from jaxllm.optim import cosine_schedule, weight_decay_mask, wsd_schedule


def _ref_wsd(step, peak, total, warmup, frac, shape, min_lr):
    decay = round(frac * total)
    start = total - decay
    if step < warmup:
        return peak * step / warmup
    if step < start:
        return peak
    t = min((step - start) / decay, 1.0)
    f = {"linear": 1 - t, "cosine": 0.5 * (1 + np.cos(np.pi * t)), "1-sqrt": 1 - np.sqrt(t)}[shape]
    return min_lr + (peak - min_lr) * f


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_wsd_matches_formula(shape):
    sched = wsd_schedule(1e-3, total_steps=200, warmup_steps=20, decay_fraction=0.25, decay_shape=shape, min_lr=1e-5)
    for step in [0, 1, 10, 19, 20, 21, 100, 149, 150, 151, 175, 199, 200]:
        assert float(sched(step)) == pytest.approx(_ref_wsd(step, 1e-3, 200, 20, 0.25, shape, 1e-5), rel=1e-5, abs=1e-9)


def test_wsd_rejects_impossible_lengths():
    with pytest.raises(ValueError, match="exceed total_steps"):
        wsd_schedule(1e-3, total_steps=100, warmup_steps=95, decay_fraction=0.1)


def test_cosine_ends_at_min_lr():
    sched = cosine_schedule(1.0, total_steps=100, warmup_steps=10, min_lr=0.1)
    assert float(sched(10)) == pytest.approx(1.0)
    assert float(sched(55)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)
    assert float(sched(100)) == pytest.approx(0.1)


def test_weight_decay_skips_norms_and_biases():
    params = {"embed": 0, "final_norm": 0, "layers": {"wq": 0, "bq": 0, "attn_norm": 0, "w_up": 0}}
    mask = weight_decay_mask(params)
    assert mask == {"embed": True, "final_norm": False,
                    "layers": {"wq": True, "bq": False, "attn_norm": False, "w_up": True}}


def test_warmup_ratio_sets_the_warmup_length():
    from jaxllm.config import OptimizerConfig, ScheduleConfig
    from jaxllm.optim import make_schedule

    sched = make_schedule(OptimizerConfig(lr=1.0), ScheduleConfig(name="linear", warmup_steps=7, warmup_ratio=0.03),
                          total_steps=1000)
    # 30 warmup steps (3% of 1000), not 7: the peak is reached at step 30, then linear decay to 0.
    np.testing.assert_allclose([float(sched(s)) for s in (0, 15, 30, 515, 1000)], [0.0, 0.5, 1.0, 0.5, 0.0],
                               atol=1e-6)
