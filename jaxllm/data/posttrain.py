"""Post-training batches: sft rows, preference pairs and kto examples, in the format the caller picks.

Formats (`fmt`, see jaxllm.data.examples):
  sft    conversations -> packed rows (with sft.packing false, one conversation per row):
         tokens, targets, positions, segment_ids int32 [b, T]; loss_mask, ul_mask float32:
         loss_mask 1 where the target is an assistant token, ul_mask 1 where it is a token of
         the record's negative reply (read only when sft.unlikelihood_weight > 0).
  pairs  preference pairs (dpo, reward), one per row, unpacked: chosen_{tokens,targets,positions,
         segment_ids,loss_mask} and rejected_*, index int32 [b] (the pair's index in its split),
         pair_mask float32 [b], margin float32 [b] when preference.margin_field is set.
  kto    unpaired examples: tokens ... loss_mask, label, index, pair_mask, and kl_*: prompt i
         with the completion of example (i + 1) mod N of the split.
With a cached reference, the REFERENCE_FIELDS of the format (float32 [b]) are joined in by
`index` from the arrays the caller passes.

Training reads like the pretraining pipeline: the split's records (a random-access
RecordSource) -> this process's slice [process_index::process_count] -> shuffle by data.seed,
differently each epoch -> repeat -> examples (grain map, data.num_workers threads) -> (sft: pack
whole records, or one per row) -> batch; the iterator is a `batching.DataIterator`, so
get_state() is JSON-able and set_state() checks the settings. Records that cannot be used are
skipped and counted by reason: malformed lines when the split is indexed (`source_skipped`),
and records that fail at tokenization (bad messages, too long, ...) in the iterator's `skipped`
Counter; with data.strict the first one raises SourceError naming file and line.

Evaluation and the reference cache pass use fixed batches: pairs / kto examples in index order,
in global batches of trainer.batch_size of which each process builds only its slice, slots of
skipped examples and the tail being padding rows (masks 0, pair_mask 0, index -1); sft rows
packed from the eval records in a fixed shuffled order and picked like pretraining eval rows
(`batching.fixed_eval_batches`). Every process gets the same number of batches.
"""

from __future__ import annotations

import collections
import math
from typing import Iterator, Sequence

import grain
import numpy as np

from jaxllm.data.batching import (EVAL_ORDER_SEED, DataIterator, fixed_eval_batches, per_process_batch,
                                  process_layout, read_options)
from jaxllm.data.examples import (CountSkips, Examples, IndexedSource, Skipped, check_format, negative_field,
                                  open_split)
from jaxllm.data.files import SourceError
from jaxllm.data.records import RecordSource
from jaxllm.data.rows import stack_rows
from jaxllm.data.sft_packing import SFTPackIterDataset

REFERENCE_FIELDS = {"pairs": ("ref_chosen_logps", "ref_rejected_logps"), "kto": ("ref_logps", "ref_kl_logps")}


class JoinReference:
    """Adds the cached reference log-probs of a batch's examples, looked up by `index` (0 on
    padding rows). `reference` is {"train": {field: array [N]}, "eval": {...}}."""

    def __init__(self, fmt: str, reference: dict, split: str, n: int):
        if fmt not in REFERENCE_FIELDS:
            raise ValueError(f"a cached reference is for formats {' and '.join(REFERENCE_FIELDS)}, not {fmt!r}")
        if split not in reference:
            raise ValueError(f"reference has no {split!r} arrays (has: {', '.join(reference)})")
        want = REFERENCE_FIELDS[fmt]
        got = reference[split]
        if set(got) != set(want):
            raise ValueError(f"reference[{split!r}] must hold exactly {', '.join(want)}; got {', '.join(got)}")
        self.arrays = {}
        for f in want:
            a = np.asarray(got[f], np.float32)
            if a.shape != (n,):
                raise ValueError(f"reference[{split!r}][{f!r}] has shape {a.shape}; the split has {n} examples")
            self.arrays[f] = a

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        index = np.asarray(batch["index"])
        real = index >= 0
        out = dict(batch)
        for f, a in self.arrays.items():
            out[f] = np.where(real, a[np.where(real, index, 0)], 0.0).astype(np.float32)
        return out


def split_size(cfg, fmt: str, split: str) -> int:
    """N: the number of records of the split, which `index` ranges over (fixed before tokenizing)."""
    return len(open_split(cfg, fmt, split))


# ----------------------------------------------------------------------------- training


