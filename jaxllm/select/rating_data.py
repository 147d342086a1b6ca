"""Batches of the rating tasks (`task: rater`, `task: edu`): judged pairs or annotated texts,
held in memory as text, tokenized a batch at a time.

Training: endless global batches of trainer.batch_size examples, in an order reshuffled each
epoch by (data.seed, epoch); each process takes its slice [p * b, (p + 1) * b) of every global
batch. The state is (epoch, batch in epoch), so a resumed run continues with exactly the
batches the original would have made. Eval: the first trainer.eval_batches global batches of
data.eval in file order, the last one completed with masked padding.

Rows are `records.TextRows` (BOS + text + EOS, cut to data.seq_len). Pair batches:
a_{tokens,positions,segment_ids}, b_* [b, T], p [b], pair_mask [b]; text batches: tokens,
positions, segment_ids, score [b], row_mask [b] (see `select.objectives`).
"""

from __future__ import annotations

import math

import numpy as np

from jaxllm.data.batching import per_process_batch, process_layout
from jaxllm.data.files import file_kind, resolve_files
from jaxllm.select.records import SelectError, TextRows, read_annotations, read_judgments


def _jsonl_files(specs, key: str) -> list[str]:
    files = [f for spec in specs for f in resolve_files(spec)]
    other = [f for f in files if file_kind(f) != "jsonl"]
    if other or not files:
        raise SelectError(f"{key}: the rating tasks read .jsonl files, got {', '.join(other) or 'none'}")
    return files


class RatingExamples:
    """The examples of one split and how a set of them becomes a batch."""

    def __init__(self, kind: str, specs, key: str, rows: TextRows, text_field: str = "text"):
        files = _jsonl_files(specs, key)
        self.kind, self.rows = kind, rows
        if kind == "pairs":
            self.a, self.b, self.target, self.criterion = read_judgments(files, what=key)
        else:
            self.a, self.target = read_annotations(files, text_field, what=key)
            self.criterion = None
        self.size = len(self.target)

    def batch(self, indices, real=None) -> dict[str, np.ndarray]:
        """Batch of examples `indices`; `real` [b] bool marks rows that count (default all)."""
        real = np.ones(len(indices), bool) if real is None else np.asarray(real)
        target = self.target[indices].astype(np.float32)
        if self.kind == "pairs":
            a = self.rows.stack([self.a[i] for i in indices])
            b = self.rows.stack([self.b[i] for i in indices])
            return ({f"a_{k}": v for k, v in a.items()} | {f"b_{k}": v for k, v in b.items()}
                    | {"p": target, "pair_mask": real.astype(np.float32)})
        return self.rows.stack([self.a[i] for i in indices]) | {"score": target, "row_mask": real.astype(np.float32)}


class RatingBatches:
    """Endless per-process training batches (see the module doc); JSON-able state."""

    def __init__(self, examples: RatingExamples, global_batch: int, seed: int, settings: dict, *,
                 process_index: int | None = None, process_count: int | None = None):
        self.process_index, self.process_count = process_layout(process_index, process_count)
        self.batch = per_process_batch(global_batch, self.process_count)
        if examples.size < global_batch:
            raise SelectError(f"data.train: {examples.size} examples do not fill one batch of "
                              f"trainer.batch_size {global_batch}")
        self.examples, self.global_batch, self.seed = examples, global_batch, seed
        self.per_epoch = examples.size // global_batch  # the remainder waits for the next epoch's order
        self.settings = settings
        self.epoch = self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.examples.size)
        start = self.index * self.global_batch + self.process_index * self.batch
        batch = self.examples.batch(order[start:start + self.batch])
        self.index += 1
        if self.index == self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return batch

    def stats(self) -> dict[str, float]:
        return {"epoch": self.epoch + self.index / self.per_epoch}

    def get_state(self) -> dict:
        return {"settings": self.settings, "epoch": self.epoch, "index": self.index}

    def set_state(self, state: dict) -> None:
        if state.get("settings") != self.settings:
            raise ValueError(f"data iterator state was saved with other settings: saved {state.get('settings')!r}, "
                             f"now {self.settings!r}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def eval_batches(examples: RatingExamples, global_batch: int, num_batches: int, *,
                 process_index: int | None = None, process_count: int | None = None) -> list[dict]:
    """This process's slices of the first `num_batches` global batches of the split, in order;
    the last is filled with masked copies of example 0."""
    process_index, process_count = process_layout(process_index, process_count)
    batch = per_process_batch(global_batch, process_count)
    n = min(examples.size, num_batches * global_batch)
    out = []
    for k in range(math.ceil(n / global_batch)):
        slots = np.arange(k * global_batch, (k + 1) * global_batch)[process_index * batch:(process_index + 1) * batch]
        real = slots < n
        out.append(examples.batch(np.where(real, slots, 0), real))
    return out
