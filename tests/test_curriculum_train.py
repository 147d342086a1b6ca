"""A curriculum through the train loop: stages switch at their steps (row shape and RoPE theta),
resume across a switch equals the uninterrupted run, and the saved model is the last stage's."""

import json
import os
import shutil

from jaxllm.run import load_run
from jaxllm.config import load_config
from jaxllm.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(run_dir, cache):
    stages = ("[{name: a, weights: {modules: 0.8, packages: 0.2}},"
              " {name: b, start_step: 4, weights: {modules: 0.3, packages: 0.7}},"
              " {name: c, start_step: 8, weights: {modules: 1, packages: 1}, seq_len: 64, batch_size: 8,"
              " rope_theta: 40000.0}]")
    return load_config(os.path.join(ROOT, "configs/recipes/tiny-3stage.yaml"), [
        f"trainer.run_dir={run_dir}", "trainer.total_steps=12", "trainer.batch_size=16", "trainer.eval_every_steps=12",
        "trainer.eval_batches=1", "trainer.sample_tokens=0", "data.seq_len=32", "model.max_seq_len=64",
        "model.vocab_size=512", f"data.tokenizer_cache_dir={cache}", f"data.stages={stages}",
        "checkpoint.every_steps=4", "checkpoint.keep=5", "checkpoint.async_save=false", "mesh.cpu_devices=0",
        "schedule.warmup_steps=2", "logging.every_steps=1", "logging.progress_bar=false", "logging.tensorboard=false"])


def _rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, filter(str.strip, f)) if "loss" in r}


def test_stages_switch_and_resume_across_a_switch_is_exact(tmp_path):
    cfg = _cfg(tmp_path / "run", tmp_path / "tok")
    train(cfg)
    full = _rows(cfg.trainer.run_dir)
    # A step's logged data stats are the iterator's, one batch ahead: step s shows batch s's stage.
    assert [full[s]["stage"] for s in (3, 4, 7, 8, 11)] == [0, 1, 1, 2, 2]
    # Drop the checkpoints from step 8 on: resume at 4, through the switch at 8.
    for d in ("8", "12"):
        shutil.rmtree(os.path.join(cfg.trainer.run_dir, "checkpoints", d))
    summary = train(cfg)
    assert summary["start_step"] == 4
    again = _rows(cfg.trainer.run_dir)
    for step in range(5, 13):
        assert again[step]["loss"] == full[step]["loss"], step
        assert again[step]["frac/modules"] == full[step]["frac/modules"], step
    loaded_cfg, _ = load_run(cfg.trainer.run_dir)
    assert loaded_cfg.model.rope_theta == 40000.0  # the last stage's model
    assert cfg.model.rope_theta != 40000.0
