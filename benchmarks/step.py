"""Train-step throughput: `python -m benchmarks.step --config configs/smollm2-1.7b.yaml [a.b=c ...]`

Times the jitted train step on random tokens (the data pipeline is measured by its own
benchmark), and prints tokens/s, step time, peak device memory and MFU as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np

from benchmarks.common import config_arg_parser, environment, write_results
from jaxllm.metrics import peak_tflops_per_device
from jaxllm.parallel.mesh import mesh_from_config
from jaxllm.train import Trainer, configure


def random_batch(cfg, rng) -> dict:
    B = cfg.trainer.batch_size // jax.process_count()
    T = cfg.data.seq_len
    toks = rng.integers(0, cfg.model.vocab_size, (B, T + 1), dtype=np.int32)
    return {"tokens": toks[:, :-1], "targets": toks[:, 1:],
            "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
            "segment_ids": np.ones((B, T), np.int32), "loss_mask": np.ones((B, T), np.float32)}


def main(argv=None) -> int:
    ap = config_arg_parser("benchmarks.step", __doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps after warm-up")
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    cfg = configure(args.config, args.overrides)
    if cfg is None:
        return 2
    trainer = Trainer(cfg, mesh_from_config(cfg.mesh))
    state = trainer.fresh_state()
    batch = trainer.to_global(random_batch(cfg, np.random.default_rng(0)))

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        state, m = trainer.train_step(state, batch)
    jax.block_until_ready(m)
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, m = trainer.train_step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)

    step_s = float(np.median(times))
    tokens = cfg.trainer.batch_size * cfg.data.seq_len
    flops = cfg.model.flops_per_token(cfg.data.seq_len) * tokens
    peak = peak_tflops_per_device(cfg.logging.peak_tflops_per_device)
    stats = jax.devices()[0].memory_stats() or {}
    result = {
        "config": args.config, "overrides": args.overrides, "params": cfg.model.num_params(),
        "batch_size": cfg.trainer.batch_size, "seq_len": cfg.data.seq_len,
        "grad_accum_steps": cfg.trainer.grad_accum_steps, "mesh": dict(trainer.mesh.shape),
        "attention": cfg.model.attention, "remat": cfg.model.remat, "dtype": cfg.model.dtype,
        "step_time_s": step_s, "step_time_s_all": times, "tokens_per_s": tokens / step_s,
        "tokens_per_s_per_device": tokens / step_s / jax.device_count(),
        "tflops_per_s_per_device": flops / step_s / jax.device_count() / 1e12,
        "mfu": flops / step_s / (peak * 1e12 * jax.device_count()) if peak else None,
        "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30 if stats else None,
        "first_steps_with_compile_s": warmup_s, "final_loss": float(m["loss"]),
        "environment": environment(),
    }
    print(json.dumps(result, indent=2))
    if args.out and jax.process_index() == 0:
        tag = os.path.splitext(os.path.basename(args.config))[0]
        print("wrote", write_results("step", tag, result, args.out), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
