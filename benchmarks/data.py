"""Data-pipeline throughput: `python -m benchmarks.data --config configs/tiny.yaml [--prepared DIR] [a.b=c ...]`

Runs the training input pipeline (`jaxllm.data.pipeline.make_train_iterator`, one process) for
`--seconds` per case and reports trained tokens (loss_mask 1) per second of wall time and per
CPU-second of this process (all its threads: the "per host core" rate), plus the padding
fraction, for raw text tokenized on the fly and for prepared token shards (greedy and best_fit
packing). Without --prepared, the config's data.train is prepared first into a temporary folder
with `jaxllm.data.prepare` (its tokens per wall second and per CPU-second of tokenizing in the
worker processes are reported too). Prints JSON and writes `benchmarks/results/data-<config>-<device>-<date>.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import tempfile
import time

from benchmarks.common import config_arg_parser, environment, write_results
from jaxllm.config import load_config_or_report
from jaxllm.data import documents, prepare
from jaxllm.data.packing import packing_stats
from jaxllm.data.pipeline import make_train_iterator
from jaxllm.data.tokenizer import load_tokenizer


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return r.ru_utime + r.ru_stime


def measure(cfg, tokenizer, seconds: float) -> dict:
    """Batches of the training pipeline for about `seconds` (after one warm-up batch)."""
    it = make_train_iterator(cfg, tokenizer, process_index=0, process_count=1)
    next(it)  # opens files, fills the row-shuffle window
    start = packing_stats(it)
    tokens = batches = 0
    t0, c0 = time.perf_counter(), _cpu_seconds()
    while time.perf_counter() - t0 < seconds:
        batch = next(it)
        tokens += int(batch["loss_mask"].sum())
        batches += 1
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    end = packing_stats(it)
    real, pad = end["real_tokens"] - start["real_tokens"], end["pad_tokens"] - start["pad_tokens"]
    return {"batches": batches, "tokens": tokens, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "tokens_per_s": round(tokens / wall), "tokens_per_s_per_core": round(tokens / max(cpu, 1e-9)),
            "padding_fraction": round(pad / max(real + pad, 1), 5),
            "truncated_tokens": end["truncated_tokens"] - start["truncated_tokens"]}


def main(argv=None) -> int:
    ap = config_arg_parser("benchmarks.data", __doc__.splitlines()[0])
    ap.add_argument("--prepared", help="a prepared folder of data.train (default: prepare it now)")
    ap.add_argument("--seconds", type=float, default=10.0, help="timed seconds per case")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes when preparing")
    args = ap.parse_args(argv)
    cfg = load_config_or_report(args.config, args.overrides)
    if cfg is None:
        return 2
    d = cfg.data
    tokenizer = load_tokenizer(d, cfg.model.vocab_size)
    result = {"config": args.config, "overrides": args.overrides, "train": list(d.train),
              "seq_len": d.seq_len, "batch_size": cfg.trainer.batch_size, "num_workers": d.num_workers,
              "pack_buffer": d.pack_buffer, "split_policy": d.split_policy, "seconds_per_case": args.seconds}
    with tempfile.TemporaryDirectory(prefix="jaxllm-bench-data-") as tmp:
        prepared = args.prepared
        if prepared is None:
            prepared = os.path.join(tmp, "prepared")
            source = documents.open_source(d.train, text_field=d.text_field, strict=d.strict,
                                         eval_fraction=d.eval_fraction)
            timings = {}
            manifest = prepare.prepare(source, tokenizer, prepared, add_bos=d.add_bos, add_eos=d.add_eos,
                                       workers=args.workers, source_info={"specs": list(d.train)}, timings=timings)
            wall, cpu = timings["wall_s"], timings["tokenize_cpu_s"]
            result["prepare"] = {"workers": args.workers, "documents": manifest["documents"],
                                 "tokens": manifest["tokens"], "wall_s": round(wall, 3),
                                 "tokenize_cpu_s": round(cpu, 3), "tokens_per_s": round(manifest["tokens"] / wall),
                                 "tokens_per_s_per_core": round(manifest["tokens"] / max(cpu, 1e-9))}
        cases = {}
        for name, train, packing in (("raw_greedy", d.train, "greedy"), ("prepared_greedy", (prepared,), "greedy"),
                                     ("prepared_best_fit", (prepared,), "best_fit")):
            data = dataclasses.replace(d, train=tuple(train), packing=packing)
            cases[name] = measure(dataclasses.replace(cfg, data=data), tokenizer, args.seconds)
            print(name, json.dumps(cases[name]), file=sys.stderr)
        result["cases"] = cases
    result["environment"] = environment()
    print(json.dumps(result, indent=2))
    if args.out:
        tag = os.path.splitext(os.path.basename(args.config))[0]
        print("wrote", write_results("data", tag, result, args.out), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
