"""Data for the post-training tasks: sft rows, dpo / reward pairs and kto examples, as batches.

`cfg.task` picks the format:
  sft               conversations (`sft.messages_field`) -> chat template -> packed rows (with
                    sft.packing false, one conversation per row)
                    (tokens, targets, positions, segment_ids int32 [b, T]; loss_mask, ul_mask
                    float32): loss_mask 1 where the target is an assistant token, ul_mask 1 where
                    it is a token of the record's negative reply (`sft.negative_field`, read only
                    when sft.unlikelihood_weight > 0: the negative is the last user turn's context
                    plus that reply, packed as a segment of its own with loss_mask 0).
  dpo, reward       preference pairs, one per row, unpacked (see preference_data):
                    chosen_{tokens,targets,positions,segment_ids,loss_mask} and rejected_*, index
                    int32 [b] (the pair's index in its split), pair_mask float32 [b], margin
                    float32 [b] when preference.margin_field is set.
  dpo + kto         unpaired examples: tokens ... loss_mask, label, index, pair_mask, and kl_*:
                    prompt i with the completion of example (i + 1) mod N of the split.
With a cached reference, ref_chosen_logps / ref_rejected_logps (kto: ref_logps / ref_kl_logps)
float32 [b] are joined in by `index` from the arrays the caller passes.

The template is `sft.template` for every task; `data.add_bos` prepends BOS unless the template
starts with it (data.add_eos is not used: the template's turn end closes each reply). Training reads like the pretraining pipeline: the split's records (a random-
access RecordSource) -> this process's slice [process_index::process_count] -> shuffle by
data.seed, differently each epoch -> repeat -> tokenize (grain map, data.num_workers threads) ->
(sft: pack whole records, or one per row) -> batch; the iterator is a `pipeline.DataIterator`, so get_state() is
JSON-able and set_state() checks the settings. Records that cannot be used are skipped and
counted by reason: malformed lines when the split is indexed (`source_skipped`), and records
that fail at tokenization (bad messages, too long, ...) in the iterator's `skipped` Counter;
with data.strict the first one raises SourceError naming file and line.

Evaluation and the reference cache pass use fixed batches: examples in index order (sft: in a
fixed shuffled order, packed), in global batches of trainer.batch_size of which each process
builds only its slice; slots of skipped examples and the tail are padding rows (masks 0, and for
pairs / kto pair_mask 0 and index -1), so every process gets the same number of batches.
"""

from __future__ import annotations

import collections
import logging
import math
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from jaxllm.data import chat, pipeline, preference_data, sources

log = logging.getLogger(__name__)

TASKS = ("sft", "dpo", "reward")
REFERENCE_FIELDS = {"pairs": ("ref_chosen_logps", "ref_rejected_logps"), "kto": ("ref_logps", "ref_kl_logps")}
SPLITS = ("train", "eval")


def task_format(cfg) -> str:
    """"sft", "pairs" (dpo, reward) or "kto" (dpo with preference.loss_type kto)."""
    if cfg.task not in TASKS:
        raise ValueError(f"task {cfg.task!r} has no post-training data; tasks here: {', '.join(TASKS)}")
    if cfg.task == "sft":
        return "sft"
    if cfg.preference.loss_type == "kto":
        if cfg.task != "dpo":
            raise ValueError(f"preference.loss_type kto needs task dpo, not {cfg.task!r}")
        return "kto"
    return "pairs"


def _negative_field(cfg) -> str | None:
    return cfg.sft.negative_field if cfg.sft.unlikelihood_weight > 0 and cfg.sft.negative_field else None


def open_split(cfg, split: str) -> chat.RecordSource:
    """The records of `data.train` or `data.eval` for the task's format."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    d, fmt = cfg.data, task_format(cfg)
    specs = list(d.train if split == "train" else d.eval)
    if not specs:
        raise sources.SourceError(f"data.{split}: no data sources given")
    if fmt == "sft":
        negative = _negative_field(cfg)
        source = chat.RecordSource(specs, {cfg.sft.messages_field: (list,)},
                                   {negative: (str,)} if negative else None, strict=d.strict)
    elif fmt == "pairs":
        source = preference_data.open_pairs(specs, cfg.preference, strict=d.strict)
    else:
        source = preference_data.open_kto(specs, cfg.preference, strict=d.strict)
    if len(source) == 0:
        raise sources.SourceError(f"data.{split} ({', '.join(specs)}): no usable records "
                                  f"(skipped: {dict(source.skipped)})")
    return source


def split_size(cfg, tokenizer, split: str) -> int:
    """N: the number of records of the split, which `index` ranges over (fixed before tokenizing,
    so the tokenizer is not needed; it is taken for a uniform signature)."""
    del tokenizer
    return len(open_split(cfg, split))


# ----------------------------------------------------------------------------- records -> examples


class Skipped:
    """What the example map yields for a record that cannot be used."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


