"""Data pipeline: sources, packing against an independent reference, resume, sharding, eval."""

import ast
import dataclasses
import json
import os
import re

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxllm.config import Config, DataConfig, TrainerConfig
from jaxllm.data import files, mixture
from jaxllm.data.documents import Tokenize, open_source
from jaxllm.data.files import SourceError
from jaxllm.data.packing import PackIterDataset
from jaxllm.data.pipeline import make_eval_batches, make_train_iterator
from jaxllm.data.records import RecordSource
from jaxllm.data.tokenizer import Tokenizer, train_sentencepiece

FIELDS = {"tokens": np.int32, "targets": np.int32, "positions": np.int32, "segment_ids": np.int32,
          "loss_mask": np.float32}


# ----------------------------------------------------------------------------- sources


def test_jsonl_skips_bad_lines_and_strict_names_line(tmp_path, caplog):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "first doc"}\n'
                     b'{"text": broken\n'                 # malformed JSON
                     b'{"other": "no text field"}\n'      # missing field
                     b'\n'                                # blank line: not a document
                     b'{"text": "   "}\n'                 # empty document
                     b'{"text": "caf\xc3\xa9 \\u00e9"}\n'
                     b'{"text": "bad \xff byte"}\n'       # invalid UTF-8
                     b'{"text": "last"}')                 # no trailing newline
    src = open_source([str(path)])
    assert [src[i] for i in range(len(src))] == ["first doc", "café é", "last"]
    assert dict(src.skipped) == {"malformed JSON": 1, "missing field 'text'": 1, "empty document": 1,
                                 "invalid UTF-8": 1}
    assert "skipped 4 of 7 documents" in caplog.text
    with pytest.raises(SourceError, match=re.escape(f"{path}:2: malformed JSON")):
        open_source([str(path)], strict=True)


def test_parquet_folder_reads_text_column(tmp_path):
    folder = tmp_path / "hf" / "data"
    folder.mkdir(parents=True)
    texts = [f"row {i} " * (i % 3 + 1) for i in range(25)]
    texts[4], texts[9] = None, "  "
    pq.write_table(pa.table({"text": texts[:15], "id": list(range(15))}),
                   folder / "train-00000-of-00002.parquet", row_group_size=4)
    pq.write_table(pa.table({"text": texts[15:], "id": list(range(15, 25))}),
                   folder / "train-00001-of-00002.parquet", row_group_size=3)
    src = open_source([str(tmp_path / "hf")])
    expected = [t for t in texts if t and t.strip()]
    assert [src[i] for i in range(len(src))] == expected
    assert [src[i] for i in reversed(range(len(src)))] == expected[::-1]  # random access
    assert dict(src.skipped) == {"missing field 'text'": 1, "empty document": 1}
    with pytest.raises(SourceError, match="row group 1, row 0"):
        open_source([str(folder / "train-00000-of-00002.parquet")], strict=True)
    with pytest.raises(SourceError, match="no column 'body'"):
        open_source([str(folder)], text_field="body")


