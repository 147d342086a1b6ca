"""Packing: best-fit against a brute-force reference, padding, split policies, counters, resume."""

import json

import grain
import numpy as np
import pytest

from jaxllm.config import ConfigError, load_config
from jaxllm.data.packing import PackIterDataset, packing_stats

FIELDS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")


def _docs(lengths, start=10):
    """Documents of the given token counts, token values unique across the corpus."""
    out, base = [], start
    for n in lengths:
        out.append(list(range(base, base + int(n))))
        base += int(n)
    return out


def _pack(docs, seq_len, **kw):
    ds = PackIterDataset(grain.MapDataset.source(docs).to_iter_dataset(), seq_len, pad_id=0, **kw)
    it = iter(ds)
    return list(it), it, ds


def _pieces(row) -> list[list[int]]:
    """Each segment of a row as its tokens plus the last target (a slice of one document)."""
    out = []
    seg = row["segment_ids"]
    for s in range(1, seg.max() + 1):
        idx = np.flatnonzero(seg == s)
        assert np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx)))
        np.testing.assert_array_equal(row["positions"][idx], np.arange(len(idx)))
        np.testing.assert_array_equal(row["targets"][idx[:-1]], row["tokens"][idx[1:]])
        out.append(row["tokens"][idx].tolist() + [int(row["targets"][idx[-1]])])
    used = int((seg > 0).sum())
    assert np.all(seg[used:] == 0) and np.all(row["tokens"][used:] == 0)  # padding only at the end
    np.testing.assert_array_equal(row["loss_mask"], (seg > 0).astype(np.float32))
    return out


def reference_best_fit(docs, seq_len, buffer_docs, split_policy="split"):
    """Brute force, written independently of the packer: rows as lists of document slices.

    Before each row the buffer is topped up to `buffer_docs` documents (with >= 1 pair). The row
    starts with the document read longest ago if at least 4 * buffer_docs stream elements were
    read after it, else with the one with most pairs left (earliest read among equals); a start
    longer than the row gives a full row of its next pairs; otherwise, while some buffered document
    fits the space left, the one with most pairs (earliest among equals) is added whole.
    """
    stream = list(enumerate(docs))
    pos, buf, rows = 0, [], []  # buf entries: [seq, tokens, pairs consumed]

    def left(e):
        return len(e[1]) - 1 - e[2]

    def best(cands):
        return max(cands, key=lambda e: (left(e), -e[0]))

    while True:
        while len(buf) < buffer_docs and pos < len(stream):
            seq, d = stream[pos]
            pos += 1
            if split_policy == "truncate":
                d = d[:seq_len + 1]
            if len(d) >= 2:
                buf.append([seq, d, 0])
        if not buf:
            return rows
        oldest = min(buf, key=lambda e: e[0])
        first = oldest if pos - 1 - oldest[0] >= 4 * buffer_docs else best(buf)
        if left(first) > seq_len:
            rows.append([first[1][first[2]:first[2] + seq_len + 1]])
            first[2] += seq_len
            continue
        row, space, cur = [], seq_len, first
        while cur is not None:
            row.append(cur[1][cur[2]:])
            space -= left(cur)
            buf.remove(cur)
            fits = [e for e in buf if left(e) <= space]
            cur = best(fits) if fits else None
        rows.append(row)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("split_policy", ["split", "truncate"])
def test_best_fit_equals_brute_force_reference(seed, split_policy):
    rng = np.random.default_rng(seed)
    seq_len = int(rng.integers(6, 20))
    buffer_docs = int(rng.integers(1, 7))
    lengths = rng.integers(1, 2 * seq_len + 5, size=int(rng.integers(20, 70)))
    docs = _docs(lengths)
    rows, it, _ = _pack(docs, seq_len, method="best_fit", split_policy=split_policy, buffer_docs=buffer_docs)
    got = [_pieces(r) for r in rows]
    assert got == reference_best_fit(docs, seq_len, buffer_docs, split_policy)
    # Counters: every pair once (split) or the first seq_len per document (truncate).
    pairs = [len(d) - 1 for d in docs if len(d) >= 2]
    kept = pairs if split_policy == "split" else [min(p, seq_len) for p in pairs]
    stats = packing_stats(it)
    assert stats["rows"] == len(rows)
    assert stats["real_tokens"] == sum(kept) == sum(int(r["loss_mask"].sum()) for r in rows)
    assert stats["pad_tokens"] == len(rows) * seq_len - sum(kept)
    assert stats["truncated_tokens"] == sum(p - k for p, k in zip(pairs, kept))
    assert stats["documents"] == len(pairs)
    assert stats["padding_fraction"] == pytest.approx(stats["pad_tokens"] / (len(rows) * seq_len))


