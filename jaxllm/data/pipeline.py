"""The pretraining input pipeline: documents -> shard -> shuffle/repeat -> tokenize -> pack -> batch.

Batches are numpy dicts for one process, rows as described in `jaxllm.data.rows` and
`jaxllm.data.packing`: tokens, targets, positions, segment_ids (int32 [b, seq_len]) and
loss_mask (float32).

Training (`make_train_iterator`): a `jaxllm.data.mixture.MixtureIterator` over the named sources
of `data.sources` (without them, data.train is the one source) through the curriculum stages of
`data.stages`. Each process reads every `process_count`-th document of each source (a disjoint
shard) before the shuffle, so no coordination is needed; the shuffle is seeded by `data.seed`
and differs each epoch. Its `get_state()` is a small JSON-able dict and `set_state()` resumes
with exactly the batches the original would have produced next.

Evaluation (`make_eval_batches`): one fixed stream of rows shared by all processes (the eval
documents in a fixed order, independent of `data.seed` and of the process count), from which
fixed global batches are picked and sliced per process (`batching.fixed_eval_batches`).
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from jaxllm.data.batching import EVAL_ORDER_SEED, fixed_eval_batches, per_process_batch, process_layout, read_options
from jaxllm.data.documents import Tokenize, open_source
from jaxllm.data.mixture import MixtureIterator
from jaxllm.data.packing import PackIterDataset
from jaxllm.data.rows import padding_row


def make_train_iterator(cfg, tokenizer, *, process_index: int | None = None,
                        process_count: int | None = None) -> MixtureIterator:
    """Per-process training batches of `batch_size // process_count` rows: a MixtureIterator
    over `data.sources` and `data.stages` (without them, data.train through one stage).
    Endless unless a source with `on_exhaust: stop` runs out (then StopIteration)."""
    process_index, process_count = process_layout(process_index, process_count)
    return MixtureIterator(cfg, tokenizer, process_index=process_index, process_count=process_count)


def eval_source_names(cfg) -> list[str]:
    """Names of the data.sources entries that list eval files, for per-source eval losses."""
    return [s.name for s in cfg.data.sources if s.eval]


def make_eval_batches(cfg, tokenizer, num_batches: int, *, process_index: int | None = None,
                      process_count: int | None = None, source_name: str | None = None
                      ) -> list[dict[str, np.ndarray]]:
    """Up to `num_batches` fixed held-out batches (at least one) from `data.eval`, or with
    `source_name` from that entry of data.sources's own eval files (`eval_source_names(cfg)`).

    The last rows are padding (loss_mask 0) when the eval set runs out mid-batch.
    """
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    process_index, process_count = process_layout(process_index, process_count)
    per_process_batch(cfg.trainer.batch_size, process_count)
    d = cfg.data
    if source_name is not None:
        spec = {s.name: s for s in d.sources}.get(source_name)
        if spec is None or not spec.eval:
            raise ValueError(f"data.sources has no source {source_name!r} with eval files (sources with "
                             f"some: {', '.join(eval_source_names(cfg)) or 'none'})")
        d = dataclasses.replace(d, eval=spec.eval, text_field=spec.text_field or d.text_field)
    source = open_source(d.eval, text_field=d.text_field, strict=d.strict, eval_fraction=d.eval_fraction)
    docs = grain.MapDataset.source(source).shuffle(seed=EVAL_ORDER_SEED)
    ids = docs.map(Tokenize(tokenizer, d.add_bos, d.add_eos))
    rows = PackIterDataset(ids.to_iter_dataset(read_options(0)), d.seq_len, tokenizer.pad_id, method=d.packing,
                           split_policy=d.split_policy, buffer_docs=d.pack_buffer)
    return fixed_eval_batches(rows.__iter__(), num_batches, cfg.trainer.batch_size,
                              padding_row(d.seq_len, tokenizer.pad_id),
                              process_index=process_index, process_count=process_count)
