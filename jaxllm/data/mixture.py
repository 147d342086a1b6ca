"""Pretraining data mixtures and curricula: named sources mixed by the weights of stages.

A run reads one or more named sources (`data.sources`; without them, `data.train` is the one
source "train") and mixes them by the weights of the current stage (`data.stages`; without
them, one stage covers the run). Per process:

  source:  its documents (this process's disjoint slice) -> shuffle per epoch (-> repeat)
           -> tokenize -> pack into rows of the stage's seq_len. Each source has its own
           position, kept for the whole run: a source that a stage does not use waits where it
           stopped, and continues there in a later stage that uses it again.
  mixture: row r is taken from the source drawn with probability weights[s] (normalised) by a
           counter-based RNG keyed by (data.seed, r), Philox, so resuming needs only the draw
           counter r. Every process draws the same sources (from its own slice of documents),
           so the composition of the global batch is this process's times the process count.
           A row holds one source's tokens: a weight is the expected share of the stage's rows,
           i.e. of its tokens.
  stage:   rows are shuffled in windows of ROW_SHUFFLE_TOKENS tokens (a long document's rows
           spread over many batches), but a window never crosses a stage's end; then batched
           by the stage's batch size.

Dynamic weights (`data.dynamic_weights.every_steps` m > 0): a stage's rows are cut into segments
that end at the multiples of m as well as at the stage's end, and each segment draws by its own
weights: `set_weights(w)`, called when m, 2m, ... batches are done and before the next one, sets
the weights of the segment that starts there (otherwise the segment keeps the previous weights;
a stage's start resets them to the stage's). Segments are cut like stages (no shuffle window
crosses one), so the state stays small: it adds the segment's start and weights.

The iterator counts the batches it has produced (= steps done). When that count reaches a
stage's start_step the stage's weights, seq_len and batch size take over; a new seq_len makes
every source's packer continue the document it was splitting at the new row length. A source
that runs out starts its next epoch, reshuffled (`on_exhaust: repeat`; `epoch/<name>` in
`stats()`), or ends the mixture (`stop`: after the last full batch, `next` raises
StopIteration). `get_state()` is JSON-able (step, stage, draw counter, every source's packer
and reader position, the shuffle window) and `set_state()` resumes with exactly the batches the
original would have produced, mid-stage or across a switch.

With one source and one stage (no data.sources, no data.stages) this is the plain pipeline:
data.train's documents, this process's shard, shuffled by data.seed each epoch, tokenized,
packed, rows shuffled in windows (seed data.seed), batched.
"""

from __future__ import annotations

import zlib
from typing import Any

import grain
import numpy as np

from jaxllm.data.batching import read_options
from jaxllm.data.curriculum import Stage, mixture_sources, stage_index, stage_plan
from jaxllm.data.documents import Tokenize, open_source
from jaxllm.data.packing import PackIterDataset

# Tokens of packed rows shuffled together (memory ~20 bytes per token; a restore re-reads up to
# one window). A long document fills many consecutive rows; shuffling rows within a window
# spreads its rows over many batches, so one batch is not a few documents' consecutive chunks.
ROW_SHUFFLE_TOKENS = 1 << 19

_DRAW_BLOCK = 1024  # uniforms made per Philox call
_DRAW_DOMAIN = 0x6D6978  # "mix": keeps the draw stream apart from other users of data.seed
_STAGE_SEED_STRIDE = 1_000_003  # window-shuffle seed of stage k: data.seed + k * stride
_SEGMENT_SEED_STRIDE = 7_919  # ... plus segment start * stride for a dynamic-weights segment inside it


def _cdf(weights: tuple[float, ...]) -> np.ndarray:
    w = np.asarray(weights, np.float64)
    cdf = np.cumsum(w) / w.sum()
    cdf[np.flatnonzero(w)[-1]:] = 1.0  # rounding never lets a draw reach a zero-weight source
    return cdf


class _Draws:
    """Uniform [0, 1) number i of the stream keyed by `seed`, without state beyond i."""

    def __init__(self, seed: int):
        self._key = np.random.SeedSequence([seed, _DRAW_DOMAIN]).generate_state(2, np.uint64)
        self._block, self._values = -1, np.zeros(0)

    def __call__(self, i: int) -> float:
        block, j = divmod(i, _DRAW_BLOCK)
        if block != self._block:
            # Block b starts at counter b * 2**64: blocks never overlap.
            bits = np.random.Philox(key=self._key, counter=np.array([0, block, 0, 0], np.uint64))
            self._values, self._block = np.random.Generator(bits).random(_DRAW_BLOCK), block
        return float(self._values[j])