def test_text_files_folders_globs_and_missing(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee\n")
    (tmp_path / "a.py").write_text("    indented = True\n")
    (tmp_path / "sub" / "c.txt").write_text("sea")
    (tmp_path / "sub" / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    (tmp_path / "sub" / "empty.txt").write_text("\n \n")
    (tmp_path / "ignored.bin").write_bytes(b"\x00")
    src = open_source([str(tmp_path)])
    assert [src[i] for i in range(len(src))] == ["    indented = True\n", "bee\n", "sea"]
    assert dict(src.skipped) == {"invalid UTF-8": 1, "empty document": 1}
    both = open_source([str(tmp_path / "sub" / "c.txt"), str(tmp_path / "*.txt")])
    assert [both[i] for i in range(len(both))] == ["sea", "bee\n"]
    with pytest.raises(SourceError, match="bad.txt: invalid UTF-8"):
        open_source([str(tmp_path)], strict=True)
    for spec in (str(tmp_path / "nothing_here"), str(tmp_path / "*.jsonl"), "stdlib:validation"):
        with pytest.raises(SourceError, match=re.escape(spec)):
            open_source([spec])


def test_stdlib_split_is_disjoint_and_deterministic():
    train, held_out = files.stdlib_files("train", 0.02), files.stdlib_files("eval", 0.02)
    assert train == files.stdlib_files("train", 0.02) and held_out == files.stdlib_files("eval", 0.02)
    assert not set(train) & set(held_out)
    assert len(held_out) >= 5 and 0.005 < len(held_out) / (len(train) + len(held_out)) < 0.05
    assert all(f.endswith(".py") and "site-packages" not in f for f in train + held_out)
    # A file's split depends only on its path: more held out keeps the old eval files there.
    assert set(held_out) <= set(files.stdlib_files("eval", 0.1))
    src = open_source(["stdlib:eval"])
    assert len(src) == len(held_out) and "def " in "".join(src[i] for i in range(len(src)))


def test_document_files_and_where(tmp_path):
    """Every document names its file (`file_ids`, what curation reports) and its line / row."""
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n{"text": ""}\n{"text": "two"}\n')
    pq.write_table(pa.table({"text": ["three", None, "four"]}), tmp_path / "c.parquet", row_group_size=2)
    src = open_source([str(tmp_path)])
    assert [src[i] for i in range(len(src))] == ["alpha", "one", "two", "three", "four"]
    assert src.files == [str(tmp_path / n) for n in ("a.txt", "b.jsonl", "c.parquet")]
    assert src.file_ids.tolist() == [0, 1, 1, 2, 2]
    parts = src.sources
    assert [parts[1].where(i) for i in range(2)] == [f"{tmp_path / 'b.jsonl'}:1", f"{tmp_path / 'b.jsonl'}:3"]
    assert parts[2].where(1) == f"{tmp_path / 'c.parquet'}: row group 1, row 0"


def test_record_source_reads_mixed_files_in_file_order(tmp_path, monkeypatch):
    import gzip

    monkeypatch.setenv("JAXLLM_DATA_CACHE", str(tmp_path / "cache"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text('{"q": "a0", "n": 1}\n{"q": 5}\n{"q": "a2"}\n')
    pq.write_table(pa.table({"q": ["b0", None, "b2"], "n": [None, 2, 3]}), tmp_path / "d" / "b.parquet")
    (tmp_path / "d" / "c.jsonl.gz").write_bytes(gzip.compress(b'{"q": "c0", "n": true}\n{"q": "c1", "n": 4.5}\n'))
    (tmp_path / "d" / "e.txt").write_text("not a record file")
    src = RecordSource(str(tmp_path / "d"), {"q": (str,)}, {"n": (int, float)})
    assert list(src) == [{"q": "a0", "n": 1}, {"q": "a2"}, {"q": "b0"}, {"q": "b2", "n": 3}, {"q": "c1", "n": 4.5}]
    assert dict(src.skipped) == {"field 'q' is not a string": 1, "missing field 'q'": 1,
                                 "field 'n' is not a number": 1}
    assert [src.where(i) for i in (1, 3, 4)] == [f"{tmp_path / 'd' / 'a.jsonl'}:3",
                                                 f"{tmp_path / 'd' / 'b.parquet'}: row group 0, row 2",
                                                 f"{tmp_path / 'd' / 'c.jsonl.gz'}:2"]
    with pytest.raises(IndexError):
        src[5]


def _jaxllm_imports(path):
    """The jaxllm modules a file imports, at module level or inside functions."""
    tree = ast.parse(open(path).read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxllm"):
            out |= {f"{node.module}.{a.name}" if node.module == "jaxllm.data" else node.module for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("jaxllm")}
    return out


def test_data_package_is_layered():
    """No import cycle inside jaxllm.data; rows.py imports nothing of jaxllm (the objectives read
    it); outside the package only the base modules (errors, frozendict, paths) and config; only prepare.py (the top) reads jaxllm.config, and nothing imports prepare.py."""
    import jaxllm.data

    folder = os.path.dirname(jaxllm.data.__file__)
    graph = {name[:-3]: _jaxllm_imports(os.path.join(folder, name)) for name in os.listdir(folder)
             if name.endswith(".py")}
    assert graph["__init__"] == set() and graph["rows"] == set()
    outside = {m for name, mods in graph.items() for m in mods if not m.startswith("jaxllm.data.")}
    assert outside == {"jaxllm.errors", "jaxllm.frozendict", "jaxllm.paths", "jaxllm.config"}
    assert [n for n, mods in graph.items() if "jaxllm.config" in mods] == ["prepare"]
    assert not [n for n, mods in graph.items() if "jaxllm.data.prepare" in mods]
    deps = {n: {m[len("jaxllm.data."):] for m in mods if m.startswith("jaxllm.data.")} for n, mods in graph.items()}
    done = set()
    while len(done) < len(deps):  # peel off modules whose imports are all done: stalls on a cycle
        ready = {n for n, d in deps.items() if n not in done and d <= done}
        assert ready, f"import cycle among {sorted(set(deps) - done)}"
        done |= ready
    for name in graph:
        assert "cfg.task" not in open(os.path.join(folder, name + ".py")).read(), name


# ----------------------------------------------------------------------------- packing


def _starts(run: list[int], docs: list[list[int]]) -> list[tuple[int, int]]:
    """(document, start) of every place where `run` is a contiguous slice of a document."""
    needle = "," + ",".join(map(str, run)) + ","
    out = []
    for i, d in enumerate(docs):
        hay = "," + ",".join(map(str, d)) + ","
        at = hay.find(needle)
        while at >= 0:
            out.append((i, hay[:at].count(",")))  # commas before the match = index of its first token
            at = hay.find(needle, at + 1)
    return out


def _check_rows(rows: dict, docs: list[list[int]], seq_len: int) -> list[tuple[int, int, int]]:
    """Checks the row contract against `docs`; returns each piece as (doc, start, length)."""
    for k, dtype in FIELDS.items():
        assert rows[k].dtype == dtype and rows[k].shape[-1] == seq_len, k
    pieces = []
    for r in range(rows["tokens"].shape[0]):
        tokens, targets = rows["tokens"][r], rows["targets"][r]
        seg, pos, mask = rows["segment_ids"][r], rows["positions"][r], rows["loss_mask"][r]
        np.testing.assert_array_equal(mask, (seg > 0).astype(np.float32))  # only padding is masked
        used = int((seg > 0).sum())
        assert np.all(seg[:used] > 0) and np.all(np.diff(seg[:used]) >= 0)  # padding only at the end
        for s in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == s)
            assert len(idx) and np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx)))
            np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))  # restart at 0 per piece
            # Targets are the tokens shifted by one, and the whole run (tokens + last target) is a
            # contiguous slice of one document; only a row's first piece may continue a document.
            np.testing.assert_array_equal(targets[idx[:-1]], tokens[idx[1:]])
            matches = _starts(tokens[idx].tolist() + [int(targets[idx[-1]])], docs)
            if s > 1:
                matches = [m for m in matches if m[1] == 0]
            assert matches, f"row {r} piece {s} is not a slice of one document"
            pieces.append((*matches[0], len(idx)))
    return pieces


