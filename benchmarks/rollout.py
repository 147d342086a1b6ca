"""Rollout throughput: `python -m benchmarks.rollout --config configs/X.yaml [--prompts 64 --n 8 --prompt-len 128 --response-len 512] [a.b=c ...]`

Times `jaxllm.models.decode.generate` (the RL rollout's sampler: KV cache, per-row stop, log-probs)
with the config's model and mesh, randomly initialised params and random prompts, sampling
`--response-len` new tokens per row with no stop token (so every row runs to the end), and
prints generated tokens/s and the time per rollout as JSON; a dated results file goes to --out.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np

from benchmarks.common import config_arg_parser, environment, write_results
from jaxllm.models import decode
from jaxllm.train import Trainer, configure
from jaxllm.parallel.mesh import mesh_from_config


def main(argv=None) -> int:
    ap = config_arg_parser("benchmarks.rollout", __doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16, help="prompts per rollout")
    ap.add_argument("--n", type=int, default=4, help="responses per prompt")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--response-len", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3, help="timed rollouts after the compiling one")
    args = ap.parse_args(argv)
    cfg = configure(args.config, args.overrides)
    if cfg is None:
        return 2
    trainer = Trainer(cfg, mesh_from_config(cfg.mesh))
    params = trainer.init_model(trainer.keys.model)
    rows = args.prompts * args.n
    rng = np.random.default_rng(0)
    prompts = np.repeat(rng.integers(3, cfg.model.vocab_size, (args.prompts, args.prompt_len), dtype=np.int32),
                        args.n, axis=0)
    local = {"t": prompts[:rows // jax.process_count()], "l": np.full(rows // jax.process_count(), args.prompt_len,
                                                                     np.int32)}
    g = trainer.to_global(local)

    def rollout(seed):
        out = decode.generate(cfg.model, params, g["t"], g["l"], max_new_tokens=args.response_len, rng=seed,
                              temperature=args.temperature, mesh=trainer.mesh)
        return jax.block_until_ready(out)

    t0 = time.perf_counter()
    rollout(0)
    first_s = time.perf_counter() - t0
    times = []
    for i in range(args.repeats):
        t = time.perf_counter()
        rollout(i + 1)
        times.append(time.perf_counter() - t)
    rollout_s = float(np.median(times))
    tokens = rows * args.response_len
    result = {"config": args.config, "overrides": args.overrides, "params": cfg.model.num_params(),
              "prompts": args.prompts, "n": args.n, "rows": rows, "prompt_len": args.prompt_len,
              "response_len": args.response_len, "mesh": dict(trainer.mesh.shape), "attention": cfg.model.attention,
              "dtype": cfg.model.dtype, "rollout_s": rollout_s, "rollout_s_all": times,
              "generated_tokens_per_s": tokens / rollout_s,
              "generated_tokens_per_s_per_device": tokens / rollout_s / jax.device_count(),
              "first_rollout_with_compile_s": first_s, "environment": environment()}
    print(json.dumps(result, indent=2))
    if args.out and jax.process_index() == 0:
        tag = os.path.splitext(os.path.basename(args.config))[0]
        print("wrote", write_results("rollout", tag, result, args.out), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
