"""The pretraining input pipeline: source -> shard -> shuffle/repeat -> tokenize -> pack -> batch.

Batches are numpy dicts for one process, rows as described in `jaxllm.data.packing`:
tokens, targets, positions, segment_ids (int32 [b, seq_len]) and loss_mask (float32).

Training: each process reads every `process_count`-th document (a disjoint shard) before the
shuffle, so no coordination is needed; the shuffle is seeded by `data.seed` and differs each
epoch; the stream repeats forever. Tokenization runs on random-access grain datasets; packing,
a windowed shuffle of the packed rows and batching on the iterator. The returned iterator's
`get_state()` is a small JSON-able dict and `set_state()` resumes with exactly the batches the
original would have produced next. `make_train_iterator` builds this pipeline per source of a
mixture and switches weights and shapes by curriculum stage (`jaxllm.data.mixture`); with one
source and one stage its batches are `train_dataset`'s.

Evaluation: one fixed stream of rows shared by all processes (the eval documents in a fixed
order, independent of `data.seed` and of the process count), cut into global batches of
`trainer.batch_size` rows of which each process takes its slice, so every process gets the
same number of batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from jaxllm.data import sources
from jaxllm.data.packing import PackIterDataset

# Tokens of packed rows shuffled together (memory ~20 bytes per token; a restore re-reads up to
# one window).
ROW_SHUFFLE_TOKENS = 1 << 19
# Eval batches sample rows evenly from at most this many times the rows they need.
EVAL_SCAN_ROWS_FACTOR = 64
# Seed of the fixed eval-document order; not data.seed, so eval batches match across runs.
_EVAL_ORDER_SEED = 0


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return process_index, process_count


def _per_process_batch(batch_size: int, process_count: int) -> int:
    if batch_size % process_count:
        raise ValueError(f"trainer.batch_size ({batch_size}) must be divisible by the number of "
                         f"processes ({process_count})")
    return batch_size // process_count


class Tokenize:
    """str -> int32 token array with BOS/EOS as configured (a picklable grain map function)."""

    def __init__(self, tokenizer, add_bos: bool, add_eos: bool):
        for flag, name, i in ((add_bos, "bos", tokenizer.bos_id), (add_eos, "eos", tokenizer.eos_id)):
            if flag and i < 0:
                raise ValueError(f"data.add_{name} is true but the tokenizer has no {name} piece")
        self.tokenizer = tokenizer
        self.prefix = [tokenizer.bos_id] if add_bos else []
        self.suffix = [tokenizer.eos_id] if add_eos else []

    def __call__(self, text: str | np.ndarray) -> np.ndarray:
        if isinstance(text, np.ndarray):  # already tokenized (prepared shards): checked, passed through
            return sources.check_prepared(text, self.tokenizer, bool(self.prefix), bool(self.suffix))
        return np.asarray(self.prefix + self.tokenizer.encode(text) + self.suffix, dtype=np.int32)


def _read_options(num_workers: int) -> grain.ReadOptions:
    # num_workers threads read and tokenize documents ahead, in the background (SentencePiece
    # releases the GIL while encoding); 0 threads: synchronously in the calling thread.
    return grain.ReadOptions(num_threads=num_workers, prefetch_buffer_size=max(1, 4 * num_workers))


def open_train_source(data_cfg) -> sources.DocumentSource:
    return sources.open_source(data_cfg.train, text_field=data_cfg.text_field, strict=data_cfg.strict,
                               eval_fraction=data_cfg.eval_fraction)


def train_dataset(data_cfg, tokenizer, batch_size: int, *, process_index: int, process_count: int,
                  source: sources.DocumentSource | None = None) -> grain.IterDataset:
    """The per-process training stream as a grain IterDataset (endless)."""
    source = open_train_source(data_cfg) if source is None else source
    if len(source) < process_count:
        raise ValueError(f"{len(source)} training documents cannot be split over {process_count} processes")
    docs = grain.MapDataset.source(source)[process_index::process_count]
    docs = docs.shuffle(seed=data_cfg.seed).repeat()
    ids = docs.map(Tokenize(tokenizer, data_cfg.add_bos, data_cfg.add_eos))
    rows = PackIterDataset(ids.to_iter_dataset(_read_options(data_cfg.num_workers)), data_cfg.seq_len,
                           tokenizer.pad_id, method=data_cfg.packing, split_policy=data_cfg.split_policy,
                           buffer_docs=data_cfg.pack_buffer)
    # A long document fills many consecutive rows; shuffling rows within a window spreads its
    # rows over many batches, so one batch is not a few documents' consecutive chunks.
    window = max(batch_size, ROW_SHUFFLE_TOKENS // data_cfg.seq_len)
    rows = grain.experimental.WindowShuffleIterDataset(rows, window_size=window, seed=data_cfg.seed)
    # No extra batch-prefetch thread: JAX dispatches steps asynchronously, so the next batch is
    # built while the device computes; and grain's ThreadPrefetch iterator errors at exit.
    return rows.batch(batch_size, drop_remainder=True)


class DataIterator(grain.DatasetIterator):
    """The training iterator: grain's, plus a state check against the pipeline's settings.

    `get_state()` is JSON-serialisable; `set_state()` refuses a state saved by a pipeline with
    other settings (sources, seq_len, batch, seed, process layout), which would resume garbage.
    """

    def __init__(self, parent: grain.DatasetIterator, settings: dict[str, Any]):
        super().__init__(parent)
        self.settings = settings

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return {"settings": dict(self.settings), "pipeline": self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        saved = state.get("settings", {})
        diff = {k: (saved.get(k), v) for k, v in self.settings.items() if saved.get(k) != v}
        if diff:
            raise ValueError("data iterator state was saved with other settings: "
                             + ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items()))
        self._parent.set_state(state["pipeline"])

    def __str__(self) -> str:
        return "DataIterator"


def make_train_iterator(cfg, tokenizer, *, process_index: int | None = None,
                        process_count: int | None = None):
    """Per-process training batches of `batch_size // process_count` rows: a
    `jaxllm.data.mixture.MixtureIterator` over `data.sources` and `data.stages` (without them,
    data.train through one stage: the same batches as `train_dataset`). Endless unless a source
    with `on_exhaust: stop` runs out (then StopIteration)."""
    from jaxllm.data.mixture import MixtureIterator

    process_index, process_count = _process(process_index, process_count)
    return MixtureIterator(cfg, tokenizer, process_index=process_index, process_count=process_count)


def eval_source_names(cfg) -> list[str]:
    """Names of the data.sources entries that list eval files, for per-source eval losses."""
    return [s.name for s in cfg.data.sources if s.eval]


def _padding_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    full = np.full(seq_len, pad_id, np.int32)
    zeros = np.zeros(seq_len, np.int32)
    return {"tokens": full, "targets": full, "positions": zeros, "segment_ids": zeros,
            "loss_mask": np.zeros(seq_len, np.float32)}


def make_eval_batches(cfg, tokenizer, num_batches: int, *, process_index: int | None = None,
                      process_count: int | None = None, source_name: str | None = None
                      ) -> list[dict[str, np.ndarray]]:
    """Up to `num_batches` fixed held-out batches (at least one) from `data.eval`, or with
    `source_name` from that entry of data.sources's own eval files (`eval_source_names(cfg)`).

    The last rows are padding (loss_mask 0) when the eval set runs out mid-batch.
    """
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    process_index, process_count = _process(process_index, process_count)
    batch = _per_process_batch(cfg.trainer.batch_size, process_count)
    d = cfg.data
    if source_name is not None:
        spec = {s.name: s for s in d.sources}.get(source_name)
        if spec is None or not spec.eval:
            raise ValueError(f"data.sources has no source {source_name!r} with eval files (sources with "
                             f"some: {', '.join(eval_source_names(cfg)) or 'none'})")
        d = dataclasses.replace(d, eval=spec.eval, text_field=spec.text_field or d.text_field)
    source = sources.open_source(d.eval, text_field=d.text_field, strict=d.strict,
                                 eval_fraction=d.eval_fraction)
    docs = grain.MapDataset.source(source).shuffle(seed=_EVAL_ORDER_SEED)
    ids = docs.map(Tokenize(tokenizer, d.add_bos, d.add_eos))
    rows_it = PackIterDataset(ids.to_iter_dataset(_read_options(0)), d.seq_len, tokenizer.pad_id, method=d.packing,
                              split_policy=d.split_policy, buffer_docs=d.pack_buffer).__iter__()
    # Every process builds the same global rows and keeps its slice of each global batch. Rows
    # are taken evenly spaced over the whole eval stream (up to EVAL_SCAN_ROWS_FACTOR times the
    # rows needed), so a few unusual documents at its start cannot dominate the estimate.
    wanted = num_batches * cfg.trainer.batch_size
    all_rows = []
    for row in rows_it:
        all_rows.append(row)
        if len(all_rows) == wanted * EVAL_SCAN_ROWS_FACTOR:
            break
    picks = np.linspace(0, len(all_rows) - 1, min(wanted, len(all_rows))).round().astype(int)
    global_rows = [all_rows[i] for i in picks]
    pad = -len(global_rows) % cfg.trainer.batch_size
    global_rows += [_padding_row(d.seq_len, tokenizer.pad_id)] * pad
    out = []
    for start in range(0, len(global_rows), cfg.trainer.batch_size):
        mine = global_rows[start + process_index * batch: start + (process_index + 1) * batch]
        out.append({k: np.stack([r[k] for r in mine]) for k in mine[0]})
    return out
