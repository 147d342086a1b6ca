"""Token shards prepared on datatrove's executors: `python -m jaxllm.curate prepare`.

    python -m jaxllm.curate prepare --input SPEC [SPEC ...] --tokenizer PATH --output DIR \\
        [--executor local|slurm|ray] [--tasks N] [--workers N] [--shard-tokens T] [...]

does what `python -m jaxllm.data.prepare --input ...` does, with one task per input file, so
tokenizing a large corpus spreads over a cluster. `TokenizeFiles` task r tokenizes input files
r, r + tasks, ... (each with jaxllm.data's reader for its kind, BOS/EOS as asked), cutting each
file's documents into shards the way prepare cuts a corpus (a shard ends with the first document
that brings it to `shard_tokens`); `WriteManifest` (one task) numbers the shards in input order
(shard-00000.bin, ...), writes prepare's manifest.json and moves the folder into place.
`jaxllm.data.shards.PreparedSource` reads the result: the same documents, in the same order,
with the same tokens as prepare's output; only shard boundaries differ (here a shard never
spans two input files).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import shutil
import types

import numpy as np
from datatrove.pipeline.base import PipelineStep

from jaxllm.curate.config import CurateConfig
from jaxllm.data.documents import ArrayRecordSource, JsonlSource, ParquetSource, TextFileSource, Tokenize
from jaxllm.data.files import SourceError, file_kind, resolve_files
from jaxllm.data.prepare import DEFAULT_SHARD_TOKENS, shard_names, token_dtype, tokenizer_info
from jaxllm.data.shards import FORMAT, MANIFEST, VERSION
from jaxllm.data.tokenizer import load_tokenizer

KIND_ORDER = ("text", "jsonl", "parquet", "array_record")  # open_source's order within one spec


def ordered_files(specs, eval_fraction: float) -> list[str]:
    """Every input file, in the order open_source(specs) reads their documents."""
    out = []
    for spec in specs:
        files = resolve_files(spec, eval_fraction=eval_fraction)
        out += sorted(files, key=lambda f: KIND_ORDER.index(file_kind(f)))  # stable: keeps order within a kind
    return out


def _file_source(path: str, text_field: str, strict: bool):
    kind = file_kind(path)
    if kind == "text":
        return TextFileSource([path], strict=strict)
    cls = {"jsonl": JsonlSource, "parquet": ParquetSource, "array_record": ArrayRecordSource}[kind]
    return cls([path], text_field, strict=strict)


@dataclasses.dataclass
class PrepareSettings:
    files: list
    tokenizer: str
    folder: str                   # where tasks write; WriteManifest moves it to `output`
    output: str
    add_bos: bool = True
    add_eos: bool = True
    text_field: str = "text"
    strict: bool = False
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    specs: list = dataclasses.field(default_factory=list)


class _PrepareStep(PipelineStep):
    """A datatrove step over prepare's settings; its tasks load the tokenizer themselves."""

    type = "🔢 - TOKENIZE"

    def __init__(self, settings: PrepareSettings):
        super().__init__()
        self.s = settings

    def tokenizer(self):
        return load_tokenizer(types.SimpleNamespace(tokenizer=self.s.tokenizer), vocab_size=1 << 31)


class TokenizeFiles(_PrepareStep):
    name = "token shards"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        s = self.s
        tokenizer = self.tokenizer()
        tokenize = Tokenize(tokenizer, s.add_bos, s.add_eos)
        dtype = token_dtype(tokenizer.vocab_size)
        for i in range(rank, len(s.files), world_size):
            with self.track_time():
                source = _file_source(s.files[i], s.text_field, s.strict)
                shards = self._write_file(i, source, tokenize, dtype)
            with open(os.path.join(s.folder, "parts", f"{i:06d}.json"), "w") as f:
                json.dump({"file": s.files[i], "shards": shards, "skipped": dict(source.skipped)}, f)
            self.stat_update("documents", value=len(source))

    def _write_file(self, i: int, source, tokenize, dtype) -> list[dict]:
        limit, shards, lengths, tokens = np.iinfo(dtype).max, [], [], 0
        out = None
        for d in range(len(source)):
            if out is None:
                name = f"part-{i:06d}-{len(shards):04d}"
                out, lengths, tokens = open(os.path.join(self.s.folder, name + ".bin"), "wb", buffering=1 << 22), [], 0
            ids = tokenize(source[d])
            if len(ids) and (ids.min() < 0 or ids.max() > limit):
                raise ValueError(f"{self.s.files[i]}: document {d}: token ids outside [0, {limit}] for {dtype.name}")
            out.write(ids.astype(dtype).tobytes())
            lengths.append(len(ids))
            tokens += len(ids)
            if tokens >= self.s.shard_tokens or d == len(source) - 1:  # prepare's cut, within this file
                out.close()
                out = None
                offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
                np.save(os.path.join(self.s.folder, name + ".idx.npy"), offsets)
                shards.append({"stem": name, "documents": len(lengths), "tokens": tokens})
        return shards


