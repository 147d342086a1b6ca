"""Token shards, prepared once: `python -m jaxllm.data.prepare`, and `PreparedSource` to read them.

    python -m jaxllm.data.prepare --config configs/tiny.yaml [a.b=c ...] --output DIR \\
        [--split train|eval] [--workers N] [--shard-tokens T]
    python -m jaxllm.data.prepare --input SPEC [SPEC ...] --tokenizer PATH --output DIR [...]

tokenizes a source (any spec `jaxllm.data.sources.open_source` reads) once, with BOS/EOS as
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

`PreparedSource` checks at open that every shard and index file has the size the manifest
says (a truncated copy raises naming the shard), and returns documents as int32 arrays that
remember their manifest, so `sources.check_prepared` (called by the pipeline's Tokenize) raises
on a tokenizer or BOS/EOS setting that differs from the one the shards were made with.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import threading
import time
import weakref
from typing import Any, Sequence

import numpy as np

from jaxllm.data import sources
from jaxllm.data.sources import SourceError

log = logging.getLogger(__name__)

FORMAT = "jaxllm-prepared-tokens"
VERSION = 1
MANIFEST = sources.PREPARED_MANIFEST
DEFAULT_SHARD_TOKENS = 1 << 27  # 256 MiB of uint16 tokens per shard
_COPY_CHUNK = 1 << 24  # bytes copied at a time from the workers' scratch files into shards


def shard_names(i: int) -> tuple[str, str]:
    return f"shard-{i:05d}.bin", f"shard-{i:05d}.idx.npy"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# sha256 per tokenizer object (hashing a large tokenizer.json every document would be slow).
_SHA_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_sha256(tokenizer) -> str:
    """sha256 of the tokenizer's model: the SentencePiece .model bytes or the tokenizer.json file."""
    try:
        return _SHA_CACHE[tokenizer]
    except (KeyError, TypeError):
        pass
    proto = getattr(tokenizer, "_proto", None)  # jaxllm.data.tokenizer.Tokenizer: the .model bytes
    if proto is not None:
        digest = hashlib.sha256(proto).hexdigest()
    elif getattr(tokenizer, "path", None) and os.path.isfile(tokenizer.path):  # HFTokenizer
        h = hashlib.sha256()
        with open(tokenizer.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()
    else:
        raise ValueError(f"cannot identify tokenizer {tokenizer!r}: it has neither a model proto nor a file")
    try:
        _SHA_CACHE[tokenizer] = digest
    except TypeError:
        pass
    return digest


def tokenizer_info(tokenizer) -> dict[str, Any]:
    path = getattr(tokenizer, "path", None)
    return {"path": os.path.abspath(path) if path else None, "sha256": tokenizer_sha256(tokenizer),
            "vocab_size": int(tokenizer.vocab_size), "bos_id": int(tokenizer.bos_id),
            "eos_id": int(tokenizer.eos_id)}


# ----------------------------------------------------------------------------- reading


class _Origin:
    """What a prepared document must be checked against: its manifest's tokenizer and flags."""

    def __init__(self, manifest_path: str, manifest: dict):
        self.manifest_path = manifest_path
        self.tokenizer = manifest["tokenizer"]
        self.add_bos = bool(manifest["add_bos"])
        self.add_eos = bool(manifest["add_eos"])
        self._ok: set = set()  # (tokenizer sha256, add_bos, add_eos, bos_id, eos_id) found to match
        self._lock = threading.Lock()

    def check(self, tokenizer, add_bos: bool, add_eos: bool) -> None:
        key = (tokenizer_sha256(tokenizer), bool(add_bos), bool(add_eos), tokenizer.bos_id, tokenizer.eos_id)
        if key in self._ok:
            return
        problems = []
        if key[0] != self.tokenizer["sha256"]:
            name = getattr(tokenizer, "path", None) or repr(tokenizer)
            problems.append(f"tokenizer: shards made with {self.tokenizer['path']} (sha256 "
                            f"{self.tokenizer['sha256'][:16]}), data.tokenizer is {name} (sha256 {key[0][:16]})")
        for name, want, have in (("add_bos", self.add_bos, key[1]), ("add_eos", self.add_eos, key[2])):
            if want != have:
                problems.append(f"data.{name}: shards made with {str(want).lower()}, configured {str(have).lower()}")
            # tokenizer_config.json (not hashed) may name other special tokens for the same vocabulary
            special = name[4:] + "_id"
            if want and have and self.tokenizer[special] != getattr(tokenizer, special):
                problems.append(f"{special}: shards made with {self.tokenizer[special]}, the tokenizer has "
                                f"{getattr(tokenizer, special)}")
        if problems:
            raise SourceError(f"{self.manifest_path}: prepared tokens do not match the configuration: "
                              + "; ".join(problems) + " (re-run python -m jaxllm.data.prepare)")
        with self._lock:
            self._ok.add(key)

    def __getstate__(self):
        return {"manifest_path": self.manifest_path, "tokenizer": self.tokenizer,
                "add_bos": self.add_bos, "add_eos": self.add_eos}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._ok, self._lock = set(), threading.Lock()


class PreparedTokens(np.ndarray):
    """One prepared document's int32 tokens; `origin` is checked by `sources.check_prepared`."""

    origin: _Origin | None = None

    def __array_finalize__(self, obj):
        self.origin = getattr(obj, "origin", None)

    def __reduce__(self):  # keep `origin` through pickling (grain worker processes)
        fn, args, state = super().__reduce__()
        return fn, args, (state, self.origin)

    def __setstate__(self, state):
        nd_state, self.origin = state
        super().__setstate__(nd_state)


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file (make one with python -m jaxllm.data.prepare)") from None
    except ValueError as e:
        raise SourceError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SourceError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise SourceError(f"{path}: version {manifest.get('version')!r}, this code reads version {VERSION}")
    return manifest


class PreparedSource:
    """Random access to the documents of a prepared folder, as int32 token arrays."""

    def __init__(self, folder: str):
        self.folder = folder
        self.manifest = manifest = read_manifest(folder)
        self.manifest_path = os.path.join(folder, MANIFEST)
        self.dtype = np.dtype(manifest["dtype"])
        self.files, self._tokens, docs = [], [], []
        self._offsets = []
        for i, shard in enumerate(manifest["shards"]):
            bin_path = os.path.join(folder, shard["tokens_file"])
            idx_path = os.path.join(folder, shard["index_file"])
            want = shard["tokens"] * self.dtype.itemsize
            try:
                have = os.path.getsize(bin_path)
            except OSError:
                raise SourceError(f"{bin_path}: missing shard (listed in {self.manifest_path})") from None
            if have != want:
                raise SourceError(f"{bin_path}: truncated or damaged shard: {have} bytes, the manifest "
                                  f"says {want} ({shard['tokens']} {self.dtype.name} tokens)")
            try:
                offsets = np.load(idx_path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise SourceError(f"{idx_path}: unreadable shard index ({e})") from None
            if (offsets.shape != (shard["documents"] + 1,) or offsets[0] != 0
                    or offsets[-1] != shard["tokens"]):
                raise SourceError(f"{idx_path}: index of shape {offsets.shape} ending at "
                                  f"{int(offsets[-1]) if len(offsets) else None} does not match the manifest "
                                  f"({shard['documents']} documents, {shard['tokens']} tokens)")
            self.files.append(bin_path)
            self._tokens.append(shard["tokens"])
            self._offsets.append(offsets)
            docs.append(shard["documents"])
        self._ends = np.cumsum(docs, dtype=np.int64)
        self.skipped: collections.Counter = collections.Counter()  # bad input was skipped at prepare time
        self.origin = _Origin(self.manifest_path, manifest)
        self._maps: list = [None] * len(self.files)
        self._lock = threading.Lock()

    @property
    def _file_ids(self) -> np.ndarray:  # shard of every document (jaxllm.curate.origin reads this)
        return np.repeat(np.arange(len(self.files), dtype=np.int32), np.diff(self._ends, prepend=0))

    def check(self, tokenizer, add_bos: bool, add_eos: bool) -> None:
        self.origin.check(tokenizer, add_bos, add_eos)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def _map(self, i: int) -> np.ndarray:
        mm = self._maps[i]
        if mm is None:
            with self._lock:
                if self._maps[i] is None:
                    n = self._tokens[i]
                    self._maps[i] = (np.memmap(self.files[i], self.dtype, mode="r", shape=(n,)) if n
                                     else np.zeros(0, self.dtype))
                mm = self._maps[i]
        return mm

    def __getitem__(self, index: int) -> PreparedTokens:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(index)
        s = int(np.searchsorted(self._ends, index, side="right"))
        d = index - (int(self._ends[s - 1]) if s else 0)
        a, b = int(self._offsets[s][d]), int(self._offsets[s][d + 1])
        out = np.asarray(self._map(s)[a:b], dtype=np.int32).view(PreparedTokens)
        out.origin = self.origin
        return out

    def __getstate__(self):  # memory maps are reopened lazily in the receiving process
        state = dict(self.__dict__)
        state["_maps"], state["_lock"] = [None] * len(self.files), None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


# ----------------------------------------------------------------------------- writing


def _tokenize_range(source, tokenizer, add_bos: bool, add_eos: bool, start: int, end: int,
                    dtype: str, out_stem: str) -> tuple[str, float]:
    """Tokenizes documents [start, end) into `out_stem`.bin (tokens) and `out_stem`.len.npy;
    returns `out_stem` and the CPU seconds it took."""
    from jaxllm.data.pipeline import Tokenize

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
            ctx.set_forkserver_preload(["jaxllm.data"])
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
    try:
        if args.config is not None:
            if args.tokenizer:
                ap.error("--tokenizer goes with --input; with --config set data.tokenizer=...")
            from jaxllm.config import load_config_or_report
            from jaxllm.data.tokenizer import load_tokenizer

            cfg = load_config_or_report(args.config, args.overrides)
            if cfg is None:
                return 2
            d = cfg.data
            specs = list(d.train if args.split == "train" else d.eval)
            tokenizer = load_tokenizer(d, cfg.model.vocab_size)
            text_field, strict, add_bos, add_eos, eval_fraction = d.text_field, d.strict, d.add_bos, d.add_eos, d.eval_fraction
        else:
            if args.overrides:
                ap.error("config overrides need --config")
            if not args.tokenizer:
                ap.error("--input needs --tokenizer")
            from jaxllm.config import DataConfig
            from jaxllm.data.tokenizer import load_tokenizer

            specs = list(args.input)
            # No model here to bound the vocabulary: any tokenizer size is accepted.
            tokenizer = load_tokenizer(DataConfig(tokenizer=args.tokenizer), vocab_size=1 << 31)
            text_field, strict, add_bos, add_eos = args.text_field, args.strict, not args.no_bos, not args.no_eos
            eval_fraction = DataConfig().eval_fraction
        done = [s for s in specs if sources.prepared_dir(s)]
        if done:
            raise SourceError(f"{', '.join(done)}: already prepared token shards; give text sources")
        t0 = time.perf_counter()
        source = sources.open_source(specs, text_field=text_field, strict=strict, eval_fraction=eval_fraction)
        manifest = prepare(source, tokenizer, args.output, add_bos=add_bos, add_eos=add_eos,
                           workers=args.workers, shard_tokens=args.shard_tokens, overwrite=args.overwrite,
                           source_info={"specs": specs, "text_field": text_field, "split": args.split,
                                        "strict": strict})
    except (SourceError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - t0
    print(json.dumps({"output": os.path.abspath(args.output), "documents": manifest["documents"],
                      "tokens": manifest["tokens"], "shards": len(manifest["shards"]),
                      "dtype": manifest["dtype"], "seconds": round(seconds, 3),
                      "tokens_per_s": round(manifest["tokens"] / max(seconds, 1e-9))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
