"""SentencePiece tokenizer: loading, training, and the cached "auto" tokenizer.

Training settings are chosen for code: identity normalisation, no whitespace collapsing and no
dummy-prefix space, so `decode(encode(text)) == text` including Python indentation; byte
fallback so any text encodes; digits split. The text is fed to the trainer line by line (a
piece never spans a newline; "\n" encodes as the byte piece <0x0A>), capped at `max_chars`
characters so training stays fast: the whole ~12 MB stdlib corpus trains a 4096-piece BPE
model in a few seconds on 2 cores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import random
import tempfile
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

import jaxllm.paths as paths
from jaxllm.data.documents import DocumentSource, open_source
from jaxllm.data.files import file_lock, resolve_files, stdlib_root
from jaxllm.errors import ConfigError, UserError

log = logging.getLogger(__name__)

# Special ids of models trained here (Llama convention plus a pad piece).
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# Longest line given to the trainer (SentencePiece drops longer "sentences" entirely).
_MAX_LINE_CHARS = 4096
# Bump when training settings change, so cached "auto" tokenizers are retrained.
_TRAIN_VERSION = 1


class Tokenizer:
    """A SentencePiece model; `encode` adds no BOS/EOS (the data pipeline does)."""

    def __init__(self, model_file: str | None = None, *, model_proto: bytes | None = None):
        if (model_file is None) == (model_proto is None):
            raise ValueError("give exactly one of model_file and model_proto")
        if model_file is not None:
            with open(model_file, "rb") as f:
                model_proto = f.read()
        self.path = model_file
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._piece_sp = None  # (start, rest) processors of encode_piece, built on first use

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_piece(self, text: str, start: bool = False) -> list[int]:
        """Ids of `text` as a piece of a longer text (chat encoding): a dummy prefix only at the
        text's start and no whitespace removed (`jaxllm.data.sp_model.piece_models`)."""
        if self._piece_sp is None:
            from jaxllm.data.sp_model import piece_models

            self._piece_sp = tuple(self._sp if p is None else spm.SentencePieceProcessor(model_proto=p)
                                   for p in piece_models(self._proto))
        return self._piece_sp[0 if start else 1].encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    @property
    def model_proto(self) -> bytes:
        """The SentencePiece model's bytes (what identifies the tokenizer)."""
        return self._proto

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        # Models without a pad piece pad with EOS (or 0); padded positions are masked anyway.
        for i in (self._sp.pad_id(), self._sp.eos_id()):
            if i >= 0:
                return i
        return 0

    def __getstate__(self):  # the SentencePiece processor itself does not pickle
        return {"path": self.path, "proto": self._proto}

    def __setstate__(self, state):
        self.path, self._proto = state["path"], state["proto"]
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self._piece_sp = None

    def __repr__(self) -> str:
        return f"Tokenizer({self.path or '<in memory>'}, vocab_size={self.vocab_size})"