class WriteManifest(_PrepareStep):
    """One task: shard-NNNNN names in input order, prepare's manifest, the folder moved into place."""

    name = "prepared manifest"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        s = self.s
        tokenizer = self.tokenizer()
        shards, skipped = [], collections.Counter()
        for i in range(len(s.files)):
            with open(os.path.join(s.folder, "parts", f"{i:06d}.json")) as f:
                part = json.load(f)
            skipped.update(part["skipped"])
            for shard in part["shards"]:
                bin_name, idx_name = shard_names(len(shards))
                os.replace(os.path.join(s.folder, shard["stem"] + ".bin"), os.path.join(s.folder, bin_name))
                os.replace(os.path.join(s.folder, shard["stem"] + ".idx.npy"), os.path.join(s.folder, idx_name))
                shards.append({"tokens_file": bin_name, "index_file": idx_name, "documents": shard["documents"],
                               "tokens": shard["tokens"]})
        if not shards:
            raise SourceError(f"{', '.join(s.specs)}: no usable documents (skipped: {dict(skipped)})")
        manifest = {"format": FORMAT, "version": VERSION, "dtype": token_dtype(tokenizer.vocab_size).name,
                    "documents": sum(x["documents"] for x in shards), "tokens": sum(x["tokens"] for x in shards),
                    "shard_tokens": int(s.shard_tokens), "shards": shards, "tokenizer": tokenizer_info(tokenizer),
                    "add_bos": bool(s.add_bos), "add_eos": bool(s.add_eos),
                    "sources": {"specs": s.specs, "text_field": s.text_field, "split": "train", "strict": s.strict,
                                "skipped": dict(sorted(skipped.items()))}}
        shutil.rmtree(os.path.join(s.folder, "parts"))
        with open(os.path.join(s.folder, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        if os.path.exists(s.output):  # --overwrite, checked before the run started
            shutil.rmtree(s.output)
        os.replace(s.folder, s.output)


def make_stages(settings: PrepareSettings, tasks: int) -> list:
    from jaxllm.curate.plan import Stage

    os.makedirs(os.path.join(settings.folder, "parts"), exist_ok=True)
    return [Stage("tokenize", [TokenizeFiles(settings)], tasks),
            Stage("manifest", [WriteManifest(settings)], 1, in_driver=True)]


def _parser() -> argparse.ArgumentParser:
    from jaxllm.curate.cli_args import executor_flags

    ap = argparse.ArgumentParser(prog="python -m jaxllm.curate prepare", description=__doc__.splitlines()[0])
    ap.add_argument("--input", nargs="+", required=True, help="source specs (files, folders, globs)")
    ap.add_argument("--tokenizer", required=True, help="SentencePiece .model or tokenizer.json")
    ap.add_argument("--output", required=True)
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--no-bos", action="store_true", help="no BOS before each document")
    ap.add_argument("--no-eos", action="store_true", help="no EOS after each document")
    ap.add_argument("--strict", action="store_true", help="bad input is an error")
    ap.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="executor settings of the curate config (slurm_*, ray_*)")
    executor_flags(ap)
    return ap


def prepare_on_executor(settings: PrepareSettings, cfg: CurateConfig, work: str) -> dict | None:
    """Runs the stages (or submits them to SLURM); returns the manifest when it ran here."""
    from jaxllm.curate.executors import run_here, submit_slurm

    plan = types.SimpleNamespace(stages=make_stages(settings, cfg.tasks or max(1, len(settings.files))), work=work)
    if cfg.executor == "slurm":
        submit_slurm(cfg, plan)
        return None
    run_here(cfg, plan)
    with open(os.path.join(settings.output, MANIFEST)) as f:
        return json.load(f)


def main(argv) -> int:
    from jaxllm.config import DataConfig
    from jaxllm.curate.cli_args import executor_overrides

    args = _parser().parse_args(argv)
    output = os.path.abspath(os.path.expanduser(args.output))
    if args.shard_tokens <= 0:
        raise SourceError(f"--shard-tokens must be > 0, got {args.shard_tokens}")
    if os.path.exists(output) and not args.overwrite:
        raise SourceError(f"{output} exists; pass --overwrite to replace it")
    load_tokenizer(types.SimpleNamespace(tokenizer=args.tokenizer), vocab_size=1 << 31)  # a bad path fails here
    cfg = CurateConfig(input=list(args.input), output=output, **executor_overrides(args))
    work = cfg.work_dir or output + ".work"
    settings = PrepareSettings(ordered_files(args.input, DataConfig().eval_fraction), args.tokenizer,
                               os.path.join(work, "shards"), output, not args.no_bos, not args.no_eos,
                               args.text_field, args.strict, args.shard_tokens, list(args.input))
    manifest = prepare_on_executor(settings, cfg, work)
    if manifest is None:
        print(f"prepare: submitted to SLURM; the shards will appear in {output}")
        return 0
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"output": output, "documents": manifest["documents"], "tokens": manifest["tokens"],
                      "shards": len(manifest["shards"]), "dtype": manifest["dtype"]}))
    return 0
