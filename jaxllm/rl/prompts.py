"""RL prompt data: records in the Tülu 3 RLVR format -> left-padded prompt rows, checkpointable.

A record holds `messages` (the conversation so far, ending with the user's turn) or `prompt` (a
string: one user turn), `ground_truth` (a string, or any JSON value, e.g. IFEval's constraint
list) and `dataset` (which verifier checks it; `rl.verifiers` maps dataset names to verifier
names, else the dataset name is the verifier's). Field names come from the `rl:` section, so
the published RLVR mixture (jsonl / parquet) loads as it is.

The prompt is the chat template's rendering of the messages with the generation prompt
(`sft.template`, BOS as `data.add_bos`), cut to its last `rl.max_prompt_len` tokens, left-padded
to `prompt_width(rl)` so every step has one shape. A record that cannot be used (bad messages,
a verifier that needs a ground truth and has none, a dataset no verifier checks) is skipped and
counted by reason, or raises `SourceError` with its file and line when data.strict.

Training: this process's slice of the records, shuffled by data.seed each epoch, repeated,
batched by prompts_per_step / process_count; the iterator is a `DataIterator` (JSON-able state).
"""

from __future__ import annotations

import json
from typing import Callable

import grain
import numpy as np

from jaxllm.data import chat
from jaxllm.data.batching import DataIterator, per_process_batch, process_layout, read_options
from jaxllm.data.examples import CountSkips, IndexedSource, Skipped, build_or_skip
from jaxllm.data.files import SourceError
from jaxllm.data.preference_data import PromptCompletionEncoder
from jaxllm.data.records import RecordSource
from jaxllm.models.decode import bucket_length

PROMPT_FIELDS = ("prompt_tokens", "prompt_length", "index", "ground_truth", "verifier")


def prompt_width(rl) -> int:
    """The fixed (bucketed) width prompts are left-padded to."""
    return bucket_length(rl.max_prompt_len)


def open_prompts(cfg, split: str) -> RecordSource:
    """The records of data.train / data.eval with the rl: section's fields."""
    rl, d = cfg.rl, cfg.data
    specs = list(d.train if split == "train" else d.eval)
    if not specs:
        raise SourceError(f"data.{split}: no prompt files given")
    optional = {rl.messages_field: (list,), rl.prompt_field: (str,), rl.ground_truth_field: (str, int, float, list, dict),
                rl.dataset_field: (str,)}
    source = RecordSource(specs, {}, optional, strict=d.strict)
    if len(source) == 0:
        raise SourceError(f"data.{split} ({', '.join(specs)}): no usable records (skipped: {dict(source.skipped)})")
    return source


class PromptExamples:
    """(index, record) -> one prompt row (the PROMPT_FIELDS) or Skipped.

    `verifier_for(dataset) -> (verifier name, needs a ground truth)` raises KeyError for a
    dataset no verifier checks."""

    def __init__(self, cfg, tokenizer, source: RecordSource, verifier_for: Callable[[str], tuple[str, bool]]):
        rl, d = cfg.rl, cfg.data
        self.rl, self.source, self.strict, self.verifier_for = rl, source, d.strict, verifier_for
        self.encoder = PromptCompletionEncoder(tokenizer, cfg.sft.template, seq_len=prompt_width(rl) + 1,
                                               max_prompt_len=rl.max_prompt_len, add_bos=d.add_bos)
        self.width, self.pad_id = prompt_width(rl), max(tokenizer.pad_id, 0)

    def _messages(self, record: dict) -> list[dict]:
        rl = self.rl
        if record.get(rl.messages_field) is not None:
            return record[rl.messages_field]
        if record.get(rl.prompt_field) is not None:
            return [{"role": "user", "content": record[rl.prompt_field]}]
        raise chat.ConversationError(f"no {rl.messages_field} or {rl.prompt_field}")

    def build(self, index: int, record: dict) -> dict[str, np.ndarray]:
        rl = self.rl
        dataset = record.get(rl.dataset_field) or ""
        try:
            verifier, needs_truth = self.verifier_for(dataset)
        except KeyError as e:
            raise chat.ConversationError("no verifier for the record's dataset", str(e)) from None
        truth = record.get(rl.ground_truth_field)
        if needs_truth and truth is None:
            raise chat.ConversationError(f"no {rl.ground_truth_field} for verifier {verifier}")
        # The generation prompt is everything before the reply: encode with a placeholder reply.
        prompt = self.encoder.truncate_prompt(self.encoder.encode(self._messages(record), "x")[0])
        row = np.full(self.width, self.pad_id, np.int32)
        row[self.width - len(prompt):] = prompt
        return {"prompt_tokens": row, "prompt_length": np.int32(len(prompt)), "index": np.int32(index),
                "ground_truth": np.asarray(json.dumps(truth)), "verifier": np.asarray(verifier)}

    def __call__(self, item):
        return build_or_skip(self.build, item, self.source, self.strict)


def train_prompts(cfg, tokenizer, verifier_for, *, process_index=None, process_count=None) -> DataIterator:
    """Endless per-process batches of prompts_per_step / process_count prompt rows."""
    process_index, process_count = process_layout(process_index, process_count)
    rl, d = cfg.rl, cfg.data
    batch = per_process_batch(rl.prompts_per_step, process_count)
    source = open_prompts(cfg, "train")
    if len(source) < process_count:
        raise SourceError(f"{len(source)} prompt records cannot be split over {process_count} processes")
    records = grain.MapDataset.source(IndexedSource(source))[process_index::process_count].shuffle(seed=d.seed)
    n = len(records)
    examples = records.repeat().map(PromptExamples(cfg, tokenizer, source, verifier_for))
    counted = CountSkips(examples.to_iter_dataset(read_options(d.num_workers)), 2 * n)
    settings = {"format": "rl-prompts", "train": list(d.train), "template": cfg.sft.template,
                "width": prompt_width(rl), "max_prompt_len": rl.max_prompt_len, "batch": batch, "seed": d.seed,
                "add_bos": d.add_bos, "vocab_size": tokenizer.vocab_size, "process_index": process_index,
                "process_count": process_count}
    it = DataIterator(counted.batch(batch, drop_remainder=True).__iter__(), settings)
    it.skipped, it.source_skipped = counted.counts, source.skipped
    return it


def eval_prompts(cfg, tokenizer, verifier_for, num_prompts: int, *, process_index=None,
                 process_count=None) -> list[dict[str, np.ndarray]]:
    """Up to `num_prompts` held-out prompts (data.eval in file order; unusable records skipped),
    in batches of rl.prompts_per_step of which this process takes its slice; the last batch is
    filled with copies of its first prompt, marked by index -1."""
    process_index, process_count = process_layout(process_index, process_count)
    rl = cfg.rl
    batch = per_process_batch(rl.prompts_per_step, process_count)
    source = open_prompts(cfg, "eval")
    build = PromptExamples(cfg, tokenizer, source, verifier_for)
    rows = []
    for i in range(len(source)):
        row = build((i, source[i]))
        if not isinstance(row, Skipped):
            rows.append(row)
        if len(rows) == num_prompts:
            break
    if not rows:
        raise SourceError(f"data.eval: no usable prompt records (of {len(source)})")
    rows += [{**rows[0], "index": np.int32(-1)}] * (-len(rows) % rl.prompts_per_step)
    out = []
    for start in range(0, len(rows), rl.prompts_per_step):
        mine = rows[start + process_index * batch: start + (process_index + 1) * batch]
        out.append({k: np.stack([r[k] for r in mine]) for k in PROMPT_FIELDS})
    return out
