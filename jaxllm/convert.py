"""Conversion between Hugging Face / PEFT folders and jaxllm runs.

    python -m jaxllm.convert hf-to-jaxllm --hf DIR --out RUN_OR_DIR [--dtype float32]
    python -m jaxllm.convert jaxllm-to-hf --checkpoint RUN_DIR --out DIR [--dtype bfloat16] [--max-shard-size 5GB]
    python -m jaxllm.convert lora-to-peft --checkpoint RUN_DIR --out DIR
    python -m jaxllm.convert peft-to-jaxllm --peft DIR [--base HF_DIR] --out DIR

hf-to-jaxllm keeps the folder's tokenizer (tokenizer.json with its config and chat template)
beside the params. jaxllm-to-hf writes the weights, config.json, the run's tokenizer as Hugging
Face files, the chat template it trained with and generation_config.json
(`jaxllm.data.hf_export`). lora-to-peft writes a LoRA / DoRA run's adapters as a PEFT adapter
folder for its base model (model.init_from). peft-to-jaxllm writes a PEFT adapter folder as a
jaxllm params directory holding the adapters over their base: `load_run` folds them in,
`model.init_from` starts a run from it, lora-to-peft gives the folder back.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys

from jaxllm.errors import UserError, run_cli

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB' / '500MiB' / '1000000' -> bytes (decimal units, as transformers' max_shard_size)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; e.g. 5GB, 500MB, 2GiB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _keep_hf_tokenizer(hf_dir: str, out: str) -> str | None:
    """Copies a Hugging Face folder's tokenizer into `out` (tokenizer.json, else tokenizer.model)."""
    from jaxllm.data.tokenizer import keep_tokenizer

    for name in ("tokenizer.json", "tokenizer.model"):
        path = os.path.join(hf_dir, name)
        if os.path.isfile(path):
            keep_tokenizer(path, out)
            return name
    return None


def hf_to_jaxllm(args) -> None:
    from jaxllm.models.hf import load_hf_checkpoint
    from jaxllm.run import save_params

    cfg, params = load_hf_checkpoint(args.hf, dtype=args.dtype)
    save_params(cfg, params, args.out)
    kept = _keep_hf_tokenizer(args.hf, args.out)
    print(f"wrote {args.out}: {cfg.n_layers} layers, d_model {cfg.d_model}, "
          f"{cfg.num_params() / 1e6:.1f}M params" + (f", {kept}" if kept else ", no tokenizer in the folder"))


def _export_tokenizer(cfg, run_dir: str, out: str) -> list[str]:
    """Writes the run's tokenizer, chat template and generation config into `out`; returns notes."""
    from jaxllm.data.chat import TemplateError, load_template
    from jaxllm.data.hf_export import export_tokenizer
    from jaxllm.data.tokenizer import load_tokenizer, saved_tokenizer

    path = saved_tokenizer(run_dir)
    if path is None and cfg.data.tokenizer != "auto" and os.path.exists(os.path.expanduser(cfg.data.tokenizer)):
        path = cfg.data.tokenizer
    if path is None:
        return [f"{run_dir} keeps no tokenizer: the export has no tokenizer files"]
    tokenizer = load_tokenizer(dataclasses.replace(cfg.data, tokenizer=path), cfg.model.vocab_size)
    try:
        template = load_template(cfg.sft.template, tokenizer)
    except TemplateError as e:
        raise UserError(f"sft.template: {e}") from None
    return export_tokenizer(tokenizer, template, out, add_bos=cfg.data.add_bos, model_max_length=cfg.model.max_seq_len)


def jaxllm_to_hf(args) -> None:
    from jaxllm.models.hf import save_hf_checkpoint
    from jaxllm.run import load_run

    cfg, params = load_run(args.checkpoint)
    save_hf_checkpoint(cfg.model, params, args.out, dtype=args.dtype, max_shard_bytes=args.max_shard_size)
    for note in _export_tokenizer(cfg, args.checkpoint, args.out):
        print(f"note: {note}")
    print(f"wrote {args.out} ({args.dtype})")


