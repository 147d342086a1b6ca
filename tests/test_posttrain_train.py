"""Post-training tasks through the shared loop (`jaxllm.train.train`): resume is exact for SFT,
cached reference log-probs train exactly like a live reference, DPO starts at log 2, LoRA
trains only adapters under DPO, a reward model learns, and each stage keeps its tokenizer."""

import filecmp
import json
import math
import os
import shutil

import jax
import numpy as np
import pytest

from jaxllm.config import Config, build
from jaxllm.data import synthetic
from jaxllm.data.tokenizer import train_sentencepiece
from jaxllm.train import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("posttrain")
    files = synthetic.write(str(root / "data"), seed=0, n_train=400, n_eval=32)
    texts = [r["text"] for r in synthetic.read_jsonl(str(root / "data" / "pretrain.jsonl"))]
    sp = train_sentencepiece(texts * 4, 384, str(root / "sp"))
    return {"root": root, "dir": root / "data", "tokenizer": sp, "files": files}


def _cfg(data, task, run_dir, steps=8, **sections):
    d = data["dir"]
    split = {"sft": "sft", "dpo": "pref", "reward": "pref"}[task]
    raw = {
        "task": task,
        "model": {"vocab_size": 384, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128,
                  "dtype": "float32", "max_seq_len": 128, **sections.pop("model", {})},
        "data": {"train": [str(d / f"{split}_train.jsonl")], "eval": [str(d / f"{split}_eval.jsonl")],
                 "tokenizer": data["tokenizer"], "seq_len": 64},
        "sft": {"template": "tulu", **sections.pop("sft", {})},
        "optimizer": {"lr": 3e-3, "weight_decay": 0.0},
        "schedule": {"name": "linear", "warmup_steps": 1},
        "trainer": {"total_steps": steps, "batch_size": 8, "run_dir": str(run_dir), "eval_every_steps": steps,
                    "eval_batches": 2, "sample_tokens": 0, "seed": 3, **sections.pop("trainer", {})},
        "checkpoint": {"every_steps": 4, "keep": 3, "async_save": False},
        "logging": {"every_steps": 1, "progress_bar": False, "tensorboard": False},
        **sections,
    }
    return build(Config, raw)


@pytest.fixture(scope="module")
def sft_run(data):
    """A short SFT run that DPO, LoRA and evaluation tests start from (read only)."""
    run = data["root"] / "sft-base"
    train(_cfg(data, "sft", run, steps=6))
    return run


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_sft_resume_equals_uninterrupted(data, tmp_path):
    cfg = _cfg(data, "sft", tmp_path / "sft")
    summary = train(cfg)
    full = _losses(cfg.trainer.run_dir)
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 0.5
    # Drop the last checkpoint and the steps after step 4: the rerun resumes at 4.
    shutil.rmtree(os.path.join(cfg.trainer.run_dir, "checkpoints", "8"))
    resumed = train(cfg)
    assert resumed["start_step"] == 4
    again = _losses(cfg.trainer.run_dir)
    for step in range(5, 9):
        assert again[step] == full[step], step
    # The run keeps a copy of its tokenizer.
    assert filecmp.cmp(os.path.join(cfg.trainer.run_dir, "tokenizer.model"), data["tokenizer"], shallow=False)