class _Indexed:
    """A source whose items are (index, record): the index travels through shuffling."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        return int(index), self.source[int(index)]


class Examples:
    """(index, record) -> one example of the task's format, or Skipped (data.strict: SourceError).

    sft: a list of packing segments (chat.sft_segments); pairs / kto: the row fields of
    preference_data's builders plus index and pair_mask."""

    def __init__(self, cfg, tokenizer, source: chat.RecordSource):
        d = cfg.data
        self.format, self.source, self.strict = task_format(cfg), source, d.strict
        template = chat.load_template(cfg.sft.template, tokenizer)
        if self.format == "sft":
            self.tokenizer, self.template, self.encoder = tokenizer, template, chat._Encoder(tokenizer)
            self.messages_field, self.negative_field = cfg.sft.messages_field, _negative_field(cfg)
            self.seq_len, self.truncation, self.add_bos = d.seq_len, cfg.sft.truncation, d.add_bos
            self.pad_id = tokenizer.pad_id
        else:
            cls = preference_data.PairBuilder if self.format == "pairs" else preference_data.KTOBuilder
            self.builder = cls(tokenizer, template, cfg.preference, seq_len=d.seq_len, add_bos=d.add_bos)

    def build(self, index: int, record: dict):
        if self.format == "sft":
            return chat.sft_segments(record[self.messages_field], self.tokenizer, self.template,
                                     max_len=self.seq_len + 1, truncation=self.truncation, add_bos=self.add_bos,
                                     negative=record.get(self.negative_field) if self.negative_field else None,
                                     encoder=self.encoder)
        if self.format == "pairs":
            row = self.builder(record)
        else:
            row = self.builder(record, self.source[(index + 1) % len(self.source)])
        row["index"], row["pair_mask"] = np.int32(index), np.float32(1.0)
        return row

    def __call__(self, item: tuple[int, dict]):
        index, record = item
        try:
            return self.build(index, record)
        except chat.ConversationError as e:
            if self.strict:
                raise sources.SourceError(f"{self.source.where(index)}: {e} (data.strict is true)") from e
            return Skipped(e.reason)

    def padding(self) -> dict[str, np.ndarray]:
        """A padding row (pairs / kto): masks 0, index -1, pair_mask 0."""
        if self.format == "sft":
            return chat._RowBuilder(self.seq_len, self.pad_id).flush()
        return {**self.builder.padding(), "index": np.int32(-1), "pair_mask": np.float32(0.0)}


class CountSkips(grain.IterDataset):
    """Drops the Skipped markers of a stream, counting them by reason in `counts` (a Counter
    shared with the iterator, whose state carries it, so a restored iterator counts on).
    `give_up_after` consecutive skips raise SourceError instead of looping forever over data of
    which nothing is usable (2N for a repeated stream of N records: any run of 2N - 1 holds
    a whole epoch)."""

    def __init__(self, parent: grain.IterDataset, give_up_after: int):
        super().__init__(parent)
        self.counts: collections.Counter = collections.Counter()
        self.give_up_after = give_up_after

    def __iter__(self) -> grain.DatasetIterator:
        return _CountSkipsIterator(self._parent.__iter__(), self.counts, self.give_up_after)

    def __str__(self) -> str:
        return "CountSkips"


class _CountSkipsIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, counts: collections.Counter, give_up_after: int):
        super().__init__(parent)
        self.counts, self.give_up_after = counts, give_up_after

    def __next__(self):
        for _ in range(self.give_up_after):
            item = next(self._parent)
            if not isinstance(item, Skipped):
                return item
            if not self.counts[item.reason]:
                log.warning("skipping records that cannot be used: %s (counted in the iterator's `skipped`)",
                            item.reason)
            self.counts[item.reason] += 1
        raise sources.SourceError(f"{self.give_up_after} records in a row could not be used (skipped so far: "
                                  f"{dict(self.counts)}); check data.seq_len, the fields and the template")

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "skipped": dict(self.counts)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.counts.clear()
        self.counts.update(state["skipped"])

    def __str__(self) -> str:
        return "CountSkipsIterator"


