"""Packing token documents into fixed-length rows, as checkpointable grain stages.

Each document (a 1-D int array, BOS/EOS already added) of n tokens contributes its n - 1
(token, next token) pairs ("pairs" below); a row holds `seq_len` pairs. Two methods
(`data.packing`):

* `greedy`: pairs are laid into rows in stream order; a document that does not fit the rest of
  a row is split and continues at the start of the next row. No padding except in the last row
  of a finite stream, but most documents are cut at a row boundary.
* `best_fit`: a buffer of `data.pack_buffer` documents; each row is filled best-fit-decreasing
  from it: the largest buffered document starts the row, then repeatedly the largest one that
  fits the space left (ties: the one read first), until none fits; the buffer is topped up from
  the stream before every row. Documents that fit a row are never cut, at the price of some
  padding at row ends. So that no document waits forever (and the resume state stays
  bounded), one still buffered after 4 * `pack_buffer` later documents were read starts the
  next row instead.

Documents longer than a row (more than `seq_len` pairs) follow `data.split_policy`: `split`
continues them in the next rows (with greedy, as any document; with best_fit, a full row takes
the first `seq_len` pairs and the rest stays in the buffer as a document of its own), `truncate`
keeps the first `seq_len + 1` tokens and counts the dropped ones.

Every position with `loss_mask` 1 has the true next token of its own document as target, also
across a split, and no position is wasted on a last token whose target is missing.

Row contract (jaxllm.data.rows; numpy, one row; grain's `.batch` stacks them):
  tokens, targets, positions, segment_ids: int32 [seq_len]; loss_mask: float32 [seq_len].
  segment_ids: 1, 2, ... per document piece in the row, 0 for padding.
  positions: 0, 1, ... within each piece. A continuation piece restarts at 0, so positions
    always stay below seq_len (the range RoPE sees in training).
  loss_mask: 1 on every non-padding position.

Counters (`iterator.stats`, summed over a pipeline by `packing_stats`): rows, real_tokens
(positions with loss_mask 1), pad_tokens, truncated_tokens (dropped by `truncate`), documents
(read with at least one pair). They are part of the iterator state, so a resumed run continues
them. Rows are counted when packed, which may be ahead of the rows a trainer has consumed
(shuffle windows, prefetch); ratios such as the padding fraction are unaffected.

Grain's own ConcatThenSplitIterDataset packs greedily too but its state holds tuples that do
not survive a JSON round trip (orbax saves iterator state as JSON), so these iterators keep
their own state: the parent's state before the oldest document still in use, how many elements
were read since, and how far each buffered one was consumed; a restore re-reads them.
"""

from __future__ import annotations

import bisect
import copy
from typing import Any

import grain
import numpy as np

from jaxllm.data.rows import padding_row

METHODS = ("greedy", "best_fit")
SPLIT_POLICIES = ("split", "truncate")
_STAT_KEYS = ("rows", "real_tokens", "pad_tokens", "truncated_tokens", "documents")


class PackIterDataset(grain.IterDataset):
    """Packs a stream of token arrays into rows of `seq_len` (input, target) pairs."""

    def __init__(self, parent: grain.IterDataset, seq_len: int, pad_id: int = 0, *, method: str = "greedy",
                 split_policy: str = "split", buffer_docs: int = 256):
        super().__init__(parent)
        if seq_len <= 0:
            raise ValueError(f"seq_len must be > 0, got {seq_len}")
        if method not in METHODS:
            raise ValueError(f"packing method {method!r} is not one of {', '.join(METHODS)}")
        if split_policy not in SPLIT_POLICIES:
            raise ValueError(f"split_policy {split_policy!r} is not one of {', '.join(SPLIT_POLICIES)}")
        if buffer_docs <= 0:
            raise ValueError(f"buffer_docs must be > 0, got {buffer_docs}")
        self._seq_len = seq_len
        self._pad_id = pad_id
        self._method = method
        self._split_policy = split_policy
        self._buffer_docs = buffer_docs

    def __iter__(self) -> grain.DatasetIterator:
        parent = self._parent.__iter__()
        if self._method == "greedy":
            return _PackIterator(parent, self._seq_len, self._pad_id, self._split_policy)
        return _BestFitPackIterator(parent, self._seq_len, self._pad_id, self._split_policy, self._buffer_docs)

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self._seq_len}, method={self._method}, split_policy={self._split_policy})"


