"""QuRater and educational-value raters: the soft-label Bradley-Terry and regression losses
against NumPy, raters trained through `python -m jaxllm.select train-rater / train-edu` on a
planted quality feature (held-out pairs ordered >= 90% right, int scores >= 3 found), scoring and
selection with `rate`, exp(s / tau) sampling, and one-line errors for bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import Config, build
from jaxllm.data.tokenizer import train_sentencepiece
from jaxllm.models import init_params
from jaxllm.select import cli
from jaxllm.select.objectives import EduObjective, SoftBTObjective
from jaxllm.select.scorers import ModelScorer, int_scores, rating_model_info, sample_by_rating

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = "apple river stone cloud music garden silver forest ocean valley candle bridge".split()
BAD = "zorp blick fwump grox snark plonk vrrt klax muzz drib yeek thrum".split()
MODEL = ["model.vocab_size=320", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
         "model.d_ff=64", "model.max_seq_len=32", "data.seq_len=32"]


def _doc(rng, g=None):
    """12 words; the planted quality is the share of GOOD words (g of them)."""
    g = int(rng.integers(0, 13)) if g is None else g
    words = list(rng.choice(GOOD, g)) + list(rng.choice(BAD, 12 - g))
    rng.shuffle(words)
    return " ".join(words), g / 12


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("rating")
    rng = np.random.default_rng(0)
    tok = train_sentencepiece((_doc(rng)[0] for _ in range(300)), 320, str(root / "sp"))
    cfg = root / "cfg.yaml"
    cfg.write_text(f"base: {ROOT}/configs/tiny.yaml\ndata: {{tokenizer: {tok}}}\n")
    return root, rng, str(cfg)


def _common(root, name, steps):
    return [*MODEL, f"trainer.total_steps={steps}", "trainer.batch_size=16", "trainer.eval_batches=4",
            "trainer.eval_every_steps=1000", "optimizer.lr=3e-3", "optimizer.weight_decay=0", "schedule.warmup_steps=5",
            "checkpoint.async_save=false", "checkpoint.every_steps=1000", "logging.progress_bar=false",
            "logging.tensorboard=false", "logging.every_steps=1000", "mesh.cpu_devices=0"]


# ----------------------------------------------------------------------------- the losses


def _tiny(objective_cls):
    cfg = build(Config, {"model": {"vocab_size": 64, "d_model": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1,
                                   "d_ff": 32, "dtype": "float32"}})
    obj = objective_cls(cfg)
    params = init_params(cfg.model, jax.random.PRNGKey(0)) | {
        "reward_head": {"w": jax.random.normal(jax.random.PRNGKey(1), (16,)), "b": jnp.float32(0.3)}}
    return obj, params


def _rows(rng, n, T=8, prefix=""):
    lengths = rng.integers(1, T + 1, n)
    seg = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    return {f"{prefix}tokens": rng.integers(3, 64, (n, T)).astype(np.int32) * seg,
            f"{prefix}positions": np.arange(T, dtype=np.int32)[None].repeat(n, 0) * seg, f"{prefix}segment_ids": seg}


def test_soft_bradley_terry_loss_equals_numpy():
    obj, params = _tiny(SoftBTObjective)
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(0, 1, 5), [0.0, 1.0, 0.5]]).astype(np.float32)
    mask = np.array([1, 1, 1, 1, 0, 1, 1, 1], np.float32)
    batch = _rows(rng, 8, prefix="a_") | _rows(rng, 8, prefix="b_") | {"p": p, "pair_mask": mask}
    loss_sum, aux = jax.jit(obj.loss)(params, batch)
    s_a, s_b = (np.asarray(x, np.float64) for x in jax.jit(obj.scores)(params, batch))
    log_sig = lambda x: -np.log1p(np.exp(-x))
    want = -(p * log_sig(s_b - s_a) + (1 - p) * log_sig(s_a - s_b))
    np.testing.assert_allclose(float(loss_sum), np.sum(want * mask), rtol=1e-5)
    assert float(aux["weight"]) == 7
    decided = (p != 0.5) & (mask > 0)
    assert float(aux["decided"]) == decided.sum()
    assert float(aux["correct"]) == np.sum(decided & ((p > 0.5) == (s_b > s_a)))
    # p = 1 is the Bradley-Terry loss of the reward model: -log sigmoid(s_b - s_a).
    np.testing.assert_allclose(want[6], -log_sig(s_b[6] - s_a[6]), rtol=1e-12)


def test_regression_loss_and_metrics_equal_numpy():
    obj, params = _tiny(EduObjective)
    rng = np.random.default_rng(1)
    y = rng.uniform(0, 5, 12).astype(np.float32)
    mask = (rng.uniform(size=12) > 0.2).astype(np.float32)
    batch = _rows(rng, 12) | {"score": y, "row_mask": mask}
    from jaxllm.objectives.reward import reward_scores

    # Head scaled and shifted: a spread of scores around the threshold.
    params["reward_head"] = {"w": params["reward_head"]["w"] * 3, "b": params["reward_head"]["b"] * 3 + 2.5}
    s = np.asarray(jax.jit(reward_scores, static_argnums=0)(obj.model_cfg, params, batch["tokens"],
                                                             batch["positions"], batch["segment_ids"]), np.float64)
    loss_sum, aux = jax.jit(obj.loss)(params, batch)
    np.testing.assert_allclose(float(loss_sum), np.sum((s - y) ** 2 * mask), rtol=1e-4)
    m = obj.finalize({k: np.asarray(v) for k, v in aux.items()} | {"loss_sum": np.asarray(loss_sum)})
    keep, pred = (y >= 3) & (mask > 0), (s >= 2.5) & (mask > 0)
    tp, fp, fn = np.sum(keep & pred), np.sum(pred & ~keep), np.sum(keep & ~pred)
    assert float(m["f1"]) == pytest.approx(2 * tp / max(2 * tp + fp + fn, 1), abs=1e-6)
    assert float(m["mae"]) == pytest.approx(np.sum(np.abs(s - y) * mask) / mask.sum(), rel=1e-4)
    right = (np.clip(np.round(s), 0, 5) == np.clip(np.round(y), 0, 5)) & (mask > 0)
    assert float(m["int_accuracy"]) == pytest.approx(right.sum() / mask.sum(), abs=1e-6)


def test_sampling_is_proportional_to_exp_score_over_tau():
    scores, tau = np.array([0.0, 1.0, 2.0, -1.0]), 0.7
    draws = np.bincount([sample_by_rating(scores, 1, tau, seed)[0] for seed in range(6000)], minlength=4) / 6000
    want = np.exp(scores / tau) / np.exp(scores / tau).sum()
    np.testing.assert_allclose(draws, want, atol=0.02)
    three = sample_by_rating(scores, 3, tau, seed=1)
    assert len(set(three.tolist())) == 3  # without replacement
    assert sorted(sample_by_rating(scores, 4, tau, seed=2).tolist()) == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- trained raters


def test_rater_orders_held_out_pairs_and_rate_selects(world, capsys):
    root, rng, cfg = world
    pairs = []
    for _ in range(700):
        (a, qa), (b, qb) = _doc(rng), _doc(rng)
        pairs.append({"text_a": a, "text_b": b, "p_b_over_a": float(1 / (1 + np.exp(-8 * (qb - qa)))),
                      "criterion": "educational_value"})
    pairs += [{**r, "criterion": "writing_style", "p_b_over_a": 0.5} for r in pairs[:20]]
    (root / "judgments.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    out = root / "rater"
    assert cli.main(["train-rater", "--config", cfg, "--pairs", str(root / "judgments.jsonl"), "--criterion",
                     "educational_value", "--out", str(out), *_common(root, "rater", 120)]) == 0
    assert "held-out accuracy" in capsys.readouterr().err
    info = rating_model_info(str(out))
    assert info == {"kind": "rater", "score_key": "qurater_educational_value", "criterion": "educational_value"}
    held = [(_doc(rng), _doc(rng)) for _ in range(200)]
    held = [(a, b) for a, b in held if a[1] != b[1]]
    scorer = ModelScorer(str(out), batch_size=16)
    s_a = scorer.score_batch([a for (a, _), _ in held])
    s_b = scorer.score_batch([b for _, (b, _) in held])
    right = np.mean([(qb > qa) == (sb > sa) for ((_, qa), (_, qb)), sa, sb in zip(held, s_a, s_b)])
    assert right >= 0.9, right
    # rate: the threshold keeps exactly the documents scoring at least it.
    docs = [_doc(rng)[0] for _ in range(40)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs)))
    scores = scorer.score_batch(docs)
    cut = float(np.median(scores))
    assert cli.main(["rate", "--model", str(out), "--input", str(root / "docs.jsonl"), "--out",
                     str(root / "kept.jsonl"), "--threshold", str(cut)]) == 0
    kept = [json.loads(line) for line in open(root / "kept.jsonl")]
    assert [r["id"] for r in kept] == [i for i, s in enumerate(scores) if s >= cut]
    np.testing.assert_allclose([r["qurater_educational_value"] for r in kept], scores[scores >= cut], rtol=1e-6)


def test_edu_regressor_finds_the_documents_scoring_3_or_more(world):
    root, rng, cfg = world
    def annotated(n):  # score 0-5 planted as 0, 2, 4, 8, 10 or 12 GOOD words of 12
        return [(_doc(rng, [0, 2, 4, 8, 10, 12][y])[0], y) for y in rng.integers(0, 6, n).tolist()]

    (root / "edu.jsonl").write_text("".join(json.dumps({"body": t, "edu": y}) + "\n" for t, y in annotated(1000)))
    out = root / "edu"
    assert cli.main(["train-edu", "--config", cfg, "--annotations", str(root / "edu.jsonl"), "--text-field", "body",
                     "--score-field", "edu", "--out", str(out), *_common(root, "edu", 150)]) == 0
    held = annotated(200)
    scorer = ModelScorer(str(out), batch_size=16)
    assert scorer.score_key == "edu_score"
    pred = int_scores(scorer.score_batch([t for t, _ in held]))
    truth = np.array([y for _, y in held])
    assert np.mean((pred >= 3) == (truth >= 3)) >= 0.9  # FineWeb-Edu's keep decision
    assert np.mean(np.abs(pred - truth) <= 1) >= 0.95

    # The same run as jaxllm.curate's quality model: it keeps exactly the documents scoring >= 2.5.
    from jaxllm.curate import CurateConfig, curate

    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, (t, _) in enumerate(held[:48])))
    curate(CurateConfig(input=[str(docs)], output=str(root / "kept.jsonl"), filters=[], dedup=[], workers=1,
                        quality_model=str(out), quality_threshold=2.5))
    kept = [json.loads(line)["id"] for line in open(root / "kept.jsonl")]
    scores = scorer.score_batch([t for t, _ in held[:48]])
    assert kept == [f"d{i}" for i in range(48) if scores[i] >= 2.5] and 0 < len(kept) < 48


@pytest.mark.parametrize("record, message", [
    ({"text_a": "x", "text_b": "y", "p_b_over_a": 1.5}, "p_b_over_a 1.5 is outside [0, 1]"),
    ({"text_a": "x", "text_b": "y", "p_b_over_a": "high"}, "p_b_over_a must be a finite number, got 'high'"),
    ({"text_a": "x", "p_b_over_a": 0.2}, "needs 'text_b', a string (has p_b_over_a, text_a)"),
])
def test_bad_judgments_are_one_line_errors(tmp_path, capsys, record, message):
    path = tmp_path / "j.jsonl"
    path.write_text(json.dumps({"text_a": "a", "text_b": "b", "p_b_over_a": 0.3}) + "\n" + json.dumps(record) + "\n")
    assert cli.main(["train-rater", "--config", "configs/tiny.yaml", "--pairs", str(path), "--out",
                     str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {path}:2: {message}"]


def test_mixed_criteria_and_missing_files_are_one_line_errors(tmp_path, capsys):
    path = tmp_path / "j.jsonl"
    path.write_text("".join(json.dumps({"text_a": "a", "text_b": "b", "p_b_over_a": 0.3, "criterion": c}) + "\n"
                            for c in ("style", "facts")))
    assert cli.main(["train-rater", "--config", "configs/tiny.yaml", "--pairs", str(path), "--out", "x"]) == 2
    assert capsys.readouterr().err.strip() == "error: --pairs holds criteria facts, style: choose one with --criterion"
    assert cli.main(["rate", "--model", str(tmp_path), "--input", str(path), "--out", "o.jsonl"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}: not a rating model (a run of task rater or edu)"
    assert cli.main(["train-edu", "--config", "configs/tiny.yaml", "--annotations", str(tmp_path / "none.jsonl"),
                     "--out", "x"]) == 2
    assert capsys.readouterr().err.strip() == f"error: --annotations {tmp_path / 'none.jsonl'}: no such file"