class JoinReference:
    """Adds the cached reference log-probs of a batch's examples, looked up by `index` (0 on
    padding rows). `reference` is {"train": {field: array [N]}, "eval": {...}}."""

    def __init__(self, fmt: str, reference: dict, split: str, n: int):
        if fmt not in REFERENCE_FIELDS:
            raise ValueError(f"a cached reference is for task dpo; this task's format is {fmt!r}")
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


# ----------------------------------------------------------------------------- training


def _settings(cfg, tokenizer, fmt: str, batch: int, process_index: int, process_count: int) -> dict:
    d, s, p = cfg.data, cfg.sft, cfg.preference
    out = {"task": cfg.task, "format": fmt, "train": list(d.train), "template": s.template, "seq_len": d.seq_len,
           "batch": batch, "seed": d.seed, "add_bos": d.add_bos, "vocab_size": tokenizer.vocab_size,
           "process_index": process_index, "process_count": process_count}
    if fmt == "sft":
        out.update(messages_field=s.messages_field, negative_field=_negative_field(cfg) or "",
                   truncation=s.truncation, packing=s.packing)
    else:
        out.update(prompt_field=p.prompt_field, max_prompt_len=p.max_prompt_len)
        if fmt == "pairs":
            out.update(chosen_field=p.chosen_field, rejected_field=p.rejected_field, margin_field=p.margin_field)
    return out


def make_train_iterator(cfg, tokenizer, *, process_index: int | None = None, process_count: int | None = None,
                        reference: dict | None = None) -> pipeline.DataIterator:
    """Endless per-process training batches of trainer.batch_size // process_count rows (sft) /
    pairs (dpo, reward) / examples (kto); see the module doc. The returned iterator has
    `skipped` (Counter of records skipped at tokenization so far) and `source_skipped`."""
    fmt = task_format(cfg)
    process_index, process_count = pipeline._process(process_index, process_count)
    batch = pipeline._per_process_batch(cfg.trainer.batch_size, process_count)
    source = _open_train_split(cfg, process_count)
    join = JoinReference(fmt, reference, "train", len(source)) if reference is not None else None
    rows, counted = _train_rows(cfg, tokenizer, source, process_index, process_count, repeat=True)
    ds = rows.batch(batch, drop_remainder=True)
    if join is not None:
        ds = ds.map(join)
    it = pipeline.DataIterator(ds.__iter__(), _settings(cfg, tokenizer, fmt, batch, process_index, process_count))
    it.skipped, it.source_skipped = counted.counts, source.skipped
    return it


def _open_train_split(cfg, process_count: int) -> chat.RecordSource:
    source = open_split(cfg, "train")
    if len(source) < process_count:
        raise ValueError(f"{len(source)} training records cannot be split over {process_count} processes")
    return source


def _train_rows(cfg, tokenizer, source, process_index: int, process_count: int, *, repeat: bool):
    """(rows, skip counter) of this process's training stream: one epoch, or endless epochs."""
    d = cfg.data
    records = grain.MapDataset.source(_Indexed(source))[process_index::process_count].shuffle(seed=d.seed)
    n = len(records)
    if repeat:
        records = records.repeat()
    examples = records.map(Examples(cfg, tokenizer, source))
    counted = CountSkips(examples.to_iter_dataset(pipeline._read_options(d.num_workers)), 2 * n)
    if task_format(cfg) == "sft":
        return chat.SFTPackIterDataset(counted, d.seq_len, tokenizer.pad_id, pack=cfg.sft.packing), counted
    return counted, counted


def batches_per_epoch(cfg, tokenizer, *, process_count: int | None = None) -> dict[str, int]:
    """How many training batches one pass over the train split gives: {"batches": the fewest
    any process gets (its rows // its share of trainer.batch_size), "rows": the rows (sft: packed
    rows; dpo / reward: usable examples) over all processes, "skipped": records skipped}.

    Tokenizes (and for sft packs) the whole split once, every process's slice in turn, in the
    order epoch 0 reads it. Later epochs are reshuffled and sft packs across epoch ends, so the
    epochs after the first hold the same number of rows only approximately (within a row or so
    per epoch)."""
    if process_count is None:
        process_count = pipeline._process(None, None)[1]
    batch = pipeline._per_process_batch(cfg.trainer.batch_size, process_count)
    source = _open_train_split(cfg, process_count)
    per_process, skipped = [], 0
    for p in range(process_count):
        rows, counted = _train_rows(cfg, tokenizer, source, p, process_count, repeat=False)
        per_process.append(sum(1 for _ in rows))
        skipped += sum(counted.counts.values())
    return {"batches": min(per_process) // batch, "rows": sum(per_process),
            "skipped": skipped + sum(source.skipped.values())}


# ----------------------------------------------------------------------------- fixed passes


