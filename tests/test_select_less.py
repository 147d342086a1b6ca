"""LESS: the random projection keeps inner products within Johnson-Lindenstrauss bounds; the
Adam-preconditioned direction is optax's first update for the example alone and the features
are its projection; in a pool of seven synthetic task types, the top 10% for a target set of one
type are mostly of that type; pool features are stored and reused for another target; bad input
is a one-line error."""

import collections
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm.config import Config, build, load_config
from jaxllm.data import synthetic
from jaxllm.data.tokenizer import train_sentencepiece
from jaxllm.parallel.mesh import make_mesh
from jaxllm.select import cli
from jaxllm.select.grads import FeatureFunction, adam_direction, find_adam_state
from jaxllm.select.projection import project
from jaxllm.train import Trainer, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_projection_preserves_inner_products_within_jl_bounds():
    rng = np.random.default_rng(0)
    P, dims = 3000, 1024
    x = rng.normal(size=(24, P)).astype(np.float32)
    x[:12] += 0.5 * x[12:]  # correlated pairs: inner products far from 0
    y = np.asarray(jax.jit(project, static_argnums=(1, 2))(x, 7, dims), np.float64)
    gram, want = y @ y.T, x.astype(np.float64) @ x.T.astype(np.float64)
    norms = np.linalg.norm(x, axis=1)
    err = np.abs(gram - want) / np.outer(norms, norms)
    assert err.max() < 5 / np.sqrt(dims)  # JL: |<Ru, Rv> - <u, v>| <~ eps |u| |v|, eps ~ 1/sqrt(dims)
    assert 0.5 / np.sqrt(dims) < err[np.triu_indices(24, 1)].std() < 2 / np.sqrt(dims)  # and not better
    # The same seed gives the same projection (blocks do not depend on P); another seed another.
    padded = np.pad(x, ((0, 0), (0, 500)))
    np.testing.assert_allclose(np.asarray(project(padded, 7, dims)), y, rtol=1e-5, atol=1e-4)
    assert not np.allclose(np.asarray(project(x, 8, dims)), y, atol=1e-2)


@pytest.fixture(scope="module")
def warm_run(tmp_path_factory):
    """A LoRA SFT warm-up run on 20% of a pool of the synthetic tasks (50 of each of 7 types)."""
    root = tmp_path_factory.mktemp("less")
    data = synthetic.generate(seed=0, n_train=350, n_eval=70)
    pool, held = data["sft_train.jsonl"], data["sft_eval.jsonl"]
    for i, r in enumerate(pool):
        r["id"] = f"pool-{i}"
    write = lambda name, rs: (root / name).write_text("".join(json.dumps(r) + "\n" for r in rs))
    write("pool.jsonl", pool)
    assert cli.main(["sample", "--input", str(root / "pool.jsonl"), "--fraction", "0.2", "--out",
                     str(root / "warm.jsonl")]) == 0
    warm = [json.loads(line) for line in open(root / "warm.jsonl")]
    assert len(warm) == 70 and len({r["id"] for r in warm}) == 70  # records unchanged, in pool order
    assert [int(r["id"][5:]) for r in warm] == sorted(int(r["id"][5:]) for r in warm)
    for task in ("upper", "sort"):
        write(f"target-{task}.jsonl", [r for r in held if r["task"] == task])
    texts = [m["content"] for r in pool for m in r["messages"]]
    tok = train_sentencepiece(iter(texts * 3), 384, str(root / "sp"))
    cfg = load_config(os.path.join(ROOT, "configs/tiny.yaml"), [
        "task=sft", f"data.train=[{root}/warm.jsonl]", f"data.eval=[{root}/warm.jsonl]", f"data.tokenizer={tok}",
        "sft.template=tulu", "sft.packing=false", "data.seq_len=64", "model.max_seq_len=64", "model.vocab_size=384",
        "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=64",
        "lora.rank=4", "trainer.total_steps=6", "trainer.batch_size=16", "trainer.eval_every_steps=100",
        "trainer.eval_batches=1", f"trainer.run_dir={root}/warm", "schedule.name=linear", "schedule.warmup_steps=1",
        "optimizer.lr=0.01", "checkpoint.every_steps=3", "checkpoint.async_save=false", "logging.progress_bar=false",
        "logging.tensorboard=false", "logging.every_steps=100", "mesh.cpu_devices=0"])
    train(cfg)
    return root, cfg.trainer.run_dir, pool


