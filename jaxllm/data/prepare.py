"""Token shards, prepared once: `python -m jaxllm.data.prepare` (`jaxllm.data.shards` reads them).

    python -m jaxllm.data.prepare --config configs/tiny.yaml [a.b=c ...] --output DIR \\
        [--split train|eval] [--workers N] [--shard-tokens T]
    python -m jaxllm.data.prepare --input SPEC [SPEC ...] --tokenizer PATH --output DIR [...]

tokenizes a source (any spec `jaxllm.data.documents.open_source` reads) once, with BOS/EOS as
configured, so training reads token ids instead of re-tokenizing text every epoch. A data.train
or data.eval entry `prepared:DIR`, or a folder holding `manifest.json`, reads the result.

Output folder:
  shard-00000.bin        the shard's documents' tokens back to back: uint16 when the tokenizer's
                         ids fit in 16 bits (vocab_size <= 65536), else uint32
  shard-00000.idx.npy    int64 [documents + 1]: document d of the shard is bin[idx[d]:idx[d+1]]
  manifest.json          format, version, dtype; documents and tokens per shard and in total;
                         the tokenizer (path, sha256 of its model file / tokenizer.json, vocab
                         size, bos/eos ids); add_bos / add_eos; the source specs, text field and
                         the documents skipped as bad input.

Documents keep the source's order. Shards are cut at document boundaries: a shard ends with the
first document that brings it to `--shard-tokens` tokens, so the cut depends only on the
documents, never on the number of workers. Worker processes (multiprocessing, spawned) tokenize
contiguous ranges of documents into scratch files; the parent then cuts those into shards. The
output is byte-identical for any worker count, and appears atomically: everything is written
into `DIR.tmp-<pid>` and renamed to DIR at the end (`--overwrite` replaces an existing DIR).

`shards.PreparedSource` reads the folder back, checking its files against the manifest and the
tokenizer and BOS/EOS settings against the configuration. No module of jaxllm.data imports this
one: it is the writer and its command line, the top of jaxllm.data (`jaxllm.curate.prepare_step`
runs its per-file work as datatrove tasks).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from typing import Any, Sequence

import numpy as np

from jaxllm.data.documents import Tokenize, open_source
from jaxllm.data.files import SourceError, prepared_dir
from jaxllm.data.shards import FORMAT, MANIFEST, VERSION, tokenizer_sha256
from jaxllm.errors import ConfigError, UserError, run_cli

log = logging.getLogger(__name__)

DEFAULT_SHARD_TOKENS = 1 << 27  # 256 MiB of uint16 tokens per shard
_COPY_CHUNK = 1 << 24  # bytes copied at a time from the workers' scratch files into shards


def shard_names(i: int) -> tuple[str, str]:
    return f"shard-{i:05d}.bin", f"shard-{i:05d}.idx.npy"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def tokenizer_info(tokenizer) -> dict[str, Any]:
    path = getattr(tokenizer, "path", None)
    return {"path": os.path.abspath(path) if path else None, "sha256": tokenizer_sha256(tokenizer),
            "vocab_size": int(tokenizer.vocab_size), "bos_id": int(tokenizer.bos_id),
            "eos_id": int(tokenizer.eos_id)}


# ----------------------------------------------------------------------------- writing


def _tokenize_range(source, tokenizer, add_bos: bool, add_eos: bool, start: int, end: int,
                    dtype: str, out_stem: str) -> tuple[str, float]:
    """Tokenizes documents [start, end) into `out_stem`.bin (tokens) and `out_stem`.len.npy;
    returns `out_stem` and the CPU seconds it took."""
    cpu0 = time.process_time()
    tokenize = Tokenize(tokenizer, add_bos, add_eos)
    dt = np.dtype(dtype)
    limit = np.iinfo(dt).max
    lengths = np.zeros(end - start, np.int64)
    with open(out_stem + ".bin", "wb", buffering=1 << 22) as f:
        for i in range(start, end):
            ids = tokenize(source[i])
            if len(ids) and (ids.min() < 0 or ids.max() > limit):
                raise ValueError(f"document {i}: token ids outside [0, {limit}] for {dt.name}")
            f.write(ids.astype(dt).tobytes())
            lengths[i - start] = len(ids)
    np.save(out_stem + ".len.npy", lengths)
    return out_stem, time.process_time() - cpu0


def _shard_ends(lengths: np.ndarray, shard_tokens: int) -> list[int]:
    """Document index after the last document of each shard: a shard closes as soon as it holds
    at least `shard_tokens` tokens (the last shard may hold fewer)."""
    ends, start = [], 0
    cum = np.cumsum(lengths, dtype=np.int64)
    while start < len(lengths):
        before = int(cum[start - 1]) if start else 0
        end = int(np.searchsorted(cum, before + shard_tokens, side="left")) + 1
        end = min(end, len(lengths))
        ends.append(end)
        start = end
    return ends


class _Concat:
    """The workers' scratch token files read as one byte stream, by token range."""

    def __init__(self, stems: Sequence[str], counts: Sequence[int], itemsize: int):
        self.stems, self.itemsize = list(stems), itemsize
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])

    def copy(self, a: int, b: int, dst) -> None:
        """Writes tokens [a, b) into file object `dst`."""
        for w, stem in enumerate(self.stems):
            lo, hi = max(a, int(self.starts[w])), min(b, int(self.starts[w + 1]))
            if lo >= hi:
                continue
            with open(stem + ".bin", "rb") as src:
                src.seek((lo - int(self.starts[w])) * self.itemsize)
                left = (hi - lo) * self.itemsize
                while left:
                    block = src.read(min(left, _COPY_CHUNK))
                    if not block:
                        raise OSError(f"{stem}.bin: scratch file ended early")
                    dst.write(block)
                    left -= len(block)