def _stack(rows: Sequence[dict]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class SplitPass:
    """Fixed batches over chosen examples of a split (pairs / kto), for this process.

    `indices` (split indices, in order) fill global batches of `batch_size` slots; the last one
    is completed with padding. This process builds only its slots [p * b, (p + 1) * b) of each
    batch; skipped examples become padding rows too (counted in `skipped`). len() is the number
    of batches, the same on every process."""

    def __init__(self, cfg, tokenizer, source: chat.RecordSource, indices: Sequence[int], *,
                 process_index: int, process_count: int, join: JoinReference | None = None):
        self.examples = Examples(cfg, tokenizer, source)
        if self.examples.format == "sft":
            raise ValueError("iterate_split_once / SplitPass are for task dpo or reward (pairs, kto); "
                             "sft rows are packed")
        self.source, self.indices, self.join = source, np.asarray(indices, np.int64), join
        self.global_batch = cfg.trainer.batch_size
        self.batch = pipeline._per_process_batch(self.global_batch, process_count)
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
        rows_it = iter(rows.to_iter_dataset(pipeline._read_options(self.num_workers)))
        padding = self.examples.padding()
        batch = []
        for row in rows_it:
            if isinstance(row, Skipped):
                self.skipped[row.reason] += 1
                row = padding
            batch.append(row)
            if len(batch) == self.batch:
                out = _stack(batch)
                yield self.join(out) if self.join is not None else out
                batch = []


def iterate_split_once(cfg, tokenizer, split: str, *, process_index: int | None = None,
                       process_count: int | None = None) -> SplitPass:
    """Every example of the split exactly once, in index order, in global batches of
    trainer.batch_size of which this process gets its slice (padding rows: pair_mask 0,
    index -1); no reference fields. For the reference cache pass (dpo / reward / kto)."""
    process_index, process_count = pipeline._process(process_index, process_count)
    source = open_split(cfg, split)
    return SplitPass(cfg, tokenizer, source, range(len(source)), process_index=process_index,
                     process_count=process_count)


def make_eval_batches(cfg, tokenizer, num_batches: int, *, process_index: int | None = None,
                      process_count: int | None = None, reference: dict | None = None
                      ) -> list[dict[str, np.ndarray]]:
    """Up to `num_batches` fixed held-out batches (at least one) from data.eval, the same on
    every run and independent of data.seed; padding rows are masked.

    pairs / kto: num_batches * trainer.batch_size examples evenly spaced over the split by
    index (all of them if fewer). sft: rows packed from the eval records in a fixed order,
    taken evenly from up to pipeline.EVAL_SCAN_ROWS_FACTOR times the rows needed."""
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    fmt = task_format(cfg)
    process_index, process_count = pipeline._process(process_index, process_count)
    batch = pipeline._per_process_batch(cfg.trainer.batch_size, process_count)
    source = open_split(cfg, "eval")
    wanted = num_batches * cfg.trainer.batch_size
    if fmt != "sft":
        n = len(source)
        picks = np.arange(n) if n <= wanted else np.linspace(0, n - 1, wanted).round().astype(np.int64)
        join = JoinReference(fmt, reference, "eval", n) if reference is not None else None
        return list(SplitPass(cfg, tokenizer, source, picks, process_index=process_index,
                              process_count=process_count, join=join))
    if reference is not None:
        raise ValueError("a cached reference is for task dpo, not sft")
    d = cfg.data
    examples = Examples(cfg, tokenizer, source)
    records = grain.MapDataset.source(_Indexed(source)).shuffle(seed=pipeline._EVAL_ORDER_SEED).map(examples)
    counted = CountSkips(records.to_iter_dataset(pipeline._read_options(d.num_workers)), len(source))
    all_rows = []
    for row in chat.SFTPackIterDataset(counted, d.seq_len, tokenizer.pad_id, pack=cfg.sft.packing):
        all_rows.append(row)
        if len(all_rows) == wanted * pipeline.EVAL_SCAN_ROWS_FACTOR:
            break
    if not all_rows:
        raise sources.SourceError(f"data.eval: no record could be used (skipped: {dict(counted.counts)})")
    picks = np.linspace(0, len(all_rows) - 1, min(wanted, len(all_rows))).round().astype(int)
    global_rows = [all_rows[i] for i in picks]
    global_rows += [examples.padding()] * (-len(global_rows) % cfg.trainer.batch_size)
    out = []
    for start in range(0, len(global_rows), cfg.trainer.batch_size):
        out.append(_stack(global_rows[start + process_index * batch: start + (process_index + 1) * batch]))
    return out