def test_packing_matches_reference_and_covers_every_pair():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=60)
    lengths[5] = 100  # spans several rows
    # Token values unique across the corpus, so a (token, target) pair names its document.
    docs, base = [], 10
    for n in lengths:
        docs.append(list(range(base, base + int(n))))
        base += int(n)
    seq_len = 16
    ds = PackIterDataset(grain.MapDataset.source(docs).to_iter_dataset(), seq_len, pad_id=0)
    rows = list(ds)
    stacked = {k: np.stack([r[k] for r in rows]) for k in FIELDS}
    _check_rows(stacked, docs, seq_len)
    got = sorted(zip(stacked["tokens"][stacked["loss_mask"] > 0].tolist(),
                     stacked["targets"][stacked["loss_mask"] > 0].tolist()))
    expected = sorted((d[j], d[j + 1]) for d in docs for j in range(len(d) - 1))
    assert got == expected  # every pair exactly once; 1-token docs have none
    assert all(r["loss_mask"].all() for r in rows[:-1])  # greedy: only the last row has padding
    assert len(rows) == -(-len(expected) // seq_len)


# ----------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of small Python-like documents (each names its id) and a tiny tokenizer."""
    root = tmp_path_factory.mktemp("corpus")
    folder = root / "docs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    texts = []
    for i in range(24):
        lines = int(rng.integers(1, 12))
        body = "".join(f"    v{j} = {int(rng.integers(0, 999))} # d{i:03d}\n" for j in range(lines))
        texts.append(f"def d{i:03d}():\n{body}    return 'd{i:03d}'\n")
        (folder / f"doc{i:02d}.py").write_text(texts[-1])
    model = train_sentencepiece(texts, 300, str(root / "sp"))
    return folder, texts, Tokenizer(model)


def _cfg(folder, batch_size=4, seq_len=32, **data):
    return Config(data=DataConfig(train=(str(folder),), eval=(str(folder),), tokenizer="unused",
                                  seq_len=seq_len, **data),
                  trainer=TrainerConfig(batch_size=batch_size))


@pytest.fixture
def small_window(monkeypatch):
    # A window of a few rows, so the tests cross row-shuffle windows within a few batches.
    monkeypatch.setattr(mixture, "ROW_SHUFFLE_TOKENS", 6 * 32)


def test_train_batches_are_valid_packed_slices(corpus, small_window):
    folder, texts, tok = corpus
    tokenize = Tokenize(tok, True, True)
    docs = [tokenize(t).tolist() for t in texts]
    it = make_train_iterator(_cfg(folder), tok, process_index=0, process_count=1)
    pieces = []
    for _ in range(12):
        batch = next(it)
        assert batch["tokens"].shape == (4, 32)
        pieces += _check_rows(batch, docs, 32)
    # Documents begin with BOS and end with EOS; the stream covers many documents.
    assert docs[0][0] == tok.bos_id and docs[0][-1] == tok.eos_id
    assert len({p[0] for p in pieces}) > 8


def test_eval_covers_every_token_once_and_is_deterministic(corpus):
    folder, texts, tok = corpus
    tokenize = Tokenize(tok, True, True)
    docs = [tokenize(t).tolist() for t in texts]
    cfg = _cfg(folder, batch_size=4, seq_len=64)
    batches = make_eval_batches(cfg, tok, 1000, process_index=0, process_count=1)
    rows = {k: np.concatenate([b[k] for b in batches]) for k in FIELDS}
    _check_rows(rows, docs, 64)
    mask = rows["loss_mask"] > 0
    got = sorted(zip(rows["tokens"][mask].tolist(), rows["targets"][mask].tolist()))
    assert got == sorted((d[j], d[j + 1]) for d in docs for j in range(len(d) - 1))
    assert len(batches) == -(-mask.sum() // (4 * 64))  # all there is, last batch padded
    assert all(b["tokens"].shape == (4, 64) for b in batches)
    # Fewer batches than the set holds: rows evenly spaced over the whole eval stream, the same
    # on every call and every process layout.
    again = make_eval_batches(cfg, tok, 2, process_index=0, process_count=1)
    assert len(again) == 2
    all_rows = [tuple(r) for r in rows["tokens"].tolist()]
    picked = [tuple(r) for b in again for r in b["tokens"].tolist()]
    n_real = int((rows["segment_ids"].max(axis=1) > 0).sum())
    want_idx = np.linspace(0, n_real - 1, 8).round().astype(int)
    assert picked == [all_rows[i] for i in want_idx]
    for a, b in zip(again, make_eval_batches(cfg, tok, 2, process_index=0, process_count=1)):
        for k in FIELDS:
            np.testing.assert_array_equal(a[k], b[k])
    # Two processes get the two halves of each global batch.
    halves = [make_eval_batches(cfg, tok, 2, process_index=p, process_count=2) for p in (0, 1)]
    for g, (h0, h1) in enumerate(zip(*halves)):
        for k in FIELDS:
            np.testing.assert_array_equal(np.concatenate([h0[k], h1[k]]), again[g][k])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_yields_the_same_batches(corpus, small_window, num_workers):
    folder, _, tok = corpus
    cfg = _cfg(folder, num_workers=num_workers, seed=3)
    it = make_train_iterator(cfg, tok, process_index=0, process_count=1)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(9)]  # crosses epochs and shuffle windows
    restored = make_train_iterator(cfg, tok, process_index=0, process_count=1)
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        for k in FIELDS:
            np.testing.assert_array_equal(got[k], want[k])
    other = make_train_iterator(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seed=4)), tok,
                                process_index=0, process_count=1)
    with pytest.raises(ValueError, match="seed: saved 3, now 4"):
        other.set_state(state)