def prepare(source, tokenizer, output: str, *, add_bos: bool = True, add_eos: bool = True,
            workers: int = 1, shard_tokens: int = DEFAULT_SHARD_TOKENS, overwrite: bool = False,
            source_info: dict | None = None, timings: dict | None = None) -> dict:
    """Writes the prepared folder `output` for every document of `source`; returns the manifest.

    `timings`, if given, receives wall_s and tokenize_cpu_s (CPU seconds of all workers).
    """
    wall0 = time.perf_counter()
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens must be > 0, got {shard_tokens}")
    if workers <= 0:
        raise ValueError(f"workers must be > 0, got {workers}")
    output = os.path.abspath(os.path.expanduser(output))
    if os.path.exists(output):
        if not overwrite:
            raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
        if not os.path.isfile(os.path.join(output, MANIFEST)) and (not os.path.isdir(output) or os.listdir(output)):
            raise FileExistsError(f"{output} exists and is not a prepared folder; not replacing it")
    n = len(source)
    dtype = token_dtype(tokenizer.vocab_size)
    tmp = f"{output}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    scratch = os.path.join(tmp, "_scratch")
    os.makedirs(scratch)
    try:
        bounds = np.linspace(0, n, min(workers, max(n, 1)) + 1).round().astype(np.int64)
        jobs = [(source, tokenizer, add_bos, add_eos, int(a), int(b), dtype.name,
                 os.path.join(scratch, f"part-{w:05d}")) for w, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
        if len(jobs) == 1:
            done = [_tokenize_range(*jobs[0])]
        else:
            # Not fork: the parent may hold JAX / grain threads, which fork would copy mid-state.
            # A fork server that imported the (slow to import) package once starts workers fast.
            # An executor, not a Pool: a worker that dies raises instead of hanging.
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["jaxllm.data.prepare", "jaxllm.data.tokenizer"])
            with concurrent.futures.ProcessPoolExecutor(len(jobs), mp_context=ctx) as ex:
                done = list(ex.map(_tokenize_range, *zip(*jobs)))
        stems = [stem for stem, _ in done]
        per_worker = [np.load(stem + ".len.npy") for stem in stems]
        lengths = np.concatenate(per_worker) if per_worker else np.zeros(0, np.int64)
        tokens = _Concat(stems, [int(x.sum()) for x in per_worker], dtype.itemsize)
        cum = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        shards, start = [], 0
        for i, end in enumerate(_shard_ends(lengths, shard_tokens)):
            bin_name, idx_name = shard_names(i)
            with open(os.path.join(tmp, bin_name), "wb") as f:
                tokens.copy(int(cum[start]), int(cum[end]), f)
            np.save(os.path.join(tmp, idx_name), cum[start:end + 1] - cum[start])
            shards.append({"tokens_file": bin_name, "index_file": idx_name, "documents": end - start,
                           "tokens": int(cum[end] - cum[start])})
            start = end
        shutil.rmtree(scratch)
        manifest = {
            "format": FORMAT, "version": VERSION, "dtype": dtype.name,
            "documents": int(n), "tokens": int(cum[-1]), "shard_tokens": int(shard_tokens),
            "shards": shards, "tokenizer": tokenizer_info(tokenizer),
            "add_bos": bool(add_bos), "add_eos": bool(add_eos),
            "sources": {**(source_info or {}), "skipped": dict(sorted(getattr(source, "skipped", {}).items()))},
        }
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        if os.path.exists(output):  # --overwrite: swap in the new folder, then drop the old one
            old = f"{output}.old-{os.getpid()}"
            os.replace(output, old)
            os.replace(tmp, output)
            shutil.rmtree(old)
        else:
            os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if timings is not None:
        timings.update(wall_s=time.perf_counter() - wall0, tokenize_cpu_s=sum(cpu for _, cpu in done))
    return manifest