def run_adapters(run_dir: str, step: int | None = None):
    """(Config, host adapters) of a LoRA run's newest complete checkpoint, not folded in."""
    import jax

    from jaxllm.run import load_trainable, read_config

    if not read_config(run_dir).lora.enabled:
        raise UserError(f"{run_dir}: not a LoRA run (lora.rank is 0); jaxllm-to-hf exports its weights")
    try:
        cfg, trainable = load_trainable(run_dir, step)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    return cfg, jax.device_get(trainable["adapters"])


def lora_to_peft(args) -> None:
    from jaxllm.models.peft import save_peft_adapter

    cfg, adapters = run_adapters(args.checkpoint)
    base = os.path.abspath(os.path.expanduser(cfg.model.init_from)) if cfg.model.init_from else None
    save_peft_adapter(cfg.lora, adapters, args.out, base_model=base)
    if base is None:
        print("note: the run's base model is its seed initialisation (no model.init_from): "
              "base_model_name_or_path is null")
    elif not os.path.isfile(os.path.join(base, "config.json")):
        print(f"note: the base model {base} is a jaxllm directory; convert it with jaxllm-to-hf for PEFT")
    print(f"wrote {args.out}: rank {cfg.lora.rank}{' DoRA' if cfg.lora.dora else ''} adapters on "
          f"{', '.join(cfg.lora.targets)}")


def peft_to_jaxllm(args) -> None:
    from jaxllm import config as config_lib
    from jaxllm.checkpoint import save_params_only
    from jaxllm.models.hf import read_model_config
    from jaxllm.models.peft import base_model_path, load_peft_adapter

    base = os.path.abspath(base_model_path(args.peft, args.base))
    model_cfg = dataclasses.replace(read_model_config(base), init_from=base)
    lora_cfg, adapters = load_peft_adapter(args.peft, model_cfg)
    os.makedirs(args.out, exist_ok=True)
    config_lib.dump_yaml(dataclasses.replace(config_lib.Config(), model=model_cfg, lora=lora_cfg),
                         os.path.join(args.out, "config.yaml"))
    save_params_only({"adapters": adapters}, os.path.join(args.out, "checkpoints"))
    kept = _keep_hf_tokenizer(base, args.out)
    print(f"wrote {args.out}: rank {lora_cfg.rank}{' DoRA' if lora_cfg.dora else ''} adapters over {base}"
          + (f", {kept}" if kept else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("hf-to-jaxllm", help="HF safetensors directory -> params-only orbax checkpoint")
    p.add_argument("--hf", required=True, help="directory with config.json and model.safetensors[.index.json]")
    p.add_argument("--out", required=True, help="run or checkpoint directory to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the stored params")
    p.set_defaults(fn=hf_to_jaxllm)
    p = sub.add_parser("jaxllm-to-hf", help="newest complete checkpoint of a run -> HF directory with tokenizer")
    p.add_argument("--checkpoint", required=True, help="run directory")
    p.add_argument("--out", required=True, help="HF directory to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written tensors")
    p.add_argument("--max-shard-size", type=parse_size, default=None,
                   help="split weights into shards of at most this size (e.g. 5GB)")
    p.set_defaults(fn=jaxllm_to_hf)
    p = sub.add_parser("lora-to-peft", help="a LoRA / DoRA run's adapters -> PEFT adapter folder")
    p.add_argument("--checkpoint", required=True, help="run directory (lora.rank > 0)")
    p.add_argument("--out", required=True, help="adapter folder to write")
    p.set_defaults(fn=lora_to_peft)
    p = sub.add_parser("peft-to-jaxllm", help="PEFT adapter folder -> jaxllm params directory (model.init_from)")
    p.add_argument("--peft", required=True, help="folder with adapter_config.json and adapter_model.safetensors")
    p.add_argument("--base", default=None, help="the base model's HF folder (default: the adapter's "
                   "base_model_name_or_path)")
    p.add_argument("--out", required=True, help="directory to write")
    p.set_defaults(fn=peft_to_jaxllm)
    args = parser.parse_args(argv)
    return run_cli(lambda: args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