def packing_stats(iterator: grain.DatasetIterator) -> dict[str, int | float]:
    """The packing counters of every packer in `iterator`'s pipeline, summed, plus
    `padding_fraction` = pad_tokens / (real_tokens + pad_tokens) (0 before any row)."""
    total = dict.fromkeys(_STAT_KEYS, 0)
    todo, seen = [iterator], set()
    while todo:
        it = todo.pop()
        if id(it) in seen:
            continue
        seen.add(id(it))
        if isinstance(it, _PackerBase):
            for k in _STAT_KEYS:
                total[k] += it.stats[k]
        todo.extend(getattr(it, "_parents", ()))
    slots = total["real_tokens"] + total["pad_tokens"]
    return {**total, "padding_fraction": total["pad_tokens"] / slots if slots else 0.0}


class _PackerBase(grain.DatasetIterator):
    """Shared parts: reading documents (with the split policy) and writing rows."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int, split_policy: str):
        super().__init__(parent)
        self._seq_len = seq_len
        self._pad_id = pad_id
        self._truncate = split_policy == "truncate"
        self._arange = np.arange(seq_len, dtype=np.int32)
        self.stats = dict.fromkeys(_STAT_KEYS, 0)

    def _read(self) -> np.ndarray | None:
        """The next parent element as a document (truncated if so configured); None at the end.

        Documents of fewer than two tokens (no pair) are returned too; callers skip them.
        """
        try:
            doc = np.asarray(next(self._parent), dtype=np.int32)
        except StopIteration:
            return None
        if doc.ndim != 1:
            raise ValueError(f"packing expects 1-D token arrays, got shape {doc.shape}")
        if self._truncate and len(doc) > self._seq_len + 1:
            self.stats["truncated_tokens"] += len(doc) - (self._seq_len + 1)
            doc = doc[:self._seq_len + 1]
        if len(doc) >= 2:
            self.stats["documents"] += 1
        return doc

    def _row(self, pieces: list[tuple[np.ndarray, int, int]]) -> dict[str, np.ndarray]:
        """A row from (document, first pair, number of pairs) pieces, in order."""
        row = padding_row(self._seq_len, self._pad_id)
        filled = 0
        for segment, (doc, start, take) in enumerate(pieces, 1):
            row["tokens"][filled:filled + take] = doc[start:start + take]
            row["targets"][filled:filled + take] = doc[start + 1:start + 1 + take]
            row["positions"][filled:filled + take] = self._arange[:take]
            row["segment_ids"][filled:filled + take] = segment
            filled += take
        row["loss_mask"][:filled] = 1.0  # pieces fill the row from its start; the rest is padding
        self.stats["rows"] += 1
        self.stats["real_tokens"] += filled
        self.stats["pad_tokens"] += self._seq_len - filled
        return row

    def _restore_stats(self, state: dict[str, Any]) -> None:
        saved = state.get("stats", {})  # states saved before the counters existed have none
        self.stats = {k: int(saved.get(k, 0)) for k in _STAT_KEYS}


class _PackIterator(_PackerBase):
    """Greedy: stream order, documents split at row ends."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int, split_policy: str = "split"):
        super().__init__(parent, seq_len, pad_id, split_policy)
        self._doc: np.ndarray | None = None  # the document being laid out, if any
        self._doc_parent_state: dict | None = None  # parent state just before `_doc` was read
        self._offset = 0  # pairs of `_doc` already emitted

    def _next_doc(self) -> bool:
        """Reads the next document with at least one pair; False at the end of the stream."""
        while True:
            state = copy.deepcopy(self._parent.get_state())
            doc = self._read()
            if doc is None:
                return False
            if len(doc) >= 2:  # a single token has no next token to predict
                self._doc, self._doc_parent_state, self._offset = doc, state, 0
                return True

    def __next__(self) -> dict[str, np.ndarray]:
        n = self._seq_len
        pieces, filled = [], 0
        while filled < n:
            if self._doc is None and not self._next_doc():
                break
            doc, start = self._doc, self._offset
            take = min(len(doc) - 1 - start, n - filled)
            pieces.append((doc, start, take))
            filled += take
            self._offset += take
            if self._offset == len(doc) - 1:
                self._doc = None
        if filled == 0:
            raise StopIteration
        return self._row(pieces)

    def get_state(self) -> dict[str, Any]:
        if self._doc is None:
            return {"parent": copy.deepcopy(self._parent.get_state()), "offset": 0, "stats": dict(self.stats)}
        return {"parent": copy.deepcopy(self._doc_parent_state), "offset": self._offset, "stats": dict(self.stats)}

    def set_state(self, state: dict[str, Any]) -> None:
        if "offset" not in state:
            raise ValueError("packing state was saved by the best_fit packer, but data.packing is greedy")
        self._parent.set_state(state["parent"])
        self._doc = None
        if state["offset"]:
            # Re-read the document that was split and skip the pairs already emitted.
            if not self._next_doc():
                raise ValueError("cannot restore packing state: the stream ended before the split document")
            self._offset = int(state["offset"])
        self._restore_stats(state)

    def __str__(self) -> str:
        return f"PackIterator(seq_len={self._seq_len})"


