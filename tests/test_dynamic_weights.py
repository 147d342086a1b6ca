"""Dynamic batch loading (data.dynamic_weights): the update formula, the mixture's weight
segments (exact sources after a change, exact resume), and a pretraining run whose logged
weights follow the formula from its own logged per-source eval losses and continue exactly after
a resume."""

import json
import os
import shutil

import numpy as np
import pytest

from jaxllm.config import Config, ConfigError, build, load_config, validate
from jaxllm.data import curriculum, mixture
from jaxllm.data.pipeline import make_train_iterator
from jaxllm.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_update_follows_the_sheared_llama_formula():
    rng = np.random.default_rng(0)
    for _ in range(20):
        k = int(rng.integers(2, 6))
        w = rng.dirichlet(np.ones(k))
        losses, ref = rng.uniform(1, 4, k), rng.uniform(1, 4, k)
        got = curriculum.dynamic_weights_update(w, losses, ref)
        # alpha_i = log w_i + max(l_i - r_i, 0); w_i' = exp(alpha_i) / sum_j exp(alpha_j)
        want = np.array([wi * np.exp(max(li - ri, 0.0)) for wi, li, ri in zip(w, losses, ref)])
        np.testing.assert_allclose(got, want / want.sum(), rtol=1e-12)
    # Below every reference: unchanged; a source at 0 stays at 0; unnormalised input is normalised.
    np.testing.assert_allclose(curriculum.dynamic_weights_update([2, 6], [1, 1], [3, 3]), [0.25, 0.75])
    np.testing.assert_array_equal(curriculum.dynamic_weights_update([0, 1, 1], [9, 1, 1], [0, 0, 0])[0], 0.0)


# ----------------------------------------------------------------------------- the mixture's segments


class IntTokenizer:
    bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 100_000

    def encode(self, text):
        return [int(t) for t in text.split()]