# ----------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; an expected user error (bad source, tokenizer or output) is one line on
    stderr and exit status 2, anything else a traceback."""
    ap = argparse.ArgumentParser(prog="python -m jaxllm.data.prepare", description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="run config: its data section gives sources, tokenizer, BOS/EOS, strict")
    ap.add_argument("--split", choices=("train", "eval"), default="train", help="data.train or data.eval")
    ap.add_argument("--input", nargs="+", help="source specs (instead of --config)")
    ap.add_argument("--tokenizer", help="SentencePiece .model or tokenizer.json (with --input)")
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--no-bos", action="store_true", help="with --input: no BOS before each document")
    ap.add_argument("--no-eos", action="store_true", help="with --input: no EOS after each document")
    ap.add_argument("--strict", action="store_true", help="with --input: bad input is an error")
    ap.add_argument("--output", required=True)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("overrides", nargs="*", help="config overrides a.b=c (with --config)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if (args.config is None) == (args.input is None):
        ap.error("give either --config or --input")
    if args.config is not None and args.tokenizer:
        ap.error("--tokenizer goes with --input; with --config set data.tokenizer=...")
    if args.input is not None and args.overrides:
        ap.error("config overrides need --config")
    if args.input is not None and not args.tokenizer:
        ap.error("--input needs --tokenizer")
    if args.workers <= 0 or args.shard_tokens <= 0:
        ap.error("--workers and --shard-tokens must be > 0")
    return run_cli(lambda: _run(args))


def _run(args) -> int:
    from jaxllm.config import DataConfig, load_config

    if args.config is not None:
        cfg = load_config(args.config, args.overrides)
        d = cfg.data
        specs = list(d.train if args.split == "train" else d.eval)
        tokenizer = _config_tokenizer(d, cfg.model.vocab_size)
        text_field, strict, add_bos, add_eos, eval_fraction = d.text_field, d.strict, d.add_bos, d.add_eos, d.eval_fraction
    else:
        specs = list(args.input)
        tokenizer = _open_tokenizer(args.tokenizer, "--tokenizer")  # no model bounds its vocabulary
        text_field, strict, add_bos, add_eos = args.text_field, args.strict, not args.no_bos, not args.no_eos
        eval_fraction = DataConfig().eval_fraction
    done = [s for s in specs if prepared_dir(s)]
    if done:
        raise SourceError(f"{', '.join(done)}: already prepared token shards; give text sources")
    t0 = time.perf_counter()
    source = open_source(specs, text_field=text_field, strict=strict, eval_fraction=eval_fraction)
    try:
        manifest = prepare(source, tokenizer, args.output, add_bos=add_bos, add_eos=add_eos,
                           workers=args.workers, shard_tokens=args.shard_tokens, overwrite=args.overwrite,
                           source_info={"specs": specs, "text_field": text_field, "split": args.split,
                                        "strict": strict})
    except FileExistsError as e:  # --output taken: the user's to resolve
        raise UserError(str(e)) from None
    seconds = time.perf_counter() - t0
    print(json.dumps({"output": os.path.abspath(args.output), "documents": manifest["documents"],
                      "tokens": manifest["tokens"], "shards": len(manifest["shards"]),
                      "dtype": manifest["dtype"], "seconds": round(seconds, 3),
                      "tokens_per_s": round(manifest["tokens"] / max(seconds, 1e-9))}))
    return 0


def _config_tokenizer(data_cfg, vocab_size: int):
    """data.tokenizer of a run config: a file (its vocabulary within model.vocab_size), or "auto"
    (trained on data.train once, cached)."""
    from jaxllm.data.tokenizer import load_tokenizer

    if data_cfg.tokenizer == "auto":
        try:
            return load_tokenizer(data_cfg, vocab_size)
        except RuntimeError as e:  # SentencePiece's trainer rejects a vocabulary the text cannot fill
            raise ConfigError(f"data.tokenizer auto: SentencePiece could not train {vocab_size} pieces "
                              f"(model.vocab_size) on data.train: {_first_line(e)}") from None
    tok = _open_tokenizer(data_cfg.tokenizer, "data.tokenizer")
    if tok.vocab_size > vocab_size:
        raise ConfigError(f"data.tokenizer {data_cfg.tokenizer} has {tok.vocab_size} pieces but model.vocab_size "
                          f"is {vocab_size}; use a model.vocab_size >= {tok.vocab_size}")
    return tok


def _open_tokenizer(path: str, key: str):
    """A SentencePiece .model or tokenizer.json; one that is missing or unreadable is a UserError
    naming `key`."""
    from jaxllm.config import DataConfig
    from jaxllm.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(DataConfig(tokenizer=path), vocab_size=1 << 31)
    except FileNotFoundError:
        raise UserError(f"{key} {path}: no such SentencePiece .model or tokenizer.json (or folder holding one)") from None
    except UserError as e:
        raise UserError(f"{key} {e}") from None



if __name__ == "__main__":
    sys.exit(main())


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
