"""Post-training examples: the records of a split, each made into one example of a data format.

The caller (a task) picks the format:
  sft    conversations (`sft.messages_field`) -> chat template -> the packing segments of
         `chat.sft_segments`: the conversation, and with sft.unlikelihood_weight > 0 the record's
         negative reply (`sft.negative_field`) after the last user turn's context, as a segment
         of its own.
  pairs  preference pairs (dpo, reward) -> the chosen_* and rejected_* rows of
         `preference_data.PairBuilder` (and margin when preference.margin_field is set).
  kto    unpaired examples -> the row and label of `preference_data.KTOBuilder`, plus kl_* rows:
         prompt i with the completion of example (i + 1) mod N of the split.
pairs and kto examples also carry `index` (int32, the record's index in its split) and
`pair_mask` (float32 1; 0 on padding rows). The template is `sft.template` for every format;
`data.add_bos` prepends BOS unless the template starts with it.

A record that cannot be used becomes `Skipped(reason)` (data.strict: SourceError naming the
record's file and line); `CountSkips` drops those from a stream and counts them by reason.
"""

from __future__ import annotations

import collections
import logging
from typing import Any

import grain
import numpy as np

from jaxllm.data import chat, preference_data
from jaxllm.data.files import SourceError
from jaxllm.data.records import RecordSource
from jaxllm.data.rows import SFT_MASKS, padding_row

log = logging.getLogger(__name__)

FORMATS = ("sft", "pairs", "kto")
SPLITS = ("train", "eval")


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"data format {fmt!r} is not one of {', '.join(FORMATS)}")
    return fmt


def negative_field(cfg) -> str | None:
    """The field of an SFT record's negative reply, when the unlikelihood loss reads it."""
    return cfg.sft.negative_field if cfg.sft.unlikelihood_weight > 0 and cfg.sft.negative_field else None


def open_split(cfg, fmt: str, split: str) -> RecordSource:
    """The records of `data.train` or `data.eval`, with the fields of format `fmt`."""
    check_format(fmt)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    d = cfg.data
    specs = list(d.train if split == "train" else d.eval)
    if not specs:
        raise SourceError(f"data.{split}: no data sources given")
    if fmt == "sft":
        negative = negative_field(cfg)
        source = RecordSource(specs, {cfg.sft.messages_field: (list,)}, {negative: (str,)} if negative else None,
                              strict=d.strict)
    elif fmt == "pairs":
        source = preference_data.open_pairs(specs, cfg.preference, strict=d.strict)
    else:
        source = preference_data.open_kto(specs, cfg.preference, strict=d.strict)
    if len(source) == 0:
        raise SourceError(f"data.{split} ({', '.join(specs)}): no usable records (skipped: {dict(source.skipped)})")
    return source


class Skipped:
    """What the example map yields for a record that cannot be used."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


def build_or_skip(build, item: tuple[int, dict], source: RecordSource, strict: bool):
    """`build(index, record)`, or Skipped(reason) for a record it refuses (a ConversationError);
    with data.strict a SourceError naming the record's file and line instead."""
    index, record = item
    try:
        return build(index, record)
    except chat.ConversationError as e:
        if strict:
            raise SourceError(f"{source.where(index)}: {e} (data.strict is true)") from e
        return Skipped(e.reason)


class IndexedSource:
    """A source whose items are (index, record): the index travels through shuffling."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        return int(index), self.source[int(index)]


class Examples:
    """(index, record) -> one example of format `fmt`, or Skipped (data.strict: SourceError).

    sft: a list of packing segments (chat.sft_segments); pairs / kto: the row fields of
    preference_data's builders plus index and pair_mask."""

    def __init__(self, cfg, tokenizer, source: RecordSource, fmt: str):
        d = cfg.data
        self.format, self.source, self.strict = check_format(fmt), source, d.strict
        self.seq_len, self.pad_id = d.seq_len, tokenizer.pad_id
        template = chat.load_template(cfg.sft.template, tokenizer)
        if fmt == "sft":
            self.tokenizer, self.template, self.encoder = tokenizer, template, chat.ChatEncoder(tokenizer)
            self.messages_field, self.negative_field = cfg.sft.messages_field, negative_field(cfg)
            self.truncation, self.add_bos = cfg.sft.truncation, d.add_bos
        else:
            cls = preference_data.PairBuilder if fmt == "pairs" else preference_data.KTOBuilder
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
        return build_or_skip(self.build, item, self.source, self.strict)

    def padding(self) -> dict[str, np.ndarray]:
        """A padding row of the format: masks 0 (pairs / kto: also index -1, pair_mask 0)."""
        if self.format == "sft":
            return padding_row(self.seq_len, self.pad_id, SFT_MASKS)
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
        raise SourceError(f"{self.give_up_after} records in a row could not be used (skipped so far: "
                          f"{dict(self.counts)}); check data.seq_len, the fields and the template")

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "skipped": dict(self.counts)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.counts.clear()
        self.counts.update(state["skipped"])

    def __str__(self) -> str:
        return "CountSkipsIterator"