def _settings(cfg, tokenizer, fmt: str, batch: int, process_index: int, process_count: int) -> dict:
    d, s, p = cfg.data, cfg.sft, cfg.preference
    out = {"format": fmt, "train": list(d.train), "template": s.template, "seq_len": d.seq_len,
           "batch": batch, "seed": d.seed, "add_bos": d.add_bos, "vocab_size": tokenizer.vocab_size,
           "process_index": process_index, "process_count": process_count}
    if fmt == "sft":
        out.update(messages_field=s.messages_field, negative_field=negative_field(cfg) or "",
                   truncation=s.truncation, packing=s.packing)
    else:
        out.update(prompt_field=p.prompt_field, max_prompt_len=p.max_prompt_len)
        if fmt == "pairs":
            out.update(chosen_field=p.chosen_field, rejected_field=p.rejected_field, margin_field=p.margin_field)
    return out


def train_iterator(cfg, tokenizer, fmt: str, *, process_index: int | None = None,
                   process_count: int | None = None, reference: dict | None = None) -> DataIterator:
    """Endless per-process training batches of trainer.batch_size // process_count rows (sft) /
    pairs / examples (kto); see the module doc. The returned iterator has `skipped` (Counter of
    records skipped at tokenization so far) and `source_skipped`."""
    check_format(fmt)
    process_index, process_count = process_layout(process_index, process_count)
    batch = per_process_batch(cfg.trainer.batch_size, process_count)
    source = _open_train_split(cfg, fmt, process_count)
    join = JoinReference(fmt, reference, "train", len(source)) if reference is not None else None
    rows, counted = _train_rows(cfg, tokenizer, fmt, source, process_index, process_count, repeat=True)
    ds = rows.batch(batch, drop_remainder=True)
    if join is not None:
        ds = ds.map(join)
    it = DataIterator(ds.__iter__(), _settings(cfg, tokenizer, fmt, batch, process_index, process_count))
    it.skipped, it.source_skipped = counted.counts, source.skipped
    return it


def _open_train_split(cfg, fmt: str, process_count: int) -> RecordSource:
    source = open_split(cfg, fmt, "train")
    if len(source) < process_count:
        raise ValueError(f"{len(source)} training records cannot be split over {process_count} processes")
    return source


def _train_rows(cfg, tokenizer, fmt: str, source, process_index: int, process_count: int, *, repeat: bool):
    """(rows, skip counter) of this process's training stream: one epoch, or endless epochs."""
    d = cfg.data
    records = grain.MapDataset.source(IndexedSource(source))[process_index::process_count].shuffle(seed=d.seed)
    n = len(records)
    if repeat:
        records = records.repeat()
    examples = records.map(Examples(cfg, tokenizer, source, fmt))
    counted = CountSkips(examples.to_iter_dataset(read_options(d.num_workers)), 2 * n)
    if fmt == "sft":
        return SFTPackIterDataset(counted, d.seq_len, tokenizer.pad_id, pack=cfg.sft.packing), counted
    return counted, counted


def batches_per_epoch(cfg, tokenizer, fmt: str, *, process_count: int | None = None) -> dict[str, int]:
    """How many training batches one pass over the train split gives: {"batches": the fewest
    any process gets (its rows // its share of trainer.batch_size), "rows": the rows (sft: packed
    rows; pairs / kto: usable examples) over all processes, "skipped": records skipped}.

    Tokenizes (and for sft packs) the whole split once, every process's slice in turn, in the
    order epoch 0 reads it. Later epochs are reshuffled and sft packs across epoch ends, so the
    epochs after the first hold the same number of rows only approximately (within a row or so
    per epoch)."""
    check_format(fmt)
    if process_count is None:
        process_count = process_layout(None, None)[1]
    batch = per_process_batch(cfg.trainer.batch_size, process_count)
    source = _open_train_split(cfg, fmt, process_count)
    per_process, skipped = [], 0
    for p in range(process_count):
        rows, counted = _train_rows(cfg, tokenizer, fmt, source, p, process_count, repeat=False)
        per_process.append(sum(1 for _ in rows))
        skipped += sum(counted.counts.values())
    return {"batches": min(per_process) // batch, "rows": sum(per_process),
            "skipped": skipped + sum(source.skipped.values())}


# ----------------------------------------------------------------------------- fixed passes


