"""Packing SFT records into rows, whole, as a checkpointable grain stage.

The document packer (jaxllm.data.packing) splits documents across rows and carries no
per-token mask, so conversations have this small greedy packer. Each record is a list of
segments (ids, loss_mask, ul_mask) of at most seq_len + 1 tokens (`chat.sft_segments`: the
conversation, and maybe a negative reply as a segment of its own); a segment of n tokens takes
n - 1 positions (its (token, next token) pairs) and is laid whole into the current row, or
starts the next row when it does not fit the remainder (the rest is padding).

Rows follow jaxllm.data.rows (tokens, targets, positions, segment_ids int32; loss_mask
float32; all [seq_len]) with loss_mask 1 only where the *target* is an assistant token, plus
ul_mask (float32): 1 where the target is a token of a negative reply, for the unlikelihood
loss. Whether the loss is averaged over those tokens per batch (`reduce_loss: mean`) or summed
(`sum`, so long replies weigh more) is the trainer's choice; rows just carry the masks.
"""

from __future__ import annotations

import copy
from typing import Any

import grain
import numpy as np

from jaxllm.data.rows import SFT_MASKS, padding_row


class RowBuilder:
    """Lays (ids, loss_mask, ul_mask) segments one after the other into a row of seq_len pairs."""

    def __init__(self, seq_len: int, pad_id: int):
        if seq_len <= 0:
            raise ValueError(f"seq_len must be > 0, got {seq_len}")
        self.seq_len, self.pad_id = seq_len, pad_id
        self._reset()

    def _reset(self):
        self.row = padding_row(self.seq_len, self.pad_id, SFT_MASKS)
        self.filled = self.segments = 0

    def add(self, ids: np.ndarray, mask: np.ndarray, ul_mask: np.ndarray | None = None):
        a, n = self.filled, len(ids) - 1
        self.segments += 1
        self.row["tokens"][a:a + n] = ids[:-1]
        self.row["targets"][a:a + n] = ids[1:]
        self.row["positions"][a:a + n] = np.arange(n, dtype=np.int32)
        self.row["segment_ids"][a:a + n] = self.segments
        self.row["loss_mask"][a:a + n] = mask[1:]  # the loss is on predicting the target
        if ul_mask is not None:
            self.row["ul_mask"][a:a + n] = ul_mask[1:]
        self.filled += n

    def flush(self) -> dict[str, np.ndarray]:
        row = self.row
        self._reset()
        return row


class SFTPackIterDataset(grain.IterDataset):
    """Packs a stream of SFT examples whole into rows, as a checkpointable grain stage.

    Each element of the parent is a list of segments (ids, loss_mask, ul_mask) of at most
    seq_len + 1 tokens (one record: its conversation and maybe a negative reply); each segment
    is laid whole into a row, greedily; a segment that does not fit the current row's remainder
    starts the next row. `pack=False` gives every segment a row of its own (one conversation per
    row, padded). The state is the parent's state before the
    record being laid out plus how many of its segments were emitted, so it is JSON-able and a
    restore resumes with exactly the rows that would have come next.
    """

    def __init__(self, parent: grain.IterDataset, seq_len: int, pad_id: int = 0, *, pack: bool = True):
        super().__init__(parent)
        if seq_len <= 0:
            raise ValueError(f"seq_len must be > 0, got {seq_len}")
        self._seq_len, self._pad_id, self._pack = seq_len, pad_id, pack

    def __iter__(self) -> grain.DatasetIterator:
        return _SFTPackIterator(self._parent.__iter__(), self._seq_len, self._pad_id, self._pack)

    def __str__(self) -> str:
        return f"SFTPackIterDataset(seq_len={self._seq_len}, pack={self._pack})"


class _SFTPackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int, pack: bool):
        super().__init__(parent)
        self._rows = RowBuilder(seq_len, pad_id)
        self._pack = pack
        self._segments: list | None = None  # the record being laid out, if any
        self._record_state: dict | None = None  # parent state just before that record
        self._done = 0  # its segments already placed

    def _next_record(self) -> bool:
        state = copy.deepcopy(self._parent.get_state())
        try:
            segments = next(self._parent)
        except StopIteration:
            return False
        self._segments, self._record_state, self._done = list(segments), state, 0
        return True

    def __next__(self) -> dict[str, np.ndarray]:
        rows, seq_len = self._rows, self._rows.seq_len
        while True:
            if self._segments is None and not self._next_record():
                break
            if self._done == len(self._segments):
                self._segments = None
                continue
            ids, mask, ul = self._segments[self._done]
            n = len(ids) - 1
            if n > seq_len:
                raise ValueError(f"segment of {len(ids)} tokens does not fit seq_len {seq_len} (max {seq_len + 1})")
            if n >= 1:
                if rows.filled + n > seq_len or (rows.filled and not self._pack):
                    return rows.flush()  # the segment stays pending for the next row
                rows.add(np.asarray(ids, np.int32), np.asarray(mask, np.float32), np.asarray(ul, np.float32))
            self._done += 1
            if rows.filled == seq_len:
                return rows.flush()
        if rows.filled:
            return rows.flush()
        raise StopIteration

    def get_state(self) -> dict[str, Any]:
        if self._segments is None:
            return {"parent": copy.deepcopy(self._parent.get_state()), "done": 0, "pending": False}
        return {"parent": copy.deepcopy(self._record_state), "done": self._done, "pending": True}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._segments = None
        self._rows.flush()  # rows are emitted whole, so none is half built at a state
        if state["pending"]:
            # Re-read the record being laid out and skip the segments already placed.
            if not self._next_record():
                raise ValueError("cannot restore SFT packing state: the stream ended before the pending record")
            self._done = int(state["done"])

    def __str__(self) -> str:
        return f"SFTPackIterator(seq_len={self._rows.seq_len})"
