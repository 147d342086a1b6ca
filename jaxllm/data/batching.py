"""What the batch pipelines (pretraining, mixtures, post-training) share: the process layout,
grain's read options, the one way fixed eval batches are picked, and the checkpointable
training iterator.

Fixed eval batches: every process builds the same global stream of rows (in an order that does
not depend on data.seed or the process count), scans up to EVAL_SCAN_ROWS_FACTOR times the
rows needed, keeps rows evenly spaced over what it scanned (so a few unusual documents at the
start cannot dominate the estimate), pads to a whole number of global batches and takes its
slice [p * b, (p + 1) * b) of each. So every process gets the same number of batches.
"""

from __future__ import annotations

from typing import Any, Iterable

import grain
import numpy as np

from jaxllm.data.rows import stack_rows

# Eval batches sample rows evenly from at most this many times the rows they need.
EVAL_SCAN_ROWS_FACTOR = 64
# Seed of the fixed eval-record order; not data.seed, so eval batches match across runs.
EVAL_ORDER_SEED = 0


def process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(process_index, process_count), JAX's where not given."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return process_index, process_count


def per_process_batch(batch_size: int, process_count: int) -> int:
    """This process's rows of a global batch of trainer.batch_size rows."""
    if batch_size % process_count:
        raise ValueError(f"trainer.batch_size ({batch_size}) must be divisible by the number of "
                         f"processes ({process_count})")
    return batch_size // process_count


def read_options(num_workers: int) -> grain.ReadOptions:
    """num_workers threads read and tokenize records ahead, in the background (SentencePiece
    releases the GIL while encoding); 0 threads: synchronously in the calling thread."""
    return grain.ReadOptions(num_threads=num_workers, prefetch_buffer_size=max(1, 4 * num_workers))


def fixed_eval_batches(rows: Iterable[dict], num_batches: int, global_batch: int, padding: dict, *,
                       process_index: int, process_count: int) -> list[dict[str, np.ndarray]]:
    """This process's slices of up to `num_batches` global eval batches picked from the global
    row stream `rows` (see the module doc); the last batch is completed with `padding` rows.
    No batch at all when `rows` is empty."""
    batch = per_process_batch(global_batch, process_count)
    wanted = num_batches * global_batch
    scanned = []
    for row in rows:
        scanned.append(row)
        if len(scanned) == wanted * EVAL_SCAN_ROWS_FACTOR:
            break
    picks = np.linspace(0, len(scanned) - 1, min(wanted, len(scanned))).round().astype(int)
    global_rows = [scanned[i] for i in picks]
    global_rows += [padding] * (-len(global_rows) % global_batch)
    return [stack_rows(global_rows[start + process_index * batch: start + (process_index + 1) * batch])
            for start in range(0, len(global_rows), global_batch)]


class DataIterator(grain.DatasetIterator):
    """A training iterator: grain's, plus a state check against the pipeline's settings.

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