def _corpus(root):
    """Two sources whose token values name them: a (100000 + ...) and b (200000 + ...)."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(("a", "b")):
        for split, n in (("train", 200), ("eval", 4)):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            with open(root / split / name / "docs.jsonl", "w") as f:
                for i in range(n):
                    ids = [100000 * (k + 1) + 100 * i + j for j in range(int(rng.integers(3, 30)))]
                    f.write(json.dumps({"text": " ".join(map(str, ids))}) + "\n")


def _mix_cfg(root, every=4, stages=None, **dw):
    stages = stages or [{"weights": {"a": 1, "b": 1}}]
    raw = {"data": {"sources": [{"name": n, "train": [str(root / "train" / n)], "eval": [str(root / "eval" / n)]}
                                for n in ("a", "b")],
                    "stages": stages, "seq_len": 16, "tokenizer": "unused",
                    "dynamic_weights": {"every_steps": every, "reference_losses": {"a": 1.0, "b": 1.0}, **dw}},
           "trainer": {"batch_size": 8}}
    cfg = build(Config, raw)
    validate(cfg)
    return cfg


def _sources(batch):
    return (np.maximum(batch["tokens"].max(axis=1), batch["targets"].max(axis=1)) // 100000 - 1).tolist()


@pytest.fixture()
def mix_root(tmp_path, monkeypatch):
    monkeypatch.setattr(mixture, "ROW_SHUFFLE_TOKENS", 64 * 16)
    _corpus(tmp_path)
    return tmp_path


def _run(it, steps, plan):
    """Batches of `steps` steps, calling set_weights(plan[step]) where the plan has an entry."""
    out = []
    while it.step < steps:
        if it.step in plan:
            assert it.weight_update_due
            it.set_weights(plan[it.step])
        out.append(next(it))
    return out


def test_new_weights_take_over_exactly_at_the_update_and_resume_exactly(mix_root):
    stages = [{"weights": {"a": 1, "b": 1}}, {"start_step": 10, "weights": {"a": 3, "b": 1}}]
    cfg = _mix_cfg(mix_root, every=4, stages=stages)
    plan = {4: [1, 0], 8: [0, 1], 12: [0.5, 0.5]}
    it = make_train_iterator(cfg, IntTokenizer(), process_index=0, process_count=1)
    with pytest.raises(ValueError, match="does not start a dynamic-weights segment"):
        it.set_weights([1, 0])  # step 0: the first segment has begun
    want = _run(it, 16, plan)
    assert {s for b in want[4:8] for s in _sources(b)} == {0}  # only a after [1, 0]
    assert {s for b in want[8:10] for s in _sources(b)} == {1}  # only b after [0, 1] ...
    assert {s for b in want[10:12] for s in _sources(b)} == {0, 1}  # ... until stage 1 resets to 3:1
    assert it.weights == (0.5, 0.5) and it.stats()["weight/a"] == 0.5
    for cut in (3, 4, 6, 8, 11):
        it = make_train_iterator(cfg, IntTokenizer(), process_index=0, process_count=1)
        _run(it, cut, plan)
        state = json.loads(json.dumps(it.get_state()))
        again = make_train_iterator(cfg, IntTokenizer(), process_index=0, process_count=1)
        again.set_state(state)
        if cut == 11:
            assert again.weights == (0.75, 0.25)
        got = _run(again, 16, {s: w for s, w in plan.items() if s >= cut})
        for x, y in zip(got, want[cut:], strict=True):
            for k in x:
                np.testing.assert_array_equal(x[k], y[k])
    with pytest.raises(ValueError, match="need 2 finite weights"):
        again = make_train_iterator(cfg, IntTokenizer(), process_index=0, process_count=1)
        _run(again, 4, {})
        again.set_weights([1, -1])


def test_without_updates_the_mixture_is_unchanged_and_off_is_the_plain_mixture(mix_root):
    """Segments without new weights keep the weights (new shuffle windows only), and every_steps
    0 gives exactly the iterator without dynamic weights."""
    cfg = _mix_cfg(mix_root, every=4)
    it = make_train_iterator(cfg, IntTokenizer(), process_index=0, process_count=1)
    _run(it, 12, {})
    assert it.weights == (0.5, 0.5)
    off = _mix_cfg(mix_root, every=0, reference_losses={})
    plain = build(Config, {"data": {**{k: v for k, v in json.loads(json.dumps(
        {"sources": [{"name": n, "train": [str(mix_root / "train" / n)], "eval": [str(mix_root / "eval" / n)]}
                     for n in ("a", "b")]})).items()}, "stages": [{"weights": {"a": 1, "b": 1}}], "seq_len": 16,
        "tokenizer": "unused"}, "trainer": {"batch_size": 8}})
    a = make_train_iterator(off, IntTokenizer(), process_index=0, process_count=1)
    b = make_train_iterator(plain, IntTokenizer(), process_index=0, process_count=1)
    for _ in range(6):
        x, y = next(a), next(b)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert a.get_state() == b.get_state() and "weight/a" not in a.stats()


@pytest.mark.parametrize("dw, sources, message", [
    ({"every_steps": 5, "reference_losses": {"a": 1.0}}, ("a", "b"), "no reference loss for source 'b'"),
    ({"every_steps": 5, "reference_losses": {"a": 1.0, "b": 1.0, "c": 2.0}}, ("a", "b"),
     "data.dynamic_weights.reference_losses.c: no such source"),
    ({"every_steps": 5, "reference_losses": {"a": 1.0}}, ("a",), "at least two sources"),
    ({"every_steps": 0, "reference_losses": {"a": 1.0}}, ("a", "b"), "every_steps is 0"),
    ({"every_steps": -1}, ("a", "b"), "every_steps must be >= 0"),
    ({"every_steps": 5, "reference_losses": {"a": -1.0, "b": 1.0}}, ("a", "b"), "reference_losses.a must be"),
    ({"every_steps": 5, "reference_losses": {"a": 1.0, "b": 1.0}}, ("a", "noeval"),
     "data.sources[1].eval: data.dynamic_weights measures every source's held-out loss; source 'noeval'"),
])
def test_config_errors_name_the_key(dw, sources, message):
    raw = {"data": {"sources": [{"name": n, "train": ["x.jsonl"], "eval": [] if n == "noeval" else ["y.jsonl"]}
                                for n in sources],
                    "stages": [{"weights": {n: 1 for n in sources}}],
                    "dynamic_weights": {**dw, "reference_losses": {
                        ("noeval" if k == "b" and "noeval" in sources else k): v
                        for k, v in dw.get("reference_losses", {}).items()}}}}
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        validate(build(Config, raw))


# ----------------------------------------------------------------------------- through the train loop


WORDS = "the cat sat on a mat and then it ran to see my dog by the red door".split()


def _text_corpus(root):
    rng = np.random.default_rng(1)
    for name in ("prose", "noise"):
        for split, n in (("train", 60), ("eval", 6)):
            os.makedirs(root / split, exist_ok=True)
            with open(root / split / f"{name}.jsonl", "w") as f:
                for _ in range(n):
                    if name == "prose":
                        text = " ".join(WORDS[(i * 3) % len(WORDS)] for i in range(int(rng.integers(20, 60))))
                    else:
                        text = " ".join("".join(rng.choice(list("qxzjkvwy"), 3)) for _ in range(30))
                    f.write(json.dumps({"text": text}) + "\n")


def _train_cfg(root, run_dir):
    sources = ("[{name: prose, train: [" + str(root / "train/prose.jsonl") + "], eval: ["
               + str(root / "eval/prose.jsonl") + "]}, {name: noise, train: [" + str(root / "train/noise.jsonl")
               + "], eval: [" + str(root / "eval/noise.jsonl") + "]}]")
    return load_config(os.path.join(ROOT, "configs/tiny.yaml"), [
        f"trainer.run_dir={run_dir}", "trainer.total_steps=9", "trainer.batch_size=8", "trainer.eval_every_steps=3",
        "trainer.eval_batches=1", "trainer.sample_tokens=0", "data.seq_len=32", "model.max_seq_len=32",
        "model.vocab_size=320", "model.d_model=32", "model.n_layers=1", "model.d_ff=64", "model.n_heads=2",
        "model.n_kv_heads=1", f"data.train=[{root}/train]", f"data.tokenizer_cache_dir={root}/tok",
        f"data.sources={sources}", "data.stages=[{weights: {prose: 1, noise: 1}}]",
        "data.dynamic_weights={every_steps: 3, reference_losses: {prose: 2.5, noise: 4.0}}",
        "checkpoint.every_steps=6", "checkpoint.keep=5", "checkpoint.async_save=false", "mesh.cpu_devices=0",
        "schedule.warmup_steps=1", "optimizer.lr=0.01", "logging.every_steps=1", "logging.progress_bar=false",
        "logging.tensorboard=false"])


def _rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_a_run_reweights_by_its_held_out_losses_and_resumes_with_the_same_weights(tmp_path):
    _text_corpus(tmp_path)
    cfg = _train_cfg(tmp_path, tmp_path / "run")
    train(cfg)
    rows = _rows(cfg.trainer.run_dir)
    evals = {r["step"]: r for r in rows if "eval_loss/prose" in r}
    steps = {r["step"]: r for r in rows if "loss" in r}
    ref = np.array([2.5, 4.0])
    w = np.array([0.5, 0.5])
    for update in (3, 6):
        # The update at step s uses the params after step s, as the eval logged at s (same batches).
        losses = np.array([evals[update]["eval_loss/prose"], evals[update]["eval_loss/noise"]])
        w = w * np.exp(np.maximum(losses - ref, 0))
        w /= w.sum()
        # Step s's row shows the batch made after it: the first one drawn by the new weights.
        got = np.array([steps[update]["weight/prose"], steps[update]["weight/noise"]])
        np.testing.assert_allclose(got, w, rtol=1e-5)
        np.testing.assert_allclose([steps[update]["dynamic_loss/prose"], steps[update]["dynamic_loss/noise"]],
                                   losses, rtol=1e-5)
        assert steps[update]["dynamic_step"] == update
    assert steps[2]["weight/prose"] == 0.5 and w[0] != 0.5
    # Resume from step 6, before its update: it starts from the restored weights of step 3's.
    full = steps
    shutil.rmtree(os.path.join(cfg.trainer.run_dir, "checkpoints", "9"))
    assert train(cfg)["start_step"] == 6
    again = {r["step"]: r for r in _rows(cfg.trainer.run_dir) if "loss" in r}
    for s in range(7, 10):
        for key in ("loss", "weight/prose", "weight/noise", "dynamic_loss/noise", "frac/prose"):
            assert again[s][key] == full[s][key], (s, key)