def test_dpo_cached_reference_equals_live_and_starts_at_log2(data, sft_run, tmp_path):
    runs = {}
    for ref in ("cached", "live"):
        cfg = _cfg(data, "dpo", tmp_path / f"dpo-{ref}", steps=4, model={"init_from": str(sft_run)},
                   preference={"loss_type": "sigmoid", "beta": 0.5, "reference": ref})
        runs[ref] = (train(cfg), _losses(cfg.trainer.run_dir))
    (s_c, l_c), (_, l_l) = runs["cached"], runs["live"]
    assert s_c["initial_eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    np.testing.assert_allclose([l_c[s] for s in range(1, 5)], [l_l[s] for s in range(1, 5)], rtol=1e-5)
    assert os.path.exists(tmp_path / "dpo-cached" / "reference_logps" / "train.npz")
    assert not os.path.exists(tmp_path / "dpo-live" / "reference_logps")
    # DPO carries on with the SFT run's tokenizer (data.tokenizer: auto would find it too).
    assert s_c["final_eval"]["eval_rewards/margins"] > 0


def test_lora_dpo_uses_the_base_as_reference(data, sft_run, tmp_path):
    cfg = _cfg(data, "dpo", tmp_path / "lora-dpo", steps=6, model={"init_from": str(sft_run)},
               preference={"loss_type": "sigmoid", "beta": 0.5, "reference": "live"},
               lora={"rank": 4, "alpha": 16.0, "targets": ["wq", "wv", "w_up", "w_down"]},
               optimizer={"lr": 2e-2, "weight_decay": 0.0})
    summary = train(cfg)
    assert summary["initial_eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert summary["final_eval"]["eval_rewards/accuracies"] > 0.5
    assert summary["final_eval_loss"] < math.log(2)


def test_reward_model_learns_and_starts_at_log2(data, tmp_path):
    # Half an epoch (trainer.epochs): the run counts the batches of one pass and trains half of them.
    cfg = _cfg(data, "reward", tmp_path / "rm", optimizer={"lr": 3e-3, "weight_decay": 0.0},
               trainer={"eval_every_steps": 24, "epochs": 0.5})
    summary = train(cfg)
    assert summary["initial_eval_loss"] == pytest.approx(math.log(2), abs=1e-6)  # zero head: r_c = r_r
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]
    assert summary["final_eval"]["eval_accuracy"] > 0.5
    from jaxllm.config import load_config
    from jaxllm.data import posttrain
    from jaxllm.data.tokenizer import Tokenizer

    per_epoch = posttrain.batches_per_epoch(cfg, Tokenizer(data["tokenizer"]), "pairs")["batches"]
    saved = load_config(str(tmp_path / "rm" / "config.yaml")).trainer
    assert per_epoch > 24 and (saved.epochs, saved.total_steps) == (0, math.ceil(per_epoch / 2))
    assert max(_losses(cfg.trainer.run_dir)) == saved.total_steps


def test_evaluate_preference_accuracy_matches_a_direct_forward(data, sft_run, tmp_path):

    from jaxllm.run import load_run
    from jaxllm.data.preference_data import PromptCompletionEncoder
    from jaxllm.data.tokenizer import run_tokenizer
    from jaxllm.evaluate import evaluate_run
    from jaxllm.models import forward

    run = sft_run
    lines = (data["dir"] / "pref_eval.jsonl").read_text().splitlines()[:32]
    pairs = str(tmp_path / "pairs.jsonl")
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    got = evaluate_run(str(run), pairs=pairs)
    cfg, params = load_run(str(run))
    tok = run_tokenizer(cfg, str(run))
    enc = PromptCompletionEncoder(tok, cfg.sft.template, seq_len=cfg.data.seq_len, add_bos=cfg.data.add_bos)

    # One compiled forward over rows padded at the end: causal, so padding changes no real position.
    L = cfg.data.seq_len
    fwd = jax.jit(lambda x: forward(cfg.model, params, x))

    def logp(prompt, reply):
        p, c = enc(prompt, reply)
        ids = np.concatenate([p, c])
        assert len(ids) - 1 <= L
        padded = np.zeros((1, L), np.int32)
        padded[0, :len(ids) - 1] = ids[:-1]
        logits = np.asarray(fwd(padded), np.float64)[0, :len(ids) - 1]
        logprobs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        return sum(logprobs[len(p) - 1 + j, t] for j, t in enumerate(c))

    records = synthetic.read_jsonl(pairs)
    margins = [logp(r["chosen"][:-1], r["chosen"][-1]["content"]) - logp(r["rejected"][:-1], r["rejected"][-1]["content"])
               for r in records]
    assert got["n_pairs"] == len(records)
    assert got["preference_accuracy"] == pytest.approx(np.mean(np.asarray(margins) > 0))
    assert got["logp_margin"] == pytest.approx(np.mean(margins), rel=1e-4, abs=1e-4)
    assert set(got["preference_accuracy_by_task"]) == {r["task"] for r in records}
