"""The golden runs: the tiny pretraining config for 40 steps, then the tiny recipe's SFT and DPO
stages for a few steps each from it, all through `python -m jaxllm.train`.

`python tests/golden/runs.py --write` records their metrics.jsonl (without wall-clock fields) as
`tests/golden/*.jsonl`; `tests/test_golden.py` reruns them and requires the same numbers (counts
exactly, floats to float rounding, which differs between CPU instruction sets), so a refactor
that changes any computation shows up here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
RECIPE = os.path.join(ROOT, "configs", "recipes", "tiny-recipe")
WALL_CLOCK = ("step_time_s", "tokens_per_s", "mfu")
COMMON = ("logging.progress_bar=false", "logging.tensorboard=false", "logging.every_steps=1")


def _train(config: str, *overrides: str, env: dict) -> None:
    cmd = [sys.executable, "-m", "jaxllm.train", "--config", config, *COMMON, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in rows]


def run_all(work: str) -> dict[str, list[dict]]:
    """Runs the three golden runs under `work`; returns their metrics rows by name."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # tiny.yaml asks for 2 CPU devices itself (mesh.cpu_devices)
    data = os.path.join(work, "data")
    subprocess.run([sys.executable, "-m", "jaxllm.data.synthetic", "--out", data, "--n-train", "600",
                    "--n-eval", "40"], cwd=ROOT, env=env, check=True, capture_output=True)
    runs = {name: os.path.join(work, name) for name in ("pretrain", "sft", "dpo")}
    _train("configs/tiny.yaml", "trainer.total_steps=40", "trainer.eval_every_steps=20",
           "checkpoint.every_steps=20", f"trainer.run_dir={runs['pretrain']}",
           f"data.tokenizer_cache_dir={work}/tok", env=env)
    _train(f"{RECIPE}/sft.yaml", f"model.init_from={runs['pretrain']}", f"data.train=[{data}/sft_train.jsonl]",
           f"data.eval=[{data}/sft_eval.jsonl]", "trainer.total_steps=8", "trainer.eval_every_steps=4",
           "trainer.eval_batches=2", "checkpoint.every_steps=4", f"trainer.run_dir={runs['sft']}", env=env)
    _train(f"{RECIPE}/dpo.yaml", f"model.init_from={runs['sft']}", f"data.train=[{data}/pref_train.jsonl]",
           f"data.eval=[{data}/pref_eval.jsonl]", "trainer.total_steps=6", "trainer.eval_every_steps=3",
           "trainer.eval_batches=1", "checkpoint.every_steps=3", f"trainer.run_dir={runs['dpo']}", env=env)
    return {name: metrics(run_dir) for name, run_dir in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="record the golden files")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        results = run_all(work)
    for name, rows in results.items():
        print(name, rows[-1])
        if args.write:
            with open(os.path.join(HERE, f"{name}.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