class SplitPass:
    """Fixed batches over chosen examples of a split (pairs / kto), for this process.

    `indices` (split indices, in order) fill global batches of `batch_size` slots; the last one
    is completed with padding. This process builds only its slots [p * b, (p + 1) * b) of each
    batch; skipped examples become padding rows too (counted in `skipped`). len() is the number
    of batches, the same on every process."""

    def __init__(self, cfg, tokenizer, fmt: str, source: RecordSource, indices: Sequence[int], *,
                 process_index: int, process_count: int, join: JoinReference | None = None):
        if check_format(fmt) == "sft":
            raise ValueError("split_pass / SplitPass are for formats pairs and kto; sft rows are packed")
        self.examples = Examples(cfg, tokenizer, source, fmt)
        self.source, self.indices, self.join = source, np.asarray(indices, np.int64), join
        self.global_batch = cfg.trainer.batch_size
        self.batch = per_process_batch(self.global_batch, process_count)
        self.process_index = process_index
        self.num_workers = cfg.data.num_workers
        self.skipped: collections.Counter = collections.Counter()
        self.source_skipped = source.skipped

    def __len__(self) -> int:
        return max(1, math.ceil(len(self.indices) / self.global_batch))

    def slots(self) -> list[int]:
        """The split index of each of this process's rows, batch after batch (-1: padding)."""
        out = []
        for k in range(len(self)):
            start = k * self.global_batch + self.process_index * self.batch
            out += [int(self.indices[g]) if g < len(self.indices) else -1 for g in range(start, start + self.batch)]
        return out

    def _row(self, index: int):
        # Not None for padding: grain drops None elements as filtered out.
        return self.examples.padding() if index < 0 else self.examples((index, self.source[index]))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        self.skipped.clear()
        rows = grain.MapDataset.source(self.slots()).map(self._row)
        rows_it = iter(rows.to_iter_dataset(read_options(self.num_workers)))
        padding = self.examples.padding()
        batch = []
        for row in rows_it:
            if isinstance(row, Skipped):
                self.skipped[row.reason] += 1
                row = padding
            batch.append(row)
            if len(batch) == self.batch:
                out = stack_rows(batch)
                yield self.join(out) if self.join is not None else out
                batch = []


def split_pass(cfg, tokenizer, fmt: str, split: str, *, process_index: int | None = None,
               process_count: int | None = None) -> SplitPass:
    """Every example of the split exactly once, in index order, in global batches of
    trainer.batch_size of which this process gets its slice (padding rows: pair_mask 0,
    index -1); no reference fields. For the reference cache pass (pairs / kto)."""
    process_index, process_count = process_layout(process_index, process_count)
    source = open_split(cfg, fmt, split)
    return SplitPass(cfg, tokenizer, fmt, source, range(len(source)), process_index=process_index,
                     process_count=process_count)


def eval_batches(cfg, tokenizer, fmt: str, num_batches: int, *, process_index: int | None = None,
                 process_count: int | None = None, reference: dict | None = None) -> list[dict[str, np.ndarray]]:
    """Up to `num_batches` fixed held-out batches (at least one) from data.eval, the same on
    every run and independent of data.seed; padding rows are masked.

    pairs / kto: num_batches * trainer.batch_size examples evenly spaced over the split by
    index (all of them if fewer). sft: rows packed from the eval records in a fixed order,
    picked by `batching.fixed_eval_batches`."""
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    check_format(fmt)
    process_index, process_count = process_layout(process_index, process_count)
    per_process_batch(cfg.trainer.batch_size, process_count)
    source = open_split(cfg, fmt, "eval")
    if fmt != "sft":
        n, wanted = len(source), num_batches * cfg.trainer.batch_size
        picks = np.arange(n) if n <= wanted else np.linspace(0, n - 1, wanted).round().astype(np.int64)
        join = JoinReference(fmt, reference, "eval", n) if reference is not None else None
        return list(SplitPass(cfg, tokenizer, fmt, source, picks, process_index=process_index,
                              process_count=process_count, join=join))
    if reference is not None:
        raise ValueError(f"a cached reference is for formats {' and '.join(REFERENCE_FIELDS)}, not sft")
    d = cfg.data
    examples = Examples(cfg, tokenizer, source, fmt)
    records = grain.MapDataset.source(IndexedSource(source)).shuffle(seed=EVAL_ORDER_SEED).map(examples)
    counted = CountSkips(records.to_iter_dataset(read_options(d.num_workers)), len(source))
    rows = SFTPackIterDataset(counted, d.seq_len, tokenizer.pad_id, pack=cfg.sft.packing)
    out = fixed_eval_batches(rows, num_batches, cfg.trainer.batch_size, examples.padding(),
                             process_index=process_index, process_count=process_count)
    if not out:
        raise SourceError(f"data.eval: no record could be used (skipped: {dict(counted.counts)})")
    return out