def _training_lines(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Non-blank lines of `texts` until `max_chars` characters were yielded."""
    budget = max_chars
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            line = line[:_MAX_LINE_CHARS]
            yield line
            budget -= len(line)
            if budget <= 0:
                return


def train_settings(vocab_size: int, *, model_type: str = "bpe", max_chars: int = 20_000_000) -> dict:
    """The SentencePiece trainer options used by `train_sentencepiece` (also the cache key)."""
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    return dict(
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,  # runs of indentation spaces become pieces
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=False,  # else decode would eat a leading space
        character_coverage=0.9995,  # rare characters go to byte pieces
        hard_vocab_limit=False,  # a small corpus may give fewer pieces than asked for
        max_sentence_length=4 * _MAX_LINE_CHARS,  # bytes: room for 4096 non-ASCII chars
        # The line cap below keeps SentencePiece from sampling, so training is deterministic
        # (every process of a multi-host run that trains its own copy gets the same model).
        input_sentence_size=0,
        shuffle_input_sentence=False,
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
        max_chars=max_chars,
        version=_TRAIN_VERSION,
    )


def train_sentencepiece(texts: Iterable[str], vocab_size: int, out_prefix: str, *,
                        model_type: str = "bpe", max_chars: int = 20_000_000,
                        num_threads: int | None = None) -> str:
    """Trains a SentencePiece model on (the first `max_chars` characters of) `texts`.

    Writes `{out_prefix}.model` atomically (temp file + rename) and returns its path.
    """
    settings = train_settings(vocab_size, model_type=model_type, max_chars=max_chars)
    options = {k: v for k, v in settings.items() if k not in ("max_chars", "version")}
    lines = _training_lines(texts, max_chars)
    first = next(lines, None)
    if first is None:
        raise UserError("no text to train a tokenizer on")
    buf = io.BytesIO()

    def all_lines():
        yield first
        yield from lines

    spm.SentencePieceTrainer.train(
        sentence_iterator=all_lines(), model_writer=buf, minloglevel=2,
        num_threads=num_threads or min(4, os.cpu_count() or 1), **options)
    path = out_prefix + ".model"
    _atomic_write(path, buf.getvalue())
    return path


def _atomic_write(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".model")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; other users may share the cache
        os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def sample_texts(source: DocumentSource, max_chars: int, seed: int = 0) -> Iterator[str]:
    """Documents of `source` in a seeded random order until about `max_chars` characters.

    Picks a random subset and reads it in index order (each parquet row group is decoded once),
    sizing the subset from the average length of a first small sample.
    """
    n = len(source)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    probe = sorted(order[: min(n, 64)])
    probe_texts = [source[i] for i in probe]
    yield from probe_texts
    remaining = max_chars - sum(map(len, probe_texts))
    avg = max(1.0, sum(map(len, probe_texts)) / max(1, len(probe_texts)))
    want = min(n - len(probe), int(remaining / avg * 1.2) + 1) if remaining > 0 else 0
    for i in sorted(order[len(probe): len(probe) + want]):
        yield source[i]


def _cache_key(data_cfg, vocab_size: int, settings: dict) -> str:
    files = []
    for spec in data_cfg.train:
        for path in resolve_files(spec, eval_fraction=data_cfg.eval_fraction):
            # stdlib files by relative path: one key across Python installs of the same stdlib.
            name = os.path.relpath(path, stdlib_root()) if spec.startswith("stdlib:") else path
            files.append((spec, name, os.path.getsize(path)))
    blob = json.dumps({"train": list(data_cfg.train), "text_field": data_cfg.text_field,
                       "eval_fraction": data_cfg.eval_fraction, "files": files,
                       "vocab_size": vocab_size, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _open(cls, path: str):
    """The tokenizer file at `path`; a UserError naming it when the library cannot read it."""
    kind = "a SentencePiece model" if cls is Tokenizer else "a Hugging Face tokenizer.json"
    try:
        return cls(path)
    except RuntimeError as e:  # sentencepiece: not a model proto
        raise UserError(f"{path}: not {kind} ({_first_line(e)})") from e
    except Exception as e:  # the tokenizers library raises a bare Exception for a file it cannot parse
        if type(e) is not Exception:
            raise
        raise UserError(f"{path}: not {kind} ({_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_tokenizer(data_cfg, vocab_size: int) -> Tokenizer:
    """The tokenizer `data_cfg.tokenizer` names (a SentencePiece .model, a Hugging Face
    tokenizer.json or its folder); "auto" trains on `data_cfg.train` once, cached.

    Raises if the tokenizer has more pieces than the model's `vocab_size` (a larger, padded
    model vocabulary is fine).
    """
    if data_cfg.tokenizer != "auto":
        path = _local_tokenizer(paths.expand(data_cfg.tokenizer))
        hf_json = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if hf_json.endswith("tokenizer.json") and os.path.isfile(hf_json):
            from jaxllm.data.hf_tokenizer import HFTokenizer  # SmolLM2's, Llama 3's, Qwen2's

            tok = _open(HFTokenizer, hf_json)
        elif os.path.isfile(path):
            tok = _open(Tokenizer, path)
        else:
            raise FileNotFoundError(f"data.tokenizer: no SentencePiece .model file or Hugging Face "
                                    f"tokenizer.json (or folder holding one) at {path}")
    else:
        settings = train_settings(vocab_size)
        cache_dir = os.path.expanduser(data_cfg.tokenizer_cache_dir)
        os.makedirs(cache_dir, exist_ok=True)
        prefix = os.path.join(cache_dir, f"sp-bpe{vocab_size}-{_cache_key(data_cfg, vocab_size, settings)}")
        if not os.path.isfile(prefix + ".model"):
            with file_lock(prefix + ".lock"):
                if not os.path.isfile(prefix + ".model"):  # another process may have finished it
                    log.info("training a %d-piece tokenizer on %s", vocab_size, ", ".join(data_cfg.train))
                    source = open_source(data_cfg.train, text_field=data_cfg.text_field,
                                         strict=data_cfg.strict, eval_fraction=data_cfg.eval_fraction)
                    train_sentencepiece(sample_texts(source, settings["max_chars"]), vocab_size, prefix,
                                        max_chars=settings["max_chars"])
        tok = Tokenizer(prefix + ".model")
    if tok.vocab_size > vocab_size:
        raise ConfigError(f"data.tokenizer {getattr(tok, 'path', data_cfg.tokenizer)} has {tok.vocab_size} pieces but "
                          f"model.vocab_size is {vocab_size}; use a model vocab_size >= {tok.vocab_size}")
    return tok


# ----------------------------------------------------------------------------- a run's own tokenizer

# A run directory keeps a copy of its tokenizer under one of these names, so later stages (PMA
# merge, SFT, DPO, generation, scoring) read exactly the pieces the model was trained with.
RUN_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def _companions() -> tuple[str, ...]:
    from jaxllm.data.chat_template import CONFIG_FILE, TEMPLATE_FILE

    return CONFIG_FILE, TEMPLATE_FILE


def _local_tokenizer(path: str) -> str:
    """A local path for a tokenizer at a URL (a .model, a tokenizer.json or its folder): the
    tokenizer file and, for tokenizer.json, its companions staged together (`paths`)."""
    if not paths.is_url(path):
        return path
    if path.endswith(".model"):
        return paths.local_copy(path) if paths.isfile(path) else path
    folder, file = (path, "tokenizer.json") if not path.endswith(".json") else (paths.dirname(path), paths.basename(path))
    names = [n for n in (file,) + _companions() if paths.isfile(paths.join(folder, n))]
    if file not in names:
        raise FileNotFoundError(f"data.tokenizer: no tokenizer.json at {paths.join(folder, file)}")
    local = paths.local_folder(folder, names)
    return os.path.join(local, file) if path.endswith(".json") else local


def saved_tokenizer(folder: str) -> str | None:
    """The tokenizer file a run / params / Hugging Face directory holds (local, or staged from a
    URL), if any."""
    folder = paths.expand(folder)
    for name in RUN_TOKENIZER_FILES:
        path = paths.join(folder, name)
        if paths.isfile(path):
            return _local_tokenizer(path)
    return None


def run_tokenizer(cfg, run_dir: str | None = None):
    """The tokenizer of a run: its own saved copy; else, for `data.tokenizer: auto`, the one saved
    with `model.init_from` (continued training, SFT and DPO keep the base model's pieces); else
    what `data.tokenizer` names."""
    for folder in (run_dir, cfg.model.init_from if cfg.data.tokenizer == "auto" else None):
        path = saved_tokenizer(folder) if folder else None
        if path:
            return load_tokenizer(dataclasses.replace(cfg.data, tokenizer=path), cfg.model.vocab_size)
    return load_tokenizer(cfg.data, cfg.model.vocab_size)


def keep_tokenizer(tokenizer, folder: str) -> None:
    """Copies a tokenizer's file (a tokenizer or a path) into `folder` (atomically; a no-op if a
    copy is there). A tokenizer.json takes its tokenizer_config.json (bos/eos/pad) and
    chat_template.jinja along, so the copy has the same special tokens and template."""
    src = tokenizer if isinstance(tokenizer, str) else getattr(tokenizer, "path", None)
    if not src or saved_tokenizer(folder):
        return
    name = "tokenizer.json" if src.endswith(".json") else "tokenizer.model"
    companions = _companions() if name == "tokenizer.json" else []
    copies = [(p, n) for n in companions if os.path.isfile(p := os.path.join(os.path.dirname(src), n))]
    for path, n in copies + [(src, name)]:  # the tokenizer file last: it marks a complete copy
        with open(path, "rb") as f:
            paths.write_bytes(paths.join(paths.expand(folder), n), f.read())
