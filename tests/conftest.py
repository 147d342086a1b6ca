"""Test-wide setup: 8 fake CPU devices (set before JAX starts) for the sharding tests, and one
compilation cache for the whole session."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Most of the suite's time is XLA compiling the same small programs again: in the resume,
# multi-process and CLI tests every subprocess compiles what the run before it compiled. One
# cache per pytest session (made by the first process to load this file, inherited by xdist
# workers and subprocesses through the environment, removed at its exit) compiles each once.
# A bounded size turns on JAX's file lock, so concurrent workers never read a half-written entry.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="jaxllm-test-jit-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(4 << 30)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # default 1 s skips most of ours

import json
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 24


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A short real run (tokenizer, data, checkpoints) shared by the CLI and resume tests."""
    base = tmp_path_factory.mktemp("resume")
    corpus = base / "corpus"
    corpus.mkdir()
    stdlib = sysconfig.get_paths()["stdlib"]
    for name in ("textwrap.py", "bisect.py", "colorsys.py", "keyword.py", "heapq.py", "shlex.py", "fnmatch.py"):
        shutil.copy(os.path.join(stdlib, name), corpus / name)
    (base / "cfg.yaml").write_text(f"""
model: {{vocab_size: 512, d_model: 32, n_layers: 2, n_heads: 2, n_kv_heads: 1, d_ff: 64, dtype: float32}}
data: {{train: ["{corpus}"], eval: ["{corpus}/heapq.py"], seq_len: 32,
        tokenizer_cache_dir: "{base}/tok"}}
schedule: {{warmup_steps: 2}}
trainer: {{total_steps: {TOTAL}, batch_size: 4, eval_every_steps: 1000, eval_batches: 1, sample_tokens: 0}}
checkpoint: {{every_steps: 4, keep: 2}}
logging: {{every_steps: 1, progress_bar: false, tensorboard: true}}
""")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    ref_dir = base / "ref"
    train_run(base, ref_dir, env)
    return base, env, ref_dir


def train_cmd(base, run_dir, *extra):
    return [sys.executable, "-m", "jaxllm.train", "--config", str(base / "cfg.yaml"),
            f"trainer.run_dir={run_dir}", *extra]


def train_run(base, run_dir, env, *extra):
    proc = subprocess.run(train_cmd(base, run_dir, *extra), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


