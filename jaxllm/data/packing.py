"""Greedy packing of token documents into fixed-length rows, as a checkpointable grain stage.

Each document (a 1-D int array, BOS/EOS already added) of n tokens contributes its n - 1
(token, next token) pairs; pairs are laid into rows of `seq_len` in stream order, a document
that does not fit is split and continues at the start of the next row. So every position with
`loss_mask` 1 has the true next token of its own document as target, also across a split,
and no position is wasted on a last token whose target is missing.

Row contract (numpy, one row; grain's `.batch` stacks them):
  tokens, targets, positions, segment_ids: int32 [seq_len]; loss_mask: float32 [seq_len].
  segment_ids: 1, 2, ... per document piece in the row, 0 for padding.
  positions: 0, 1, ... within each piece. A continuation piece restarts at 0, so positions
    always stay below seq_len (the range RoPE sees in training).
  loss_mask: 1 on every non-padding position.
Padding (tokens and targets = pad_id) only appears in the last row of a finite stream.

Grain's own ConcatThenSplitIterDataset packs the same way but its state holds tuples that do
not survive a JSON round trip (orbax saves iterator state as JSON), so this small iterator
keeps its own state: the parent's state before the document being split, and the offset into it.
"""

from __future__ import annotations

import copy
from typing import Any

import grain
import numpy as np


class PackIterDataset(grain.IterDataset):
    """Packs a stream of token arrays into rows of `seq_len` (input, target) pairs."""

    def __init__(self, parent: grain.IterDataset, seq_len: int, pad_id: int = 0):
        super().__init__(parent)
        if seq_len <= 0:
            raise ValueError(f"seq_len must be > 0, got {seq_len}")
        self._seq_len = seq_len
        self._pad_id = pad_id

    def __iter__(self) -> grain.DatasetIterator:
        return _PackIterator(self._parent.__iter__(), self._seq_len, self._pad_id)

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self._seq_len})"


class _PackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._pad_id = pad_id
        self._arange = np.arange(seq_len, dtype=np.int32)
        self._doc: np.ndarray | None = None  # the document being laid out, if any
        self._doc_parent_state: dict | None = None  # parent state just before `_doc` was read
        self._offset = 0  # pairs of `_doc` already emitted

    def _next_doc(self) -> bool:
        """Reads the next document with at least one pair; False at the end of the stream."""
        while True:
            state = copy.deepcopy(self._parent.get_state())
            try:
                doc = np.asarray(next(self._parent), dtype=np.int32)
            except StopIteration:
                return False
            if doc.ndim != 1:
                raise ValueError(f"packing expects 1-D token arrays, got shape {doc.shape}")
            if len(doc) >= 2:  # a single token has no next token to predict
                self._doc, self._doc_parent_state, self._offset = doc, state, 0
                return True

    def __next__(self) -> dict[str, np.ndarray]:
        n = self._seq_len
        tokens = np.full(n, self._pad_id, np.int32)
        targets = np.full(n, self._pad_id, np.int32)
        positions = np.zeros(n, np.int32)
        segment_ids = np.zeros(n, np.int32)
        filled = segment = 0
        while filled < n:
            if self._doc is None and not self._next_doc():
                break
            doc, start = self._doc, self._offset
            take = min(len(doc) - 1 - start, n - filled)
            tokens[filled:filled + take] = doc[start:start + take]
            targets[filled:filled + take] = doc[start + 1:start + 1 + take]
            positions[filled:filled + take] = self._arange[:take]
            segment += 1
            segment_ids[filled:filled + take] = segment
            filled += take
            self._offset += take
            if self._offset == len(doc) - 1:
                self._doc = None
        if filled == 0:
            raise StopIteration
        return {"tokens": tokens, "targets": targets, "positions": positions,
                "segment_ids": segment_ids, "loss_mask": (segment_ids > 0).astype(np.float32)}

    def get_state(self) -> dict[str, Any]:
        if self._doc is None:
            return {"parent": copy.deepcopy(self._parent.get_state()), "offset": 0}
        return {"parent": copy.deepcopy(self._doc_parent_state), "offset": self._offset}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._doc = None
        if state["offset"]:
            # Re-read the document that was split and skip the pairs already emitted.
            if not self._next_doc():
                raise ValueError("cannot restore packing state: the stream ended before the split document")
            self._offset = int(state["offset"])

    def __str__(self) -> str:
        return f"PackIterator(seq_len={self._seq_len})"