class _Counted(grain.IterDataset):
    """Passes documents through, counting them (a source's epochs); remembers its last iterator."""

    def __init__(self, parent: grain.IterDataset):
        super().__init__(parent)
        self.iterator: _CountedIterator | None = None

    def __iter__(self) -> _CountedIterator:
        self.iterator = _CountedIterator(self._parent.__iter__())
        return self.iterator

    def __str__(self) -> str:
        return "Counted"


class _CountedIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self.count = 0

    def __next__(self):
        item = next(self._parent)
        self.count += 1
        return item

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "count": self.count}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.count = int(state["count"])


class _SourceStream:
    """One source's packed rows; its packer is rebuilt, at the same position, for a new seq_len."""

    def __init__(self, name: str, docs: grain.IterDataset, num_docs: int, seq_len: int, pad_id: int,
                 **pack_options):
        self.name, self.num_docs, self._pad_id, self._pack_options = name, num_docs, pad_id, pack_options
        self._docs = _Counted(docs)
        self.seq_len: int | None = None
        self.packer: grain.DatasetIterator | None = None
        self.set_seq_len(seq_len)

    def set_seq_len(self, seq_len: int) -> None:
        if seq_len == self.seq_len:
            return
        old = self.packer
        state = None if old is None else old.get_state()
        self.packer = PackIterDataset(self._docs, seq_len, self._pad_id, **self._pack_options).__iter__()
        if old is not None:
            old.close()  # its reader threads, if any
        if state is not None:
            # A packer's state is the reader's position before the documents it still holds
            # and how far each was consumed (greedy: the one it is splitting); the new packer
            # re-reads them and continues them in rows of the new length.
            self.packer.set_state(state)
        self.seq_len = seq_len

    @property
    def epochs(self) -> float:
        """Documents read / documents in this process's slice (2.5: the middle of the third pass)."""
        return self._docs.iterator.count / self.num_docs


class _Mixer:
    """Draws each row's source and takes the row from it; counts draws."""

    def __init__(self, streams: list[_SourceStream], seed: int):
        self.streams = streams
        self.draws = 0
        self._uniform = _Draws(seed)

    def next_row(self, cdf: np.ndarray) -> dict[str, np.ndarray]:
        i = int(np.searchsorted(cdf, self._uniform(self.draws), side="right"))
        row = next(self.streams[i].packer)  # StopIteration: a `stop` source ran out
        self.draws += 1
        row["source"] = np.int32(i)
        return row

    def get_state(self) -> dict[str, Any]:
        return {"draws": self.draws, "sources": {s.name: s.packer.get_state() for s in self.streams}}

    def set_state(self, state: dict[str, Any]) -> None:
        for s in self.streams:
            s.packer.set_state(state["sources"][s.name])
        self.draws = int(state["draws"])


class _StageRows(grain.IterDataset):
    """The mixture's rows for one stage: `limit` rows (None: endless)."""

    def __init__(self, mixer: _Mixer, cdf: np.ndarray, limit: int | None):
        super().__init__()
        self._mixer, self._cdf, self._limit = mixer, cdf, limit

    def __iter__(self) -> _StageRowsIterator:
        return _StageRowsIterator(self._mixer, self._cdf, self._limit)

    def __str__(self) -> str:
        return f"StageRows(limit={self._limit})"


