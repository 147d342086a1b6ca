"""Attention throughput, forward and forward+backward, for every implementation the platform has.

    python -m benchmarks.attention [--seqs 1024,2048,...] [--head-dims 64,128] [--batch 4]
        [--heads 16] [--kv-heads 16] [--impls pallas,cudnn,xla] [--dtype bfloat16] [--no-causal]
        [--segments 1] [--iters 10] [--out benchmarks/results]
        [--pallas-tiles 128x64,64x64] [--pallas-warps 4,8] [--pallas-stages 2,3]

Prints one JSON line per measurement (or per skip, with the reason) and writes them all, with the
hardware, versions and exact command, to <out>/attention-<device>-<date>.json.

FLOPs follow the FlashAttention papers: forward 4*b*h*s*s*d, halved when causal; the backward
counts 2.5x the forward, so forward+backward is 3.5x. Segment ids (--segments > 1) skip work
without changing the count, as in those papers' dense convention.
Timing: jit, compile, warm up, then the median of --iters runs, each ended by block_until_ready.
The --pallas-* options sweep our kernel's tiles (block_q x block_k) and Triton launch settings:
every combination is measured and recorded with its settings, for picking the defaults.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import environment, write_results
from jaxllm.kernels.attention import IMPLEMENTATIONS, attention, reference_attention
from jaxllm.kernels.flash_attention import flash_attention

REFERENCE_MAX_ELEMENTS = 2 ** 27  # fp32 logits of the reference above this would be > 512 MiB


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _tiles(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(n) for n in t.split("x")) for t in text.split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"tiles are BQxBK pairs like 128x64, got {text!r}") from None


def pallas_variants(args) -> list[dict]:
    """flash_attention keyword sets to sweep ([{}]: the defaults only)."""
    axes = [[("block_q", bq), ("block_k", bk)] for bq, bk in args.pallas_tiles] or [[]]
    warps = [[("num_warps", w)] for w in args.pallas_warps] or [[]]
    stages = [[("num_stages", n)] for n in args.pallas_stages] or [[]]
    return [dict(a + b + c) for a, b, c in itertools.product(axes, warps, stages)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=_ints, default=[1024, 2048, 4096, 8192])
    p.add_argument("--head-dims", type=_ints, default=[64, 128])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA)")
    p.add_argument("--impls", type=lambda s: s.split(","), default=list(IMPLEMENTATIONS))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--no-causal", dest="causal", action="store_false")
    p.add_argument("--segments", type=int, default=1, help="equal packed documents per row")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--pallas-tiles", type=_tiles, default=[], help="e.g. 128x64,64x64")
    p.add_argument("--pallas-warps", type=_ints, default=[], help="e.g. 4,8")
    p.add_argument("--pallas-stages", type=_ints, default=[], help="e.g. 2,3")
    args = p.parse_args(argv)
    unknown = set(args.impls) - set(IMPLEMENTATIONS)
    if unknown:
        p.error(f"unknown --impls {sorted(unknown)}; valid: {', '.join(IMPLEMENTATIONS)}")
    return args


def skip_reason(impl: str, backend: str, dtype) -> str | None:
    if impl == "pallas" and backend not in ("gpu", "tpu"):
        return f"needs a GPU or TPU; on {backend} it only runs in the (non-benchmark) interpreter"
    if impl == "cudnn" and backend != "gpu":
        return f"cuDNN attention needs an NVIDIA GPU, backend is {backend}"
    if impl == "cudnn" and dtype == jnp.float32:
        return "cuDNN attention takes bfloat16/float16 only"
    return None


def bench(fn, args, warmup: int, iters: int):
    """(median seconds per call, compile seconds, last output)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    out = None
    for _ in range(warmup):
        out = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), compile_s, out


def run(args) -> list[dict]:
    backend = jax.default_backend()
    dtype = jnp.dtype(args.dtype)
    kv_heads = args.kv_heads or args.heads
    records = []

    def emit(record):
        records.append(record)
        print(json.dumps(record), flush=True)

    for d in args.head_dims:
        for s in args.seqs:
            base = {"batch": args.batch, "seq": s, "heads": args.heads, "kv_heads": kv_heads,
                    "head_dim": d, "causal": args.causal, "dtype": args.dtype,
                    "segments": args.segments}
            rng = np.random.default_rng(0)
            q, k, v, do = (jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for shape in (
                (args.batch, s, args.heads, d), (args.batch, s, kv_heads, d),
                (args.batch, s, kv_heads, d), (args.batch, s, args.heads, d)))
            seg = None
            if args.segments > 1:
                seg = jnp.broadcast_to(jnp.arange(s) * args.segments // s, (args.batch, s))
            ref = None
            if args.batch * args.heads * s * s <= REFERENCE_MAX_ELEMENTS:
                ref = jax.jit(lambda q, k, v: reference_attention(
                    q, k, v, causal=args.causal, segment_ids=seg))(q, k, v).astype(jnp.float32)
            fwd_flops = 4 * args.batch * args.heads * s * s * d / (2 if args.causal else 1)

            runs = [(impl, variant) for impl in args.impls
                    for variant in (pallas_variants(args) if impl == "pallas" else [{}])]
            for impl, variant in runs:
                reason = skip_reason(impl, backend, dtype)
                if reason:
                    emit({"impl": impl, **variant, **base, "skipped": reason})
                    continue

                def fwd(q, k, v, impl=impl, variant=variant):
                    if variant:  # one device, no mesh: the kernel itself, with these settings
                        return flash_attention(q, k, v, causal=args.causal, segment_ids=seg, **variant)
                    return attention(q, k, v, impl=impl, causal=args.causal, segment_ids=seg)

                def fwd_bwd(q, k, v, do, fwd=fwd):
                    _, vjp = jax.vjp(fwd, q, k, v)
                    return vjp(do)

                for name, fn, fn_args, flops in (("fwd", fwd, (q, k, v), fwd_flops),
                                                 ("fwd+bwd", fwd_bwd, (q, k, v, do),
                                                  3.5 * fwd_flops)):
                    try:
                        sec, compile_s, out = bench(fn, fn_args, args.warmup, args.iters)
                    except Exception as e:  # OOM or an unsupported config: record it, go on
                        emit({"impl": impl, "pass": name, **variant, **base,
                              "skipped": f"{type(e).__name__}: {str(e)[:300]}"})
                        continue
                    record = {"impl": impl, "pass": name, **variant, **base, "ms": round(sec * 1e3, 4),
                              "tflops": round(flops / sec / 1e12, 3),
                              "compile_s": round(compile_s, 2)}
                    if name == "fwd" and ref is not None:
                        record["max_abs_err_vs_ref"] = float(
                            jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
                    emit(record)
    return records


def main(argv=None):
    args = parse_args(argv)
    records = run(args)
    env = environment()
    try:  # e.g. the CUDA runtime version; not every client reports one
        env["platform_version"] = jax.devices()[0].client.platform_version
    except AttributeError:
        pass
    path = write_results("attention", None, {"environment": env, "config": vars(args), "results": records},
                         args.out)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
