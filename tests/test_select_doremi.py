"""DoReMi: the domain-weight update against NumPy, the per-domain excess losses against the
models' full logits, and a run on two domains, one learnable and one of random letters: the
weights move to the learnable one, every logged step follows the update from the logged excess
losses, the proxy's loss is the alpha-weighted domain losses, the output config loads as
data.stages, and a resumed proxy ends with the same weights. Bad input is one line."""

import json
import os

import jax
import numpy as np
import pytest

from jaxllm.config import Config, build, load_config
from jaxllm.data import mixture
from jaxllm.data.curriculum import stage_plan
from jaxllm.models import forward, init_params
from jaxllm.select import cli, doremi
from jaxllm.select.records import SelectError
from jaxllm.tasks import make_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_update_equals_numpy_step_by_step():
    rng = np.random.default_rng(0)
    alpha = np.full(3, 1 / 3)
    mine = alpha.copy()
    for _ in range(10):
        lam = rng.uniform(0, 2, 3) * (rng.uniform(size=3) > 0.2)  # a domain may be absent (0)
        # alpha' = alpha exp(eta lambda) / sum; alpha = (1 - c) alpha' + c / k
        prop = [a * np.exp(0.7 * x) for a, x in zip(mine, lam)]
        mine = np.array([(1 - 1e-2) * p / sum(prop) + 1e-2 / 3 for p in prop])
        alpha = doremi.doremi_update(alpha, lam, 0.7, 1e-2)
        np.testing.assert_allclose(alpha, mine, rtol=1e-12)
    assert alpha.sum() == pytest.approx(1.0)