class _StageRowsIterator(grain.DatasetIterator):
    def __init__(self, mixer: _Mixer, cdf: np.ndarray, limit: int | None):
        super().__init__()
        self._mixer, self._cdf, self._limit = mixer, cdf, limit
        self._rows = 0

    def __next__(self) -> dict[str, np.ndarray]:
        if self._limit is not None and self._rows >= self._limit:
            raise StopIteration
        row = self._mixer.next_row(self._cdf)
        self._rows += 1
        return row

    def get_state(self) -> dict[str, Any]:
        return {"rows": self._rows, "mixer": self._mixer.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._mixer.set_state(state["mixer"])
        self._rows = int(state["rows"])


class MixtureIterator:
    """Per-process training batches of a mixture through its stages (see the module doc).

    `stage`: the Stage of the next batch (its seq_len, batch_size, rope_theta); `step`: batches
    produced; `weights`: those the last batch was drawn by; `stats()`: realised tokens, shares
    and epochs per source. `get_state()` is JSON-able; `set_state()` refuses a state saved with
    other settings (sources, seed, process layout, or the stages up to the saved one and where it
    ends; later stages may change). `keep_source`: batches keep `source` (int32 [b], the index
    in `names` of each row's source), as DoReMi's per-domain losses need.
    """

    def __init__(self, cfg, tokenizer, *, process_index: int, process_count: int, keep_source: bool = False):
        d = cfg.data
        self.plan = stage_plan(cfg)
        self._batches = []
        for st in self.plan:
            if st.batch_size % process_count:
                key = (f"data.stages[{st.index}].batch_size" if d.stages and d.stages[st.index].batch_size
                       else "trainer.batch_size")
                raise ValueError(f"{key} ({st.batch_size}) must be divisible by the number of processes "
                                 f"({process_count})")
            self._batches.append(st.batch_size // process_count)
        specs = mixture_sources(d)
        self.names = [s.name for s in specs]
        streams = [self._stream(cfg, tokenizer, s, process_index, process_count) for s in specs]
        self._streams = streams
        self._mixer = _Mixer(streams, d.seed)
        self._seed, self._keep_source = d.seed, keep_source
        self._every = d.dynamic_weights.every_steps
        self.step = 0
        self._tokens = np.zeros(len(specs), np.int64)
        self._exhausted = False
        self.settings = {
            "sources": [{"name": s.name, "train": list(s.train), "text_field": s.text_field or d.text_field,
                         "on_exhaust": s.on_exhaust} for s in specs],
            "stages": [{"start_step": st.start_step, "weights": dict(zip(self.names, st.weights)),
                        "seq_len": st.seq_len, "batch": b} for st, b in zip(self.plan, self._batches)],
            "seed": d.seed, "add_bos": d.add_bos, "add_eos": d.add_eos, "eval_fraction": d.eval_fraction,
            "packing": d.packing, "split_policy": d.split_policy, "pack_buffer": d.pack_buffer,
            "vocab_size": tokenizer.vocab_size, "process_index": process_index, "process_count": process_count,
        }
        if self._every:
            self.settings["reweight_every"] = self._every
        self._stage_index = -1
        self._segment: grain.DatasetIterator | None = None
        self._pending: tuple[float, ...] | None = None  # set_weights' weights, for the next segment
        self._enter(0, 0, self.plan[0].weights)

    def _stream(self, cfg, tokenizer, spec, process_index: int, process_count: int) -> _SourceStream:
        d = cfg.data
        source = open_source(spec.train, text_field=spec.text_field or d.text_field, strict=d.strict,
                             eval_fraction=d.eval_fraction)
        if len(source) < process_count:
            raise ValueError(f"data source {spec.name!r}: {len(source)} training documents cannot be split "
                             f"over {process_count} processes")
        docs = grain.MapDataset.source(source)[process_index::process_count]
        num_docs = len(docs)
        # The implicit source (data.train) shuffles by data.seed itself; named sources get a
        # seed of their own (from the name, so reordering data.sources changes nothing).
        seed = d.seed if not d.sources else (d.seed + zlib.crc32(spec.name.encode("utf-8"))) % 2**32
        docs = docs.shuffle(seed=seed)
        if spec.on_exhaust == "repeat":
            docs = docs.repeat()
        ids = docs.map(Tokenize(tokenizer, d.add_bos, d.add_eos))
        return _SourceStream(spec.name, ids.to_iter_dataset(read_options(d.num_workers)), num_docs,
                             self.plan[0].seq_len, tokenizer.pad_id, method=d.packing,
                             split_policy=d.split_policy, buffer_docs=d.pack_buffer)

    # ------------------------------------------------------------------------- stages

    def _enter(self, k: int, start: int, weights: tuple[float, ...]) -> None:
        """Starts the rows of stage k from step `start` (the stage's start, or with dynamic
        weights a multiple of every_steps inside it), drawn by `weights`, at the sources'
        current positions."""
        st, batch = self.plan[k], self._batches[k]
        for s in self._streams:
            s.set_seq_len(st.seq_len)
        # The segment's rows end exactly where its batches end (the stage's end or the next
        # weight update), so no window holds rows of two segments and nothing drawn is left over.
        end = self.plan[k + 1].start_step if k + 1 < len(self.plan) else None
        if self._every:
            update = (start // self._every + 1) * self._every
            end = update if end is None else min(end, update)
        rows = _StageRows(self._mixer, _cdf(weights), None if end is None else (end - start) * batch)
        window = max(batch, ROW_SHUFFLE_TOKENS // st.seq_len)
        seed = (self._seed + k * _STAGE_SEED_STRIDE) % 2**31 if k else self._seed
        if start != st.start_step:
            seed = (seed + start * _SEGMENT_SEED_STRIDE) % 2**31
        rows = grain.experimental.WindowShuffleIterDataset(rows, window_size=window, seed=seed)
        self._segment = rows.batch(batch, drop_remainder=True).__iter__()
        self._stage_index, self._segment_start = k, start
        self.weights = tuple(float(w) for w in weights)

    # ------------------------------------------------------------------------- dynamic weights

    @property
    def weight_update_due(self) -> bool:
        """Whether the next batch starts a dynamic-weights segment (`set_weights` may be called)."""
        return bool(self._every) and self.step % self._every == 0 and self.step != self._segment_start

    def next_weights(self) -> tuple[float, ...]:
        """The weights the next batch is drawn by unless `set_weights` changes them."""
        if self._pending is not None:
            return self._pending
        k = stage_index(self.plan, self.step)
        return self.plan[k].weights if k != self._stage_index else self.weights

    def set_weights(self, weights) -> None:
        """The weights (per source of `names`, normalised) of the rows from the next batch on,
        until the next update or stage; only when `weight_update_due`."""
        if not self.weight_update_due:
            raise ValueError(f"set_weights: the next batch ({self.step + 1}) does not start a dynamic-weights "
                             f"segment (data.dynamic_weights.every_steps {self._every})")
        w = np.asarray(weights, np.float64)
        if w.shape != (len(self.names),) or not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
            raise ValueError(f"set_weights: need {len(self.names)} finite weights >= 0, not all 0; got {weights!r}")
        self._pending = tuple(float(x) for x in w / w.sum())

    @property
    def _parents(self) -> tuple[grain.DatasetIterator, ...]:
        # The sources' packers, so that packing.packing_stats(iterator) sums their counters.
        return tuple(s.packer for s in self._streams)

    @property
    def stage(self) -> Stage:
        """The stage of the next batch."""
        return self.plan[stage_index(self.plan, self.step)]

    # ------------------------------------------------------------------------- iteration

    def __iter__(self) -> MixtureIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._exhausted:
            raise StopIteration
        k = stage_index(self.plan, self.step)
        if k != self._stage_index or self.weight_update_due:
            self._enter(k, self.step, self.next_weights())
            self._pending = None
        try:
            batch = next(self._segment)
        except StopIteration:
            self._exhausted = True
            raise
        source = batch["source"] if self._keep_source else batch.pop("source")
        per_row = batch["loss_mask"].sum(axis=1)
        self._tokens += np.bincount(source, weights=per_row, minlength=len(self.names)).astype(np.int64)
        self.step += 1
        return batch

    def stats(self) -> dict[str, float]:
        """This process's realised data so far: for each source `tokens/<name>` (trained-on
        tokens; every process draws the same sources, so times the process count for the run),
        `frac/<name>` (share of all tokens) and `epoch/<name>` (documents read / documents in
        this process's slice); `stage`: the index of the last batch's stage."""
        total = int(self._tokens.sum())
        out: dict[str, float] = {"stage": self._stage_index}
        for name, tokens, stream in zip(self.names, self._tokens, self._streams):
            out[f"tokens/{name}"] = int(tokens)
            out[f"frac/{name}"] = float(tokens) / total if total else 0.0
            out[f"epoch/{name}"] = stream.epochs
            if self._every:
                out[f"weight/{name}"] = self.weights[self.names.index(name)]
        return out

    # ------------------------------------------------------------------------- checkpointing

    def get_state(self) -> dict[str, Any]:
        state = {"settings": self.settings, "step": self.step, "stage": self._stage_index,
                 "segment": self._segment.get_state(), "exhausted": self._exhausted,
                 "tokens": {n: int(t) for n, t in zip(self.names, self._tokens)}}
        if self._every:
            state |= {"segment_start": self._segment_start, "weights": list(self.weights),
                      "pending": None if self._pending is None else list(self._pending)}
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        if "segment" not in state:
            raise ValueError("data iterator state was saved by an older single-source pipeline (no mixture "
                             "state); it cannot be resumed by this version")
        k = int(state["stage"])
        self._check_settings(state.get("settings", {}), k)
        self._enter(k, int(state.get("segment_start", self.plan[k].start_step)),
                    tuple(state.get("weights") or self.plan[k].weights))
        self._pending = tuple(state["pending"]) if state.get("pending") else None
        self._segment.set_state(state["segment"])
        self.step = int(state["step"])
        self._exhausted = bool(state["exhausted"])
        self._tokens = np.array([state["tokens"][n] for n in self.names], np.int64)

    def _check_settings(self, saved: dict[str, Any], k: int) -> None:
        diffs = [(key, saved.get(key), now) for key, now in self.settings.items()
                 if key != "stages" and saved.get(key) != now]
        # The stages up to the saved one, and where it ends, must match; later ones may change.
        old, new = saved.get("stages", []), self.settings["stages"]
        for i in range(k + 2):
            a, b = (old[i] if i < len(old) else None), (new[i] if i < len(new) else None)
            key = f"stages[{i}]"
            if i == k + 1:
                a, b, key = a and a["start_step"], b and b["start_step"], f"stages[{i}].start_step"
            if a != b:
                diffs.append((key, a, b))
        if diffs:
            raise ValueError("data iterator state was saved with other settings: "
                             + ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, a, b in diffs))

    def close(self) -> None:
        """Stops the sources' reader threads (data.num_workers > 0); idempotent."""
        for s in self._streams:
            s.packer.close()

    def __str__(self) -> str:
        return f"MixtureIterator({', '.join(self.names)}; {len(self.plan)} stages)"
