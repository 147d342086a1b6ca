"""Model-based selection throughput: `python -m benchmarks.select --config configs/tiny.yaml
[--examples 256 --batch-size 32 --dims 8192 --lora-rank 8 --repeats 3] [a.b=c ...]`

Times, with the config's model and mesh, randomly initialised params and random token rows of
data.seq_len (tokenization is host work, not measured here):
  * LESS gradient features: per-example LoRA gradients (vmapped), the Adam direction and the
    random projection to --dims, for a pool (kind adam) and a target (kind sgd), in examples/s;
  * rating: the scalar-head score of a text (a QuRater / educational-value model's forward), in
    examples/s.
Prints JSON and writes a dated results file to --out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np

from benchmarks.common import config_arg_parser, environment, write_results
from jaxllm.objectives.reward import reward_scores
from jaxllm.parallel.mesh import batch_sharding, mesh_from_config
from jaxllm.select.grads import FeatureFunction
from jaxllm.train import Trainer, configure


def _rows(cfg, rng, n: int) -> dict:
    T = cfg.data.seq_len
    toks = rng.integers(3, cfg.model.vocab_size, (n, T + 1), dtype=np.int32)
    return {"tokens": toks[:, :-1], "targets": toks[:, 1:], "positions": np.tile(np.arange(T, dtype=np.int32), (n, 1)),
            "segment_ids": np.ones((n, T), np.int32), "loss_mask": np.ones((n, T), np.float32),
            "ul_mask": np.zeros((n, T), np.float32)}


def _rate(fn, batches, repeats: int) -> tuple[float, float]:
    """(examples/s, first call with compile s): the median of `repeats` passes over `batches`."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(batches[0]))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready([fn(b) for b in batches])
        times.append(time.perf_counter() - t)
    n = sum(len(jax.tree.leaves(b)[0]) for b in batches)
    return n / float(np.median(times)), first


def gradient_features(cfg, args, rng) -> dict:
    cfg = dataclasses.replace(cfg, task="sft", lora=dataclasses.replace(cfg.lora, rank=args.lora_rank))
    trainer = Trainer(cfg, mesh_from_config(cfg.mesh))
    state = trainer.fresh_state()
    # LoRA's b starts at 0 (no gradient for a): give the adapters a random trained-like state.
    state = state.replace(params=jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.PRNGKey(1), x.shape),
                                              state.params))
    batches = [trainer.to_global(_rows(cfg, rng, args.batch_size)) for _ in range(args.examples // args.batch_size)]
    out = {"lora_rank": args.lora_rank, "lora_targets": list(cfg.lora.targets), "dims": args.dims,
           "trainable_params": int(sum(x.size for x in jax.tree.leaves(state.params)))}
    for kind in ("adam", "sgd"):
        fn = FeatureFunction(trainer, kind, args.dims, 0)
        rate, first = _rate(lambda b: fn(state, state.frozen, b), batches, args.repeats)
        out[f"{kind}_examples_per_s"], out[f"{kind}_first_batch_with_compile_s"] = rate, first
    return out


def rating(cfg, args, rng) -> dict:
    trainer = Trainer(dataclasses.replace(cfg, task="rater"), mesh_from_config(cfg.mesh))
    params = trainer.init_model(trainer.keys.model)
    score = jax.jit(lambda p, b: reward_scores(cfg.model, p, b["tokens"], b["positions"], b["segment_ids"]),
                    out_shardings=batch_sharding(trainer.mesh, 1))
    keys = ("tokens", "positions", "segment_ids")
    batches = [trainer.to_global({k: v for k, v in _rows(cfg, rng, args.batch_size).items() if k in keys})
               for _ in range(args.examples // args.batch_size)]
    rate, first = _rate(lambda b: score(params, b), batches, args.repeats)
    return {"examples_per_s": rate, "first_batch_with_compile_s": first}


def main(argv=None) -> int:
    ap = config_arg_parser("benchmarks.select", __doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=256, help="examples per timed pass")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dims", type=int, default=8192, help="projected dimensions of the gradient features")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    cfg = configure(args.config, args.overrides)
    if cfg is None:
        return 2
    if args.examples < args.batch_size or args.batch_size % jax.device_count():
        print("error: --examples must be >= --batch-size, and --batch-size divide over the devices", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    result = {"config": args.config, "overrides": args.overrides, "params": cfg.model.num_params(),
              "seq_len": cfg.data.seq_len, "batch_size": args.batch_size, "examples": args.examples,
              "mesh": dict(mesh_from_config(cfg.mesh).shape), "dtype": cfg.model.dtype,
              "less_gradient_features": gradient_features(cfg, args, rng), "rating": rating(cfg, args, rng),
              "environment": environment()}
    print(json.dumps(result, indent=2))
    if args.out and jax.process_index() == 0:
        tag = os.path.splitext(os.path.basename(args.config))[0]
        print("wrote", write_results("select", tag, result, args.out), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
