"""The batch row schema: the fields of one training row, and helpers that build rows.

A row is a dict of numpy arrays of one sequence slot of `seq_len` positions:
  tokens, targets, positions, segment_ids: int32 [seq_len]; loss_mask: float32 [seq_len].
  targets[t] is the token after tokens[t]; segment_ids number the sequences packed into the row
  (1, 2, ...; 0 on padding); positions restart at 0 in every segment; loss_mask is 1 where the
  target is trained on. Formats add masks (sft: ul_mask) or per-row scalars (pairs: margin).
Paired formats hold one row per side under a prefix ("chosen_tokens", ..., see `prefixed`).
Batches stack rows along a new leading axis ([b, seq_len]).

This module imports only numpy: the objectives read `ROW_FIELDS` from here.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

ROW_FIELDS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")
SFT_MASKS = ("ul_mask",)  # the float32 masks an SFT row has beyond ROW_FIELDS (unlikelihood targets)


def padding_row(seq_len: int, pad_id: int, extra_masks: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """A row of padding (tokens and targets pad_id, the rest 0); `extra_masks` name further
    float32 masks (e.g. "ul_mask"). Every field is an array of its own, safe to fill in place."""
    row = {"tokens": np.full(seq_len, pad_id, np.int32), "targets": np.full(seq_len, pad_id, np.int32),
           "positions": np.zeros(seq_len, np.int32), "segment_ids": np.zeros(seq_len, np.int32),
           "loss_mask": np.zeros(seq_len, np.float32)}
    for name in extra_masks:
        row[name] = np.zeros(seq_len, np.float32)
    return row


def sequence_row(prompt: np.ndarray, completion: np.ndarray, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One unpacked row of prompt + completion (2 to seq_len + 1 tokens): segment 1 on the
    real tokens, loss_mask 1 where the target is a completion token."""
    ids = np.concatenate([prompt, completion]).astype(np.int32)
    n = len(ids) - 1
    if not 1 <= n <= seq_len:
        raise ValueError(f"a row needs 2 to {seq_len + 1} tokens, got {len(ids)}")
    row = padding_row(seq_len, pad_id)
    row["tokens"][:n] = ids[:-1]
    row["targets"][:n] = ids[1:]
    row["positions"][:n] = np.arange(n, dtype=np.int32)
    row["segment_ids"][:n] = 1
    row["loss_mask"][max(len(prompt) - 1, 0):n] = 1.0  # targets that are completion tokens
    return row


def prefixed(prefix: str, row: dict) -> dict:
    """The row's fields renamed `prefix + name` (e.g. "chosen_" for one side of a pair)."""
    return {f"{prefix}{k}": v for k, v in row.items()}


def stack_rows(rows: Sequence[dict]) -> dict[str, np.ndarray]:
    """Rows (dicts with the same fields) -> one batch: each field stacked along a new axis 0."""
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
