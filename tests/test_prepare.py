"""Prepared token shards, compressed jsonl and ArrayRecord sources, bad input."""

import gzip
import hashlib
import json
import os
import pickle
import re
import shutil

import numpy as np
import pytest
import zstandard

from jaxllm.config import Config, DataConfig, TrainerConfig
from jaxllm.data import files, mixture, prepare
from jaxllm.data.documents import Tokenize, open_source
from jaxllm.data.files import SourceError
from jaxllm.data.pipeline import make_eval_batches, make_train_iterator
from jaxllm.data.shards import PreparedSource
from jaxllm.data.tokenizer import Tokenizer, train_sentencepiece

FIELDS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A jsonl file of small documents (each names its id), with bad lines, and a tokenizer."""
    root = tmp_path_factory.mktemp("prep")
    rng = np.random.default_rng(0)
    texts = []
    for i in range(60):
        body = "".join(f"    x{j} = {int(rng.integers(0, 99))}\n" for j in range(int(rng.integers(1, 9))))
        texts.append(f"def doc{i:03d}():\n{body}    return {i}\n")
    lines = [json.dumps({"text": t}).encode() for t in texts]
    lines.insert(5, b'{"text": broken')
    lines.insert(9, b'{"other": 1}')
    (root / "docs.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    model = train_sentencepiece(texts, 300, str(root / "sp"))
    other = train_sentencepiece(texts, 320, str(root / "other"))
    return root, texts, Tokenizer(model), Tokenizer(other)


def _files(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def prepared(corpus):
    root, texts, tok, _ = corpus
    src = open_source([str(root / "docs.jsonl")])
    out = root / "prepared"
    prepare.prepare(src, tok, str(out), workers=1, shard_tokens=300,
                    source_info={"specs": [str(root / "docs.jsonl")], "text_field": "text"})
    return out


# ----------------------------------------------------------------------------- prepared shards


def test_shards_decode_to_the_tokenized_documents_for_any_worker_count(corpus, prepared):
    root, texts, tok, _ = corpus
    tokenize = Tokenize(tok, True, True)
    want = [tokenize(t) for t in texts]
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16" and manifest["documents"] == 60
    assert manifest["tokens"] == sum(len(w) for w in want)
    assert manifest["sources"]["skipped"] == {"malformed JSON": 1, "missing field 'text'": 1}
    model_sha = hashlib.sha256(open(tok.path, "rb").read()).hexdigest()
    assert manifest["tokenizer"]["sha256"] == model_sha and manifest["add_bos"] and manifest["add_eos"]
    # Shards close at the first document that brings them to 300 tokens.
    shards, start = manifest["shards"], 0
    assert len(shards) > 3
    for k, shard in enumerate(shards):
        lens = [len(w) for w in want[start:start + shard["documents"]]]
        assert shard["tokens"] == sum(lens)
        assert sum(lens[:-1]) < 300 and (sum(lens) >= 300 or k == len(shards) - 1)
        raw = np.fromfile(prepared / shard["tokens_file"], np.uint16)
        np.testing.assert_array_equal(raw, np.concatenate(want[start:start + shard["documents"]]))
        start += shard["documents"]
    src = PreparedSource(str(prepared))
    assert len(src) == 60
    for i in range(60):
        assert src[i].dtype == np.int32
        np.testing.assert_array_equal(src[i], want[i])
    assert tok.decode(src[7][1:-1]) == texts[7]
    # 3 worker processes write exactly the same bytes.
    again = root / "prepared-3"
    prepare.prepare(open_source([str(root / "docs.jsonl")]), tok, str(again), workers=3, shard_tokens=300,
                    source_info={"specs": [str(root / "docs.jsonl")], "text_field": "text"})
    assert _files(again) == _files(prepared)
    assert not [n for n in os.listdir(root) if ".tmp-" in n]  # no scratch left behind


def test_uint32_tokens_for_a_large_vocabulary(corpus, tmp_path):
    root, texts, tok, _ = corpus

    class BigVocab(Tokenizer):
        vocab_size = 70_000

    big = BigVocab(tok.path)
    manifest = prepare.prepare(open_source([str(root / "docs.jsonl")]), big, str(tmp_path / "p"), workers=1)
    assert manifest["dtype"] == "uint32" and len(manifest["shards"]) == 1
    assert os.path.getsize(tmp_path / "p" / "shard-00000.bin") == 4 * manifest["tokens"]
    src = PreparedSource(str(tmp_path / "p"))
    np.testing.assert_array_equal(src[3], Tokenize(tok, True, True)(texts[3]))
    assert prepare.token_dtype(65536) == np.uint16 and prepare.token_dtype(65537) == np.uint32


def test_command_line(corpus, tmp_path, capsys):
    root, texts, tok, _ = corpus
    out = tmp_path / "cli"
    args = ["--input", str(root / "docs.jsonl"), "--tokenizer", tok.path, "--output", str(out),
            "--workers", "2", "--shard-tokens", "500"]
    assert prepare.main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["documents"] == 60 and report["dtype"] == "uint16"
    assert prepare.main(args) == 2 and "exists; pass --overwrite" in capsys.readouterr().err
    assert prepare.main(args + ["--overwrite", "--no-bos"]) == 0
    assert json.loads((out / "manifest.json").read_text())["add_bos"] is False
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {{vocab_size: 512}}\ndata: {{train: ['{root / 'docs.jsonl'}'], tokenizer: '{tok.path}'}}\n")
    assert prepare.main(["--config", str(cfg), "--output", str(tmp_path / "c"), "--workers", "1",
                         "data.add_eos=false"]) == 0
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["add_eos"] is False and manifest["sources"]["split"] == "train"
    assert manifest["documents"] == 60 and manifest["tokens"] == sum(len(tok.encode(t)) + 1 for t in texts)
    assert prepare.main(["--input", f"prepared:{out}", "--tokenizer", tok.path, "--output", str(tmp_path / "x")]) == 2
    assert "already prepared token shards" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not a prepared folder; not replacing it"):
        prepare.prepare(open_source([str(root / "docs.jsonl")]), tok, str(tmp_path / "mine"), overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def _cfg(train, *, batch_size=4, seq_len=32, **data):
    return Config(data=DataConfig(train=tuple(train), eval=tuple(train), tokenizer="unused", seq_len=seq_len,
                                  **data), trainer=TrainerConfig(batch_size=batch_size))


@pytest.fixture
def small_window(monkeypatch):
    monkeypatch.setattr(mixture, "ROW_SHUFFLE_TOKENS", 6 * 32)


@pytest.mark.parametrize("packing", ["greedy", "best_fit"])
def test_pipeline_on_prepared_shards_equals_raw_text_and_resumes(corpus, prepared, small_window, packing):
    root, _, tok, _ = corpus
    opts = dict(packing=packing, pack_buffer=8, seed=5)
    raw = make_train_iterator(_cfg([str(root / "docs.jsonl")], **opts), tok, process_index=0, process_count=1)
    raw_batches = [next(raw) for _ in range(10)]
    for spec in (str(prepared), f"prepared:{prepared}"):
        prep = make_train_iterator(_cfg([spec], **opts), tok, process_index=0, process_count=1)
        for want in raw_batches:
            got = next(prep)
            for k in FIELDS:
                np.testing.assert_array_equal(got[k], want[k])
    # Resume mid-stream (JSON state) gives the batches of an uninterrupted run.
    it = make_train_iterator(_cfg([str(prepared)], **opts), tok, process_index=0, process_count=1)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(8)]
    restored = make_train_iterator(_cfg([str(prepared)], **opts), tok, process_index=0, process_count=1)
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        for k in FIELDS:
            np.testing.assert_array_equal(got[k], want[k])
    a = make_eval_batches(_cfg([str(root / "docs.jsonl")], **opts), tok, 3, process_index=0, process_count=1)
    b = make_eval_batches(_cfg([str(prepared)], **opts), tok, 3, process_index=0, process_count=1)
    for x, y in zip(a, b, strict=True):
        for k in FIELDS:
            np.testing.assert_array_equal(x[k], y[k])


def test_tokenizer_or_bos_eos_mismatch_is_an_error_naming_both(corpus, prepared):
    root, _, tok, other = corpus
    manifest = str(prepared / "manifest.json")
    it = make_train_iterator(_cfg([str(prepared)]), other, process_index=0, process_count=1)
    with pytest.raises(SourceError, match=re.escape(manifest) + ".*tokenizer: shards made with "
                       + re.escape(tok.path) + r" \(sha256 [0-9a-f]{16}\), data.tokenizer is "
                       + re.escape(other.path)):
        next(it)
    it = make_train_iterator(_cfg([str(prepared)], add_eos=False), tok, process_index=0, process_count=1)
    with pytest.raises(SourceError, match="data.add_eos: shards made with true, configured false"):
        next(it)
    src = PreparedSource(str(prepared))
    src.check(tok, True, True)  # the configuration it was made with passes
    with pytest.raises(SourceError, match="data.add_bos: shards made with true, configured false"):
        src.check(tok, False, True)

    class OtherBos(Tokenizer):  # same model file, other special tokens (as a tokenizer_config.json may say)
        bos_id = 5

    with pytest.raises(SourceError, match=re.escape("bos_id: shards made with 1, the tokenizer has 5")):
        src.check(OtherBos(tok.path), True, True)
    with pytest.raises(SourceError, match="prepared token shards hold no text files"):
        files.resolve_files(str(prepared))


def test_truncated_or_missing_shard_files_are_named(prepared, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(prepared, bad)
    with open(bad / "shard-00001.bin", "r+b") as f:
        f.truncate(os.path.getsize(bad / "shard-00001.bin") - 2)
    with pytest.raises(SourceError, match=re.escape(str(bad / "shard-00001.bin")) + ": truncated or damaged shard"):
        open_source([str(bad)])
    shutil.copy(prepared / "shard-00001.bin", bad / "shard-00001.bin")
    open_source([f"prepared:{bad}"])  # repaired
    (bad / "shard-00002.idx.npy").write_bytes((prepared / "shard-00002.idx.npy").read_bytes()[:-8])
    with pytest.raises(SourceError, match=re.escape(str(bad / "shard-00002.idx.npy"))):
        open_source([str(bad)])
    os.unlink(bad / "shard-00002.bin")
    with pytest.raises(SourceError, match=re.escape(str(bad / "shard-00002.bin")) + ": missing shard"):
        open_source([str(bad)])
    with pytest.raises(SourceError, match="no manifest.json"):
        open_source([f"prepared:{tmp_path}"])


# ----------------------------------------------------------------------------- compressed jsonl


def _jsonl_bytes(n=40):
    lines = [json.dumps({"text": f"document {i} " + "word " * (i % 11)}).encode() for i in range(n)]
    lines[3] = b'{"text": broken'
    lines[8] = b'{"text": "bad \xff byte"}'
    lines[12] = b'{"text": "  "}'
    return b"\n".join(lines) + b"\n"


def _gz_two_members(data):
    half = data.index(b"\n", len(data) // 2) + 1
    return gzip.compress(data[:half]) + gzip.compress(data[half:])


def _zst_frames(data):
    c = zstandard.ZstdCompressor()
    cut = data.index(b"\n", len(data) // 3) + 1
    return c.compress(data[:cut]) + c.compress(data[cut:])


def test_gz_and_zst_read_the_same_documents_as_plain_jsonl(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLLM_DATA_CACHE", str(tmp_path / "cache"))
    data = _jsonl_bytes()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_bytes(data)
    (tmp_path / "d" / "b.jsonl.gz").write_bytes(_gz_two_members(data))
    (tmp_path / "d" / "c.jsonl.zst").write_bytes(_zst_frames(data))
    plain = open_source([str(tmp_path / "d" / "a.jsonl")])
    want = [plain[i] for i in range(len(plain))]
    assert len(want) == 37 and dict(plain.skipped) == {"malformed JSON": 1, "invalid UTF-8": 1, "empty document": 1}
    for name in ("b.jsonl.gz", "c.jsonl.zst"):
        src = open_source([str(tmp_path / "d" / name)])
        assert [src[i] for i in reversed(range(len(src)))] == want[::-1]  # random access
        assert src.skipped == plain.skipped
        with pytest.raises(SourceError, match=re.escape(f"{tmp_path / 'd' / name}:4: malformed JSON")):
            open_source([str(tmp_path / "d" / name)], strict=True)
        assert pickle.loads(pickle.dumps(src))[5] == want[5]
    folder = open_source([str(tmp_path / "d")])
    assert [folder[i] for i in range(len(folder))] == want * 3
    # One cached copy per file, reused; a changed file gets a new copy and the old one goes.
    cache = tmp_path / "cache" / "decompressed"
    copies = sorted(n for n in os.listdir(cache) if n.endswith(".jsonl"))
    assert len(copies) == 2
    stamp = {n: os.stat(cache / n).st_mtime_ns for n in copies}
    open_source([str(tmp_path / "d" / "b.jsonl.gz")])
    assert {n: os.stat(cache / n).st_mtime_ns for n in copies} == stamp
    (tmp_path / "d" / "b.jsonl.gz").write_bytes(gzip.compress(data[: data.index(b"\n") + 1]))
    assert open_source([str(tmp_path / "d" / "b.jsonl.gz")])[0] == want[0]
    assert len(sorted(n for n in os.listdir(cache) if n.endswith(".jsonl"))) == 2


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_truncated_and_unreadable_compressed_files(tmp_path, suffix):
    # 3000 lines, ~650 kB: several zstd blocks (a zstd decoder emits whole blocks of <= 128 kB).
    data = b"".join(json.dumps({"text": f"doc {i} " + "abc " * 50}).encode() + b"\n" for i in range(3000))
    whole = gzip.compress(data) if suffix == ".jsonl.gz" else zstandard.ZstdCompressor().compress(data)
    path = tmp_path / f"t{suffix}"
    path.write_bytes(whole[: len(whole) // 2])
    cache = str(tmp_path / "cache")
    src = open_source([str(path)], cache_dir=cache)
    n = len(src)
    assert 0 < n < 3000 and [src[i] for i in range(n)] == [f"doc {i} " + "abc " * 50 for i in range(n)]
    assert dict(src.skipped) == {"truncated file": 1}
    with pytest.raises(SourceError, match=re.escape(f"{path}:{n + 1}: truncated file")):
        open_source([str(path)], strict=True, cache_dir=cache)
    path.write_bytes(b"this is not compressed data at all\n")
    with pytest.raises(SourceError, match=re.escape(str(path)) + ": cannot decompress"):
        open_source([str(path)], cache_dir=cache)


# ----------------------------------------------------------------------------- ArrayRecord


def _write_array_record(path, records):
    from array_record.python.array_record_module import ArrayRecordWriter

    w = ArrayRecordWriter(str(path), "group_size:1")
    for r in records:
        w.write(r)
    w.close()


def test_array_record_round_trip_and_bad_records(tmp_path):
    texts = [f"record {i}: " + "tok " * (i % 5) for i in range(30)]
    records = [json.dumps({"text": t, "id": i}).encode() for i, t in enumerate(texts)]
    records[2] = b"not json"
    records[4] = b'{"text": "bad \xff"}'
    records[6] = json.dumps({"id": 6}).encode()
    records[7] = json.dumps({"text": ""}).encode()
    good = [t for i, t in enumerate(texts) if i not in (2, 4, 6, 7)]
    (tmp_path / "ds").mkdir()
    _write_array_record(tmp_path / "ds" / "train.array_record-00000-of-00002", records[:20])
    _write_array_record(tmp_path / "ds" / "train.array_record-00001-of-00002", records[20:])
    src = open_source([str(tmp_path / "ds")])
    assert [src[i] for i in range(len(src))] == good
    shards = [str(tmp_path / "ds" / f"train.array_record-0000{k}-of-00002") for k in (0, 1)]
    assert [src.where(i) for i in (0, 2, 16)] == [f"{shards[0]}: record 0", f"{shards[0]}: record 3",
                                                   f"{shards[1]}: record 0"]
    assert src.files == shards and src.file_ids.tolist() == [0] * 16 + [1] * 10
    assert [src[i] for i in reversed(range(len(src)))] == good[::-1]
    assert pickle.loads(pickle.dumps(src))[len(good) - 1] == good[-1]
    assert dict(src.skipped) == {"malformed JSON": 1, "invalid UTF-8": 1, "missing field 'text'": 1,
                                 "empty document": 1}
    first = tmp_path / "ds" / "train.array_record-00000-of-00002"
    with pytest.raises(SourceError, match=re.escape(f"{first}: record 2: malformed JSON")):
        open_source([str(tmp_path / "ds")], strict=True)
    single = tmp_path / "one.array_record"
    _write_array_record(single, records[20:])
    assert [open_source([str(single)])[i] for i in range(10)] == texts[20:]
    raw = single.read_bytes()
    single.write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(SourceError, match=re.escape(str(single)) + ": not a readable ArrayRecord file"):
        open_source([str(single)])