def test_excess_losses_equal_numpy_from_full_logits():
    cfg = build(Config, {"model": {"vocab_size": 64, "d_model": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1,
                                   "d_ff": 32, "dtype": "float32"}, "trainer": {"loss_chunk_size": 4}})
    task = make_task(cfg)
    proxy, ref = init_params(cfg.model, jax.random.PRNGKey(0)), init_params(cfg.model, jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    B, T = 6, 10
    batch = {"tokens": rng.integers(0, 64, (B, T)).astype(np.int32),
             "targets": rng.integers(0, 64, (B, T)).astype(np.int32),
             "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
             "segment_ids": np.ones((B, T), np.int32), "loss_mask": (rng.uniform(size=(B, T)) > 0.3).astype(np.float32)}
    domain = np.array([0, 2, 0, 2, 2, 0], np.int32)  # domain 1 absent
    got = jax.jit(doremi.domain_excess, static_argnums=(0, 1, 2, 3))(task, cfg.model, 3, 4, proxy, {}, ref, batch,
                                                                     domain)

    def nll(params):
        logits = np.asarray(jax.jit(forward, static_argnums=0)(cfg.model, params, batch["tokens"],
                                                               batch["positions"], batch["segment_ids"]), np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        return logz - np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]

    excess = np.maximum(nll(proxy) - nll(ref), 0) * batch["loss_mask"]
    for i in range(3):
        rows = domain == i
        np.testing.assert_allclose(got["excess"][i], excess[rows].sum(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got["tokens"][i], batch["loss_mask"][rows].sum())
        np.testing.assert_allclose(got["ref_loss"][i], (nll(ref) * batch["loss_mask"])[rows].sum(), rtol=1e-4)


# ----------------------------------------------------------------------------- a run


def _corpus(root):
    rng = np.random.default_rng(1)
    words = "the cat sat on a mat and then it ran to see my dog by the red door".split()
    for name in ("prose", "noise"):
        os.makedirs(root / name, exist_ok=True)
        with open(root / name / "docs.jsonl", "w") as f:
            for _ in range(80):
                if name == "prose":
                    start = int(rng.integers(0, len(words)))
                    text = " ".join(words[(start + i) % len(words)] for i in range(int(rng.integers(20, 60))))
                else:
                    text = " ".join("".join(rng.choice(list("qxzjkvwyb"), 3)) for _ in range(30))
                f.write(json.dumps({"text": text}) + "\n")


def _config(root):
    path = root / "base.yaml"
    path.write_text(f"""base: {ROOT}/configs/tiny.yaml
model: {{vocab_size: 320, d_model: 32, n_layers: 1, n_heads: 2, n_kv_heads: 1, d_ff: 64, max_seq_len: 32}}
data:
  train: [{root}/prose, {root}/noise]
  tokenizer_cache_dir: {root}/tok
  seq_len: 32
  sources:
    - {{name: prose, train: [{root}/prose]}}
    - {{name: noise, train: [{root}/noise]}}
  stages: [{{weights: {{prose: 1, noise: 1}}}}]
optimizer: {{lr: 0.01}}
schedule: {{warmup_steps: 2}}
trainer: {{total_steps: 20, batch_size: 16, eval_every_steps: 1000, eval_batches: 1, sample_tokens: 0}}
checkpoint: {{every_steps: 1000, async_save: false}}
logging: {{every_steps: 1, progress_bar: false, tensorboard: false}}
mesh: {{cpu_devices: 0}}
""")
    return str(path)


def test_weights_move_to_the_learnable_domain_and_load_as_stages(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(mixture, "ROW_SHUFFLE_TOKENS", 64 * 32)  # small shuffle windows: fast to fill
    _corpus(tmp_path)
    config, out = _config(tmp_path), str(tmp_path / "weights.yaml")
    args = ["doremi", "--config", config, "--out", out, "--proxy-steps", "8"]
    assert cli.main(args) == 0
    assert "doremi: prose 0.500 -> " in capsys.readouterr().out
    rows = [json.loads(line) for line in open(tmp_path / "weights-work" / "proxy" / "metrics.jsonl")]
    alpha, mean = np.array([0.5, 0.5]), []
    for r in rows:  # every step: the update from the logged excess losses, the alpha-weighted loss
        alpha = doremi.doremi_update(alpha, [r["excess/prose"], r["excess/noise"]], 1.0, 1e-3)
        np.testing.assert_allclose([r["alpha/prose"], r["alpha/noise"]], alpha, rtol=1e-6)
        assert r["loss"] == pytest.approx(alpha @ [r["loss/prose"], r["loss/noise"]], rel=1e-4)
        mean.append(alpha)
    assert len(rows) == 8
    assert rows[0]["excess/prose"] > rows[0]["excess/noise"]  # the reference learned prose, not noise
    weights = np.mean(mean, axis=0)
    assert weights[0] > 0.6
    plan = stage_plan(load_config(out))  # base: the config, data.stages: the weights
    np.testing.assert_allclose(plan[0].weights, weights / weights.sum(), rtol=1e-6)
    assert load_config(out).trainer.total_steps == 20
    # Again with the reference given: the proxy restores its finished state (step 8: model, data
    # position, alpha and the running sum) and writes the same weights, exactly.
    os.remove(out)
    assert cli.main([*args, "--reference", str(tmp_path / "weights-work" / "reference")]) == 0
    np.testing.assert_array_equal(stage_plan(load_config(out))[0].weights, plan[0].weights)
    assert "training the reference" not in capsys.readouterr().out


def test_bad_mixtures_are_one_line_errors(tmp_path, capsys):
    _corpus(tmp_path)
    config = _config(tmp_path)
    for overrides, message in [(["data.stages=[{weights: {prose: 1, noise: 0}}]"],
                                "error: doremi: data.stages[0].weights.noise is 0: the proxy must see every domain"),
                               (["data.stages=[{weights: {prose: 1, noise: 1}}, {start_step: 5, weights: {prose: 1}}]"],
                                "error: doremi: the config has 2 stages"),
                               ([f"data.sources=[{{name: prose, train: [{tmp_path}/prose], eval: [{tmp_path}/prose]}}, "
                                 f"{{name: noise, train: [{tmp_path}/noise], eval: [{tmp_path}/noise]}}]",
                                 "data.dynamic_weights={every_steps: 5, reference_losses: {prose: 1, noise: 1}}"],
                                "error: doremi: data.dynamic_weights is on")]:
        assert cli.main(["doremi", "--config", config, "--out", str(tmp_path / "w.yaml"), *overrides]) == 2
        assert capsys.readouterr().err.strip().startswith(message)
    with pytest.raises(SelectError, match="domain 'noise' never appeared in the proxy's 3 batches"):
        doremi.check_seen(["prose", "noise"], [120.0, 0.0], 3)