def test_best_fit_keeps_documents_whole_with_less_padding_than_sequential_packing():
    # Documents of 40, 24, 34 and 30 pairs in a shuffled stream: pairs (40+24, 34+30) fill 64-pair
    # rows exactly. Greedy packing fills every row but cuts documents at row ends; packing whole
    # documents in stream order (a new row whenever the next one does not fit) pads a lot.
    rng = np.random.default_rng(0)
    pairs = rng.permutation(np.repeat([40, 24, 34, 30], 50))
    docs = _docs(pairs + 1)
    seq_len = 64
    bf_rows, bf_it, _ = _pack(docs, seq_len, method="best_fit", buffer_docs=16)
    gr_rows, gr_it, _ = _pack(docs, seq_len, method="greedy")
    bf, gr = packing_stats(bf_it), packing_stats(gr_it)

    def sequential_no_split_padding():  # whole documents in stream order
        rows, used = 1, 0
        for p in pairs:
            if used + p > seq_len:
                rows, used = rows + 1, 0
            used += p
        return rows * seq_len - int(pairs.sum())

    seq_pad = sequential_no_split_padding()
    assert bf["real_tokens"] == gr["real_tokens"] == int(pairs.sum())
    assert bf["pad_tokens"] < seq_pad / 10 and seq_pad / (int(pairs.sum()) + seq_pad) > 0.2
    assert gr["pad_tokens"] == len(gr_rows) * seq_len - int(pairs.sum()) < seq_len  # last row only
    whole = {tuple(d) for d in docs}
    bf_cut = sum(tuple(p) not in whole for r in bf_rows for p in _pieces(r))
    gr_cut = sum(tuple(p) not in whole for r in gr_rows for p in _pieces(r))
    assert bf_cut == 0 and gr_cut > 50


def test_split_policies_for_documents_longer_than_a_row():
    docs = _docs([30, 5, 12])  # 29, 4 and 11 pairs; rows of 8 pairs
    rows, it, _ = _pack(docs, 8, method="best_fit", split_policy="split", buffer_docs=4)
    # split: the 29- and 11-pair documents continue over several rows; every pair exactly once.
    flat = sorted((a, b) for r in rows for p in _pieces(r) for a, b in zip(p[:-1], p[1:]))
    assert flat == sorted((d[j], d[j + 1]) for d in docs for j in range(len(d) - 1))
    rows, it, _ = _pack(docs, 8, method="best_fit", split_policy="truncate", buffer_docs=4)
    assert sorted(map(tuple, (p for r in rows for p in _pieces(r)))) == sorted(
        [tuple(docs[0][:9]), tuple(docs[1]), tuple(docs[2][:9])])
    assert packing_stats(it)["truncated_tokens"] == (30 - 9) + (12 - 9)
    rows, it, _ = _pack(docs, 8, method="greedy", split_policy="truncate")
    assert packing_stats(it)["real_tokens"] == 8 + 4 + 8 and packing_stats(it)["truncated_tokens"] == 24


@pytest.mark.parametrize("method,split_policy,buffer_docs", [
    ("best_fit", "split", 3), ("best_fit", "truncate", 5), ("best_fit", "split", 1), ("greedy", "truncate", 1),
    ("greedy", "split", 1)])
def test_resume_mid_stream_equals_uninterrupted(method, split_policy, buffer_docs):
    rng = np.random.default_rng(7)
    docs = _docs(rng.integers(1, 24, size=40))
    reference, ref_it, ds = _pack(docs, 8, method=method, split_policy=split_policy, buffer_docs=buffer_docs)
    for k in range(len(reference)):
        it = iter(ds)
        for _ in range(k):
            next(it)
        again = iter(ds)
        again.set_state(json.loads(json.dumps(it.get_state())))
        rest = list(again)
        assert len(rest) == len(reference) - k
        for a, b in zip(rest, reference[k:]):
            for key in FIELDS:
                np.testing.assert_array_equal(a[key], b[key])
        assert packing_stats(again) == packing_stats(ref_it)  # counters continue too


def test_resume_state_is_bounded_and_method_mismatch_is_named():
    # An endless stream: the state lists buffered documents only, however long it ran.
    docs = _docs(np.random.default_rng(1).integers(2, 40, size=50))
    ds = PackIterDataset(grain.MapDataset.source(docs).repeat().to_iter_dataset(), 16,
                         method="best_fit", buffer_docs=8)
    it = iter(ds)
    for _ in range(500):
        next(it)
        state = it.get_state()
        assert len(state["buffer"]) <= 8 and state["read"] <= 5 * 8 + 8
    greedy = iter(PackIterDataset(grain.MapDataset.source(docs).to_iter_dataset(), 16))
    with pytest.raises(ValueError, match="saved by the best_fit packer"):
        greedy.set_state(state)
    with pytest.raises(ValueError, match="saved by the greedy packer"):
        iter(ds).set_state(greedy.get_state())


def test_config_keys(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data: {packing: best_fit, split_policy: truncate, pack_buffer: 64}\n")
    d = load_config(str(cfg_file)).data
    assert (d.packing, d.split_policy, d.pack_buffer) == ("best_fit", "truncate", 64)
    for bad, msg in (("data.packing=first_fit", "data.packing: 'first_fit' is not one of greedy, best_fit"),
                     ("data.split_policy=drop", "data.split_policy: 'drop' is not one of split, truncate"),
                     ("data.pack_buffer=0", "data: pack_buffer must be > 0, got 0")):
        with pytest.raises(ConfigError, match=msg):
            load_config(str(cfg_file), [bad])
