"""Checkpoint conversion between Hugging Face safetensors directories and jaxllm (orbax) checkpoints.

    python -m jaxllm.convert hf-to-jaxllm --hf DIR --out RUN_OR_DIR [--dtype float32]
    python -m jaxllm.convert jaxllm-to-hf --checkpoint RUN_DIR --out DIR [--dtype bfloat16] [--max-shard-size 5GB]
"""

from __future__ import annotations

import argparse
import re
import sys

from jaxllm.errors import run_cli

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB' / '500MiB' / '1000000' -> bytes (decimal units, as transformers' max_shard_size)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; e.g. 5GB, 500MB, 2GiB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def hf_to_jaxllm(args) -> None:
    from jaxllm.run import save_params
    from jaxllm.models.hf import load_hf_checkpoint

    cfg, params = load_hf_checkpoint(args.hf, dtype=args.dtype)
    save_params(cfg, params, args.out)
    print(f"wrote {args.out}: {cfg.n_layers} layers, d_model {cfg.d_model}, "
          f"{cfg.num_params() / 1e6:.1f}M params")


def jaxllm_to_hf(args) -> None:
    from jaxllm.run import load_params
    from jaxllm.models.hf import save_hf_checkpoint

    cfg, params = load_params(args.checkpoint)
    save_hf_checkpoint(cfg, params, args.out, dtype=args.dtype, max_shard_bytes=args.max_shard_size)
    print(f"wrote {args.out} ({args.dtype})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("hf-to-jaxllm", help="HF safetensors directory -> params-only orbax checkpoint")
    p.add_argument("--hf", required=True, help="directory with config.json and model.safetensors[.index.json]")
    p.add_argument("--out", required=True, help="run or checkpoint directory to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the stored params")
    p.set_defaults(fn=hf_to_jaxllm)
    p = sub.add_parser("jaxllm-to-hf", help="newest complete checkpoint of a run -> HF safetensors directory")
    p.add_argument("--checkpoint", required=True, help="run directory")
    p.add_argument("--out", required=True, help="HF directory to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written tensors")
    p.add_argument("--max-shard-size", type=parse_size, default=None,
                   help="split weights into shards of at most this size (e.g. 5GB)")
    p.set_defaults(fn=jaxllm_to_hf)
    args = parser.parse_args(argv)
    return run_cli(lambda: args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