def test_epochs_reshuffle(corpus, small_window):
    folder, texts, tok = corpus
    it = make_train_iterator(_cfg(folder, batch_size=1, seq_len=1024), tok, process_index=0, process_count=1)
    # A 1024-token row holds several whole documents; record the order documents start in.
    order = []
    while len(order) < 3 * len(texts):
        row = next(it)
        text = tok.decode(row["tokens"][0][row["segment_ids"][0] > 0].tolist())
        order += re.findall(r"def d(\d{3})\(\)", text)
    first, second = order[: len(texts)], order[len(texts): 2 * len(texts)]
    assert sorted(first) != first and first != second


def test_process_shards_are_disjoint_and_cover_all_docs(corpus, small_window):
    folder, texts, tok = corpus
    cfg = _cfg(folder, batch_size=4, seq_len=32)
    seen = []
    for p in (0, 1):
        it = make_train_iterator(cfg, tok, process_index=p, process_count=2)
        ids = set()
        for _ in range(60):
            batch = next(it)
            assert batch["tokens"].shape == (2, 32)
            for r in range(2):
                seg = batch["segment_ids"][r]
                for s in range(1, seg.max() + 1):
                    ids |= set(re.findall(r"d(\d{3})", tok.decode(batch["tokens"][r][seg == s].tolist())))
        seen.append(ids)
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {f"{i:03d}" for i in range(len(texts))}
    with pytest.raises(ValueError, match="divisible"):
        make_train_iterator(_cfg(folder, batch_size=3), tok, process_index=0, process_count=2)