class _Item:
    """A buffered document: `seq` numbers the parent elements read, `consumed` its pairs already
    packed, `parent_state` the parent's state just before it was read."""

    __slots__ = ("seq", "doc", "consumed", "parent_state")

    def __init__(self, seq: int, doc: np.ndarray, consumed: int, parent_state: dict):
        self.seq, self.doc, self.consumed, self.parent_state = seq, doc, consumed, parent_state

    @property
    def left(self) -> int:
        return len(self.doc) - 1 - self.consumed

    @property
    def key(self) -> tuple[int, int]:
        # Sorted ascending by (pairs left, -seq): the last key <= (space, inf) is the largest
        # document that fits, the earliest read among equals.
        return (self.left, -self.seq)


class _BestFitPackIterator(_PackerBase):
    """Best-fit-decreasing rows from a bounded buffer of documents (see the module doc)."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int, split_policy: str,
                 buffer_docs: int):
        super().__init__(parent, seq_len, pad_id, split_policy)
        self._capacity = buffer_docs
        # Parent elements read after a document before it is made to start a row. In terms of
        # documents, not rows: long documents stay buffered for many rows while they are split.
        self._max_age = 4 * buffer_docs
        self._items: dict[int, _Item] = {}  # by seq; insertion order = read order
        self._keys: list[tuple[int, int]] = []  # sorted keys of the buffered items
        self._seq = 0  # parent elements read so far (relative to the last restore)
        self._exhausted = False

    def _add(self, item: _Item) -> None:
        self._items[item.seq] = item
        bisect.insort(self._keys, item.key)

    def _remove(self, item: _Item) -> None:
        del self._keys[bisect.bisect_left(self._keys, item.key)]
        del self._items[item.seq]

    def _fill(self) -> None:
        while len(self._items) < self._capacity and not self._exhausted:
            state = copy.deepcopy(self._parent.get_state())
            doc = self._read()
            if doc is None:
                self._exhausted = True
                return
            self._seq += 1
            if len(doc) >= 2:
                self._add(_Item(self._seq - 1, doc, 0, state))

    def __next__(self) -> dict[str, np.ndarray]:
        self._fill()
        if not self._items:
            raise StopIteration
        oldest = next(iter(self._items.values()))
        if self._seq - 1 - oldest.seq >= self._max_age:  # max_age documents were read after it
            first = oldest
        else:
            first = self._items[-self._keys[-1][1]]  # the largest
        n = self._seq_len
        pieces = []
        if first.left > n:  # longer than a row (split policy): a full row of its next pairs
            pieces.append((first.doc, first.consumed, n))
            del self._keys[bisect.bisect_left(self._keys, first.key)]  # stays in _items: keeps its age
            first.consumed += n
            bisect.insort(self._keys, first.key)
            return self._row(pieces)
        space = n
        item = first
        while item is not None:
            pieces.append((item.doc, item.consumed, item.left))
            space -= item.left
            self._remove(item)
            i = bisect.bisect_right(self._keys, (space, float("inf"))) - 1
            item = self._items[-self._keys[i][1]] if i >= 0 and space > 0 else None
        return self._row(pieces)

    def get_state(self) -> dict[str, Any]:
        items = list(self._items.values())
        if not items:
            anchor, read = copy.deepcopy(self._parent.get_state()), 0
        else:
            anchor, read = copy.deepcopy(items[0].parent_state), self._seq - items[0].seq
        base = items[0].seq if items else self._seq
        return {"parent": anchor, "read": read, "buffer": [[it.seq - base, it.consumed] for it in items],
                "stats": dict(self.stats)}

    def set_state(self, state: dict[str, Any]) -> None:
        if "read" not in state:
            raise ValueError("packing state was saved by the greedy packer, but data.packing is best_fit")
        self._restore_stats(state)
        self._parent.set_state(state["parent"])
        self._items, self._keys, self._seq = {}, [], 0
        self._exhausted = False
        wanted = {int(k): int(consumed) for k, consumed in state["buffer"]}
        saved_stats = dict(self.stats)
        for k in range(int(state["read"])):
            parent_state = copy.deepcopy(self._parent.get_state())
            doc = self._read()
            if doc is None:
                raise ValueError("cannot restore best-fit packing state: the stream ended before the "
                                 "buffered documents")
            self._seq += 1
            if k in wanted:
                self._add(_Item(k, doc, wanted.pop(k), parent_state))
        if wanted:
            raise ValueError(f"cannot restore best-fit packing state: buffered documents {sorted(wanted)} "
                             f"are not among the {state['read']} re-read")
        self.stats = saved_stats  # re-reading must not count documents or truncations again

    def __str__(self) -> str:
        return f"BestFitPackIterator(seq_len={self._seq_len}, buffer={self._capacity})"