def test_adam_direction_is_optax_first_update_and_features_are_its_projection():
    """On a LoRA SFT model with a planted Adam state (count 4, random moments, nested as in the
    run's optax.chain): per-example gradients are those of each row's own loss, Gamma is the
    update optax's scale_by_adam makes for that gradient alone, the feature its projection."""
    cfg = build(Config, {"task": "sft", "model": {"vocab_size": 64, "d_model": 16, "n_layers": 1, "n_heads": 2,
                                                  "n_kv_heads": 1, "d_ff": 32, "dtype": "float32"},
                         "lora": {"rank": 2}, "data": {"seq_len": 12}, "optimizer": {"b1": 0.8, "b2": 0.9}})
    trainer = Trainer(cfg, make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    rng = np.random.default_rng(0)
    shapes = trainer.abstract_state  # planted numpy trees of the state's shapes: nothing to compile
    planted = lambda tree, scale: jax.tree.map(lambda x: (rng.normal(size=x.shape) * scale).astype(np.float32), tree)
    params, frozen = planted(shapes.params, 0.3), planted(shapes.frozen, 0.1)
    adam = optax.ScaleByAdamState(count=np.int32(4), mu=planted(shapes.params, 1e-2),
                                  nu=jax.tree.map(np.abs, planted(shapes.params, 1e-3)))
    state = shapes.replace(params=params, opt_state=(optax.EmptyState(), (adam, optax.EmptyState())))
    T = 12
    batch = {"tokens": rng.integers(3, 64, (4, T)).astype(np.int32), "targets": rng.integers(3, 64, (4, T)).astype(
        np.int32), "positions": np.tile(np.arange(T, dtype=np.int32), (4, 1)), "segment_ids": np.ones((4, T), np.int32),
        "loss_mask": (rng.uniform(size=(4, T)) > 0.4).astype(np.float32), "ul_mask": np.zeros((4, T), np.float32)}
    assert find_adam_state(state.opt_state) is adam
    one = {k: v[2:3] for k, v in batch.items()}

    def loss(p):  # row 2's own loss: the mean over its loss tokens
        s, aux = trainer.task.objective.loss(trainer.task.effective_params(p, frozen), one)
        return s / aux["weight"]

    g2 = jax.jit(jax.grad(loss))(state.params)
    o = cfg.optimizer
    want = jax.jit(lambda g, a: optax.scale_by_adam(o.b1, o.b2, o.eps).update(g, a)[0])(g2, adam)
    got = jax.jit(adam_direction, static_argnums=(2, 3, 4))(g2, adam, o.b1, o.b2, o.eps)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)
    # The vmapped feature of row 2 is the projection of that direction (leaves in tree order).
    feats = np.asarray(FeatureFunction(trainer, "adam", 256, 3)(state, frozen, batch))
    flat = jnp.concatenate([x.reshape(-1) for x in jax.tree.leaves(want)])[None]
    np.testing.assert_allclose(feats[2], np.asarray(project(flat, 3, 256))[0], rtol=1e-4, atol=1e-5)


def test_top_ten_percent_are_mostly_the_target_task_and_features_are_reused(warm_run, capsys):
    root, run_dir, pool = warm_run
    share = {t: c / len(pool) for t, c in collections.Counter(r["task"] for r in pool).items()}
    reports = {}
    for task in ("upper", "sort"):
        out = root / f"selected-{task}.jsonl"
        assert cli.main(["less", "--train", str(root / "pool.jsonl"), "--target", str(root / f"target-{task}.jsonl"),
                         "--checkpoints", run_dir, "--fraction", "0.1", "--dims", "512", "--batch-size", "32",
                         "--out", str(out), "mesh.cpu_devices=0"]) == 0
        selected = [json.loads(line) for line in open(out)]
        assert len(selected) == 35
        precision = np.mean([r["task"] == task for r in selected])
        # Pool share 1/7; measured 0.69 (upper, whose prompts resemble reverse's) and 0.97 (sort).
        assert precision >= 0.6 and precision > 4 * share[task], (task, precision)
        assert set(selected[0]) == {"messages", "negative", "task", "answer", "id"}  # records unchanged
        reports[task] = json.load(open(f"{out}.report.json"))
    first, second = reports["upper"], reports["sort"]
    assert [c["step"] for c in first["checkpoints"]] == [3, 6]
    assert first["checkpoints"][0]["lr"] > first["checkpoints"][1]["lr"] > 0  # linear decay
    # The pool's Adam features were computed once, for the first target, and reused for the second.
    pool_files = lambda r: [(f["path"], f["reused"]) for f in r["features"] if f["kind"] == "adam"]
    assert [p for p, _ in pool_files(first)] == [p for p, _ in pool_files(second)]
    assert [u for _, u in pool_files(first)] == [False, False] and [u for _, u in pool_files(second)] == [True, True]
    assert "less: 35 of 350 scored examples" in capsys.readouterr().out


def test_bad_input_is_one_line(warm_run, tmp_path, capsys):
    root, run_dir, _ = warm_run
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    unusable = tmp_path / "unusable.jsonl"
    unusable.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    base = ["less", "--train", str(root / "pool.jsonl"), "--checkpoints", run_dir, "--out", str(tmp_path / "o.jsonl"),
            "mesh.cpu_devices=0"]
    for target, message in [(empty, f"error: --target {empty}: no records"),
                            (unusable, f"error: --target {unusable}: no example the run's template can use")]:
        assert cli.main([*base, "--target", str(target)]) == 2
        assert capsys.readouterr().err.strip().startswith(message)
    assert cli.main([*base, "--target", str(root / "target-upper.jsonl"), "--fraction", "1.5"]) == 2
    assert "--fraction must be in (0, 1]" in capsys.readouterr().err
