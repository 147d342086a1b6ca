"""Curation on datatrove: each filter's decisions equal datatrove's on real text (the standard
library's module docstrings, prose nobody here wrote), records keep their ids and fields,
exact and MinHash dedup across tasks, decontamination, the quality scorer and its selection,
settings named and defaulted as datatrove's arguments, and the CLI end to end."""

import ast
import collections
import functools
import gzip
import inspect
import json
import os
import random
import struct
import subprocess
import sys
import sysconfig
import types

import numpy as np
import pyarrow.parquet as pq
import pytest
from datatrove.data import Document
from datatrove.pipeline.decont import NGramsDecontConfig, NGramsDecontIndexer
from datatrove.pipeline.dedup import MinhashConfig
from datatrove.pipeline.filters import (C4BadWordsFilter, C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                        GopherRepetitionFilter, LanguageFilter)
from datatrove.utils.hashing import create_hash_func
from datatrove.utils.word_tokenizers import load_word_tokenizer

from jaxllm.curate import quality, scoring
from jaxllm.curate.cli import main
from jaxllm.curate.config import CurateConfig, load_config
from jaxllm.curate.decontaminate import ngram_hashes
from jaxllm.curate.filters import BAD_WORDS_PATH, LocalBadWordsFilter
from jaxllm.curate.pipeline import curate
from jaxllm.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STOP = ["the", "be", "to", "of", "and", "that", "have", "with"]


@functools.lru_cache(maxsize=1)
def stdlib_docstrings() -> tuple:
    """(module file, docstring) of every standard-library module with a docstring over 400 chars."""
    root, out = sysconfig.get_paths()["stdlib"], []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "test", "tests", "idlelib", "__pycache__"))
        for name in sorted(f for f in files if f.endswith(".py")):
            try:
                doc = ast.get_docstring(ast.parse(open(os.path.join(folder, name), encoding="utf-8").read()))
            except (SyntaxError, UnicodeDecodeError):
                continue
            if doc and len(doc) > 400:
                out.append((os.path.relpath(os.path.join(folder, name), root), doc))
    return tuple(out)


def rand_word(rng, lo=3, hi=8):
    return "".join(rng.choice("abcdefghijklmnoprstuvwy") for _ in range(rng.randint(lo, hi)))


def prose(rng, n_words, per_line=10):
    tokens = [rng.choice(STOP) if rng.random() < 0.2 else rand_word(rng) for _ in range(n_words)]
    return "\n".join(" ".join(tokens[i:i + per_line]).capitalize() + "." for i in range(0, n_words, per_line))


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def run(tmp_path, inputs, name="out", **settings):
    """Curates `inputs` with `settings` (no filters or dedup unless given) into `name`.jsonl;
    returns (kept records, report)."""
    settings = {"filters": [], "dedup": [], "workers": 1, **settings}
    out = str(tmp_path / f"{name}.jsonl")
    report = curate(CurateConfig(input=list(inputs), output=out, **settings))
    return read_jsonl(out), report


def removed_rules(report, stage):
    return {rule: c["removed"] for rule, c in report["stages"][stage]["rules"].items() if c.get("removed")}


# ----------------------------------------------------------------------------- parity with datatrove


@pytest.fixture(scope="module")
def real_text(tmp_path_factory):
    """The docstrings as records in two files (two tasks), each with a url field."""
    root = tmp_path_factory.mktemp("real")
    records = [{"id": f"std-{i}", "text": doc, "url": f"stdlib://{name}"} for i, (name, doc) in
               enumerate(stdlib_docstrings())]
    files = [write_jsonl(root / f"part{k}.jsonl", records[k::2]) for k in range(2)]
    return files, records


def datatrove_decisions(make_filter, records):
    kept, reasons = {}, collections.Counter()
    f = make_filter()
    for r in records:
        doc = Document(text=r["text"], id=r["id"])
        result = f.filter(doc)
        if result is True:
            kept[r["id"]] = doc.text
        else:
            reasons[result[1] if isinstance(result, tuple) else "language"] += 1
    return kept, reasons


@pytest.mark.parametrize("name, reference", [
    ("c4", C4QualityFilter), ("gopher_quality", GopherQualityFilter),
    ("gopher_repetition", GopherRepetitionFilter), ("fineweb_quality", FineWebQualityFilter)])
def test_filters_decide_as_datatrove_on_real_text(tmp_path, real_text, name, reference):
    files, records = real_text
    kept, reasons = datatrove_decisions(reference, records)
    assert 0 < len(kept) < len(records)  # the fixture exercises both decisions
    out, report = run(tmp_path, files, filters=[name])
    assert {r["id"]: r["text"] for r in out} == kept  # same documents, same cleaned text
    assert removed_rules(report, name) == dict(reasons)
    assert report["stages"][name]["seen"] == len(records) and report["input"]["documents"] == len(records)
    if name == "c4":  # C4 edits what it keeps; the report counts edited documents and removed lines
        edited = sum(kept[r["id"]] != r["text"] for r in records if r["id"] in kept)
        assert report["stages"]["c4"]["modified"] == edited > 0
        assert report["stages"]["c4"]["rules"]["no_terminal_punc"]["lines_removed"] > 0


def write_fasttext(path, words, labels, input_rows, output_rows):
    """A supervised fastText model file (format 12): softmax over `labels`, one input row per word,
    no subwords or word n-grams. (The fastText wheel's trainer stops with "Encountered NaN" more
    often than not here, so the test writes its model instead of training one.)"""
    with open(path, "wb") as f:
        f.write(struct.pack("<ii", 793712314, 12))
        # dim ws epoch minCount neg wordNgrams loss=softmax model=supervised bucket minn maxn lrUpdateRate, t
        f.write(struct.pack("<12id", input_rows.shape[1], 5, 5, 1, 5, 1, 3, 3, 0, 0, 0, 100, 1e-4))
        entries = [(w, 0) for w in words] + [(f"__label__{lang}", 1) for lang in labels]
        f.write(struct.pack("<iiiqq", len(entries), len(words), len(labels), len(entries), -1))
        for name, kind in entries:
            f.write(name.encode() + b"\0" + struct.pack("<qb", 1, kind))
        for rows in (input_rows, output_rows):
            f.write(struct.pack("<?qq", False, *rows.shape) + np.ascontiguousarray(rows, np.float32).tobytes())


def test_language_filter_decides_as_datatrove(tmp_path, real_text):
    import fasttext

    # English function words point one way, Python tokens the other.
    en = STOP + ["a", "is", "in", "for", "it", "this", "are", "or", "as", "an", "by", "on", "not", "can"]
    py = ["def", "return", "=", "==", "import", "class", "self", "None", "if", "else:", "#", "+=", "raise", "in"]
    words = ["</s>"] + en + py
    rows = np.zeros((len(words), 2), np.float32)
    rows[1:1 + len(en), 0] = rows[1 + len(en):, 1] = 1
    model = str(tmp_path / "lid.bin")
    write_fasttext(model, words, ["en", "py"], rows, np.array([[8, 0], [0, 8]], np.float32))
    files, records = real_text
    code = [{"id": f"code-{i}", "text": open(os.path.join(sysconfig.get_paths()["stdlib"], name)).read()[-1500:]}
            for i, (name, _) in enumerate(stdlib_docstrings()[:20])]
    files = files + [write_jsonl(tmp_path / "code.jsonl", code)]

    def reference():
        f = LanguageFilter(languages=["en"])
        f.model._model = fasttext.load_model(model)  # datatrove's filter, the model given instead of downloaded
        return f

    kept, _ = datatrove_decisions(reference, records + code)
    assert sum(k.startswith("std-") for k in kept) > len(records) / 2 > 0  # prose mostly kept,
    assert sum(k.startswith("code-") for k in kept) < len(code) / 2      # code mostly not
    out, report = run(tmp_path, files, filters=["language"], language_model=model)
    assert {r["id"] for r in out} == set(kept)
    assert report["stages"]["language"]["removed"] == len(records) + len(code) - len(kept)


def test_bad_words_use_datatrove_matching_on_a_local_list(tmp_path):
    (tmp_path / "bad.txt").write_text("# my list\nzonk\nflim flam\n\n")
    docs = {"word": "That was a zonk.", "caps": "A ZONK again.", "inside": "Zonking is fine.",
            "phrase": "It was flim flam.", "clean": "Nothing to see."}
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": k, "text": v} for k, v in docs.items()])
    out, report = run(tmp_path, [src], filters=["c4_badwords"], c4_badwords_path=str(tmp_path / "bad.txt"))
    assert {r["id"] for r in out} == {"inside", "clean"}
    assert removed_rules(report, "c4_badwords") == {"document_removed_with_badwords": 3}
    out, _ = run(tmp_path, [src], filters=["c4_badwords"], c4_badwords_path=str(tmp_path / "bad.txt"),
                 c4_badwords_keep_fraction=1.0)
    assert len(out) == 5  # keep_fraction 1 keeps every document with bad words
    assert LocalBadWordsFilter(BAD_WORDS_PATH).filter(Document("an anus here", "x")) == (
        False, "document_removed_with_badwords")  # the shipped list loads


def _default(cls, arg):
    return inspect.signature(cls.__init__).parameters[arg].default


def test_settings_are_datatrove_arguments_with_its_defaults():
    cfg = CurateConfig()
    for prefix, classes in (("c4_", [C4QualityFilter]), ("gopher_", [GopherQualityFilter, GopherRepetitionFilter]),
                            ("fineweb_", [FineWebQualityFilter])):
        args = {a: c for c in classes for a in inspect.signature(c.__init__).parameters}
        keys = [k for k in vars(cfg) if k.startswith(prefix) and not k.startswith("c4_badwords_")]
        for key in keys:
            arg = key[len(prefix):]
            assert arg in args, f"{key} is not an argument of {classes}"
            default = _default(args[arg], arg)
            ours = getattr(cfg, key)
            if isinstance(ours, dict):
                ours = tuple(sorted(ours.items()))
            assert ours == default, key
    assert _default(C4BadWordsFilter, "keep_fraction") == cfg.c4_badwords_keep_fraction
    assert _default(LanguageFilter, "language_threshold") == cfg.language_threshold
    mh = MinhashConfig()
    assert (mh.n_grams, mh.num_buckets, mh.hashes_per_bucket, mh.seed) == (
        cfg.minhash_n_grams, cfg.minhash_num_buckets, cfg.minhash_hashes_per_bucket, cfg.minhash_seed)
    assert NGramsDecontConfig().n_grams == cfg.decontam_n_grams
    with pytest.raises(ConfigError, match="c4_min_sentences: renamed to c4_min_num_sentences"):
        load_config(None, {"c4_min_sentences": 3})


# ----------------------------------------------------------------------------- records


def test_records_keep_their_id_and_fields(tmp_path, capsys):
    rng = random.Random(0)
    body = [prose(rng, 60) for _ in range(4)]
    rows = [
        {"id": "a1", "url": "https://a/1", "text": body[0] + "\nHome | About", "meta": {"lang": "en"}, "tags": [1, 2]},
        {"text": body[1], "id": 7, "date": "2024-01-02"},
        '{"text": broken',
        {"url": "https://c/3", "text": body[2]},                   # no id: named <file>/<line>
        {"id": "short", "text": "Too short to keep."},             # C4 drops it
        {"id": "empty", "url": "x"},                               # no text: skipped
        {"id": "d4", "text": body[3]},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out, report = run(tmp_path, [src], filters=["c4"], removed=str(tmp_path / "rm.jsonl"))
    c4 = C4QualityFilter()
    expected = []
    for i, row in enumerate(rows):
        if isinstance(row, dict) and "text" in row and c4.filter(doc := Document(row["text"], "x")) is True:
            expected.append({**row, "text": doc.text} if "id" in row else {**row, "text": doc.text, "id": f"in.jsonl/{i}"})
    assert out == expected and [list(r) for r in out] == [list(r) for r in expected]  # field order kept
    assert out[0]["text"] == body[0]  # the navigation line is gone
    assert report["input"]["skipped"] == {"malformed_json": 1, "no_text": 1}
    assert report["stages"]["c4"]["examples"]["too_few_sentences"]["id"] == "short"
    assert [(r["id"], r["source"], r["rule"]) for r in read_jsonl(tmp_path / "rm.jsonl")] == [
        ("short", src, "too_few_sentences")]
    # strict: the first bad line is a one-line error, exit 2
    assert main(["--input", src, "--output", str(tmp_path / "s.jsonl"), "--strict", "--filters", "none",
                 "--dedup", "none", "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"error: {src}:3: malformed json (strict mode)"


def test_url_inputs_and_output_formats(tmp_path):
    records = [{"id": f"r{i}", "text": f"Document number {i} is here.", "n": i, "tags": ["a", str(i)]} for i in range(6)]
    (tmp_path / "in").mkdir()
    for k in range(2):
        write_jsonl(tmp_path / "in" / f"part{k}.jsonl", records[k::2])
    # a URL pattern goes to datatrove's reader as folder + glob (s3://, hf://, ... alike)
    report = curate(CurateConfig(input=[f"file://{tmp_path}/in/part*.jsonl"], output=str(tmp_path / "out.parquet"),
                                 filters=[], dedup=[], workers=1))
    assert report["input"]["files"] == 2 and report["output"]["format"] == "parquet"
    assert sorted(pq.read_table(tmp_path / "out.parquet").to_pylist(), key=lambda r: r["n"]) == records
    curate(CurateConfig(input=[str(tmp_path / "in")], output=str(tmp_path / "out.jsonl.gz"), filters=[], dedup=[],
                        workers=1))
    with gzip.open(tmp_path / "out.jsonl.gz", "rt") as f:
        assert sorted((json.loads(line) for line in f), key=lambda r: r["n"]) == records


# ----------------------------------------------------------------------------- dedup


def _edit(rng, text, frac):
    words = text.split()
    for i in rng.sample(range(len(words)), max(1, int(round(frac * len(words))))):
        words[i] = rand_word(rng, 9, 12)
    return " ".join(words)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """4 files: 40 unrelated documents, 8 near copies (1% of words changed) and 4 exact copies
    (case and spacing changed), each copy in another file than its original."""
    root, rng = tmp_path_factory.mktemp("dups"), random.Random(3)
    vocab = [rand_word(rng) for _ in range(3000)]
    originals = [{"id": f"o{i}", "text": " ".join(rng.choice(vocab) for _ in range(150))} for i in range(40)]
    near = {f"n{k}": f"o{i}" for k, i in enumerate(rng.sample(range(40), 8))}
    exact = {f"e{k}": f"o{i}" for k, i in enumerate(rng.sample(range(40), 4))}
    text = {r["id"]: r["text"] for r in originals}
    files = [[r for r in originals if int(r["id"][1:]) % 4 == f] for f in range(4)]
    for copy, orig in near.items():
        files[(int(orig[1:]) + 1) % 4].append({"id": copy, "text": _edit(rng, text[orig], 0.01)})
    for copy, orig in exact.items():
        files[(int(orig[1:]) + 2) % 4].append({"id": copy, "text": "  " + text[orig].upper().replace(" ", "\n ")})
    return [write_jsonl(root / f"part{f}.jsonl", recs) for f, recs in enumerate(files)], near, exact


@pytest.mark.parametrize("tasks", [1, 4])
def test_dedup_finds_the_planted_duplicates_across_tasks(tmp_path, planted, tasks):
    files, near, exact = planted
    out, report = run(tmp_path, files, dedup=["exact", "minhash"], tasks=tasks, removed=str(tmp_path / "rm.jsonl"))
    assert report["executor"]["stages"]["pass1"]["tasks"] == tasks
    removed = {r["id"]: r for r in read_jsonl(tmp_path / "rm.jsonl")}
    # one document of every planted pair goes, nothing else does: 52 in, 40 out
    assert len(out) == 40 and len(removed) == 12 and set(removed).isdisjoint(r["id"] for r in out)
    for copies, stage in ((exact, "exact_dedup"), (near, "minhash_dedup")):
        for copy, orig in copies.items():
            gone = copy if copy in removed else orig
            assert removed[gone]["stage"] == stage and ({copy, orig} - {gone}) < {r["id"] for r in out}
    for r in removed.values():
        if r["stage"] == "minhash_dedup":  # each removed near duplicate names the copy that stayed
            pair = next({c, o} for c, o in near.items() if r["id"] in (c, o))
            assert r["detail"]["duplicate_of"] == (pair - {r["id"]}).pop()
    assert report["stages"]["exact_dedup"]["removed"] == 4 and report["stages"]["minhash_dedup"]["removed"] == 8


# ----------------------------------------------------------------------------- decontamination


def test_decontamination(tmp_path):
    rng = random.Random(4)
    passages = [" ".join(rand_word(rng) for _ in range(30)) for _ in range(3)]
    eval_a = write_jsonl(tmp_path / "eval_a.jsonl", [{"text": p} for p in passages[:2]] + [{"text": "too short"}])
    eval_b = tmp_path / "eval_b.txt"
    eval_b.write_text(passages[2])
    words = passages[1].split()
    docs = {"planted": prose(rng, 40) + " " + " ".join(w.upper() + "," for w in words[5:18]) + " " + prose(rng, 40),
            "near_miss": prose(rng, 40) + " " + " ".join(words[5:16]) + " " + prose(rng, 40),  # 11 words only
            "from_b": prose(rng, 20) + "\n" + passages[2] + "\n" + prose(rng, 20),
            "unrelated": prose(rng, 200)}
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": k, "text": v} for k, v in docs.items()])
    out, report = run(tmp_path, [src], decontaminate=[eval_a, str(eval_b)], removed=str(tmp_path / "rm.jsonl"))
    assert {r["id"] for r in out} == {"near_miss", "unrelated"}
    stage = report["stages"]["decontaminate"]
    assert stage["by_eval_file"] == {eval_a: 1, str(eval_b): 1}
    assert (stage["eval_docs"], stage["eval_docs_too_short"], stage["n_grams"]) == (4, 1, 12)
    hit = {r["id"]: r["detail"] for r in read_jsonl(tmp_path / "rm.jsonl")}["planted"]
    assert hit["eval_file"] == eval_a and hit["ngram"] in " ".join(words[5:18]).lower()
    # the index holds what datatrove's own indexer computes for these labels
    config = NGramsDecontConfig()
    tok, hash_func = load_word_tokenizer("en"), create_hash_func(config.hash_config)
    indexer = types.SimpleNamespace(tokenizer=tok, config=config, hash_func=hash_func)
    assert ngram_hashes(passages[0], config, tok, hash_func) == NGramsDecontIndexer.compute_hashes(indexer, passages[0])


# ----------------------------------------------------------------------------- quality


def _quality_docs(rng, n, label):
    good, bad = [f"good{i}" for i in range(60)], [f"bad{i}" for i in range(60)]
    major, minor = (good, bad) if label else (bad, good)
    return [" ".join(rng.choice(major) if rng.random() < 0.65 else rng.choice(minor) for _ in range(60))
            for _ in range(n)]


@pytest.fixture(scope="module")
def quality_setup(tmp_path_factory):
    root, rng = tmp_path_factory.mktemp("quality"), random.Random(5)
    model = quality.train(_quality_docs(rng, 150, 1) + _quality_docs(rng, 150, 0), [1] * 150 + [0] * 150, epochs=100)
    model.save(str(root / "q.json"))
    texts = _quality_docs(rng, 30, 1) + _quality_docs(rng, 30, 0)
    records = [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)]
    files = [write_jsonl(root / f"p{k}.jsonl", records[k::3]) for k in range(3)]
    logits = {r["id"]: model.logit(r["text"]) for r in records}
    return root, model, files, logits


def test_quality_model_trains_and_round_trips(tmp_path, quality_setup):
    _, model, _, logits = quality_setup
    y = np.array([int(k[1:]) < 30 for k in logits])
    assert np.mean((np.array(list(logits.values())) >= 0) == y) > 0.9
    for name in ("m.json", "m.npz"):
        model.save(str(tmp_path / name))
        loaded = quality.QualityModel.load(str(tmp_path / name))
        assert np.allclose([loaded.logit(t) for t in _quality_docs(random.Random(1), 5, 1)],
                           [model.logit(t) for t in _quality_docs(random.Random(1), 5, 1)], atol=1e-5)


def test_quality_threshold_and_temperature_sampling(tmp_path, quality_setup):
    root, _, files, logits = quality_setup
    out, report = run(tmp_path, files, name="thr", quality_model=str(root / "q.json"), quality_threshold=0.7)
    assert {r["id"] for r in out} == {k for k, s in logits.items() if 1 / (1 + np.exp(-s)) >= 0.7}
    assert report["stages"]["quality"]["removed"] == len(logits) - len(out) > 0
    ids = list(logits)
    for tau, tasks in ((1.0, 1), (1.0, 3), (1e-6, 3)):
        out, _ = run(tmp_path, files, name=f"tau{tau}-{tasks}", tasks=tasks, quality_model=str(root / "q.json"),
                     quality_tau=tau, quality_keep_fraction=0.3, quality_seed=7,
                     workers=2 if tau == 1e-6 else 1)  # once with worker processes
        keys = np.array([logits[i] / tau + scoring.gumbel(7, i) for i in ids])
        assert {r["id"] for r in out} == {ids[j] for j in np.argsort(-keys)[:18]}  # exactly round(0.3 * 60)
        if tau < 1e-3:  # tau -> 0: the top 18 by score
            assert {r["id"] for r in out} == set(sorted(ids, key=lambda i: -logits[i])[:18])
    # tau -> inf: every document as likely (the noise alone decides)
    rates = np.mean([[scoring.sample_key(logits[i], 1e9, seed, i) for i in ids] >= np.sort(
        [scoring.sample_key(logits[i], 1e9, seed, i) for i in ids])[-18] for seed in range(300)], axis=0)
    assert abs(rates[:30].mean() - rates[30:].mean()) < 0.04 and abs(rates.mean() - 0.3) < 1e-9


# ----------------------------------------------------------------------------- CLI


def test_cli_end_to_end(tmp_path):
    rng = random.Random(6)
    docs = [prose(rng, 80) for _ in range(6)]
    eval_passage = " ".join(rand_word(rng) for _ in range(20))
    (tmp_path / "eval.txt").write_text(eval_passage)
    corpus = docs + [
        "  " + docs[0].replace(" ", "  "),                      # exact duplicate (spacing)
        docs[1].replace(docs[1].split()[10], "changed", 1),     # near duplicate: one word differs
        prose(rng, 20),                                         # c4: too few sentences
        docs[2] + "\nLorem ipsum dolor sit amet is here.",      # c4: lorem ipsum
        "\n".join("- " + line for line in prose(rng, 80).splitlines()),  # gopher: bullets
        prose(rng, 40) + "\n" + eval_passage + ".\n" + prose(rng, 40),   # contaminated
    ]
    src = [write_jsonl(tmp_path / f"in{k}.jsonl", [{"id": f"r{i}", "text": t} for i, t in enumerate(corpus)
                                                   if i % 2 == k]) for k in range(2)]
    write_jsonl(tmp_path / "pos.jsonl", [{"text": prose(rng, 80)} for _ in range(40)])
    write_jsonl(tmp_path / "neg.jsonl", [{"text": " ".join(rand_word(rng, 2, 3).upper() for _ in range(80))}
                                         for _ in range(40)])
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    train = subprocess.run([sys.executable, "-m", "jaxllm.curate", "train-quality", "--positive",
                            str(tmp_path / "pos.jsonl"), "--negative", str(tmp_path / "neg.jsonl"),
                            "--out", str(tmp_path / "q.json"), "--epochs", "50"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert train.returncode == 0, train.stderr
    assert "held-out accuracy 1.000" in train.stderr
    (tmp_path / "cfg.yaml").write_text("c4_min_num_sentences: 5\nminhash_num_buckets: 20\nminhash_hashes_per_bucket: 5\n")
    proc = subprocess.run(
        [sys.executable, "-m", "jaxllm.curate", "--config", str(tmp_path / "cfg.yaml"), "--input", *src,
         "--output", str(tmp_path / "out.jsonl"), "--filters", "c4,gopher", "--dedup", "exact,minhash",
         "--decontaminate", str(tmp_path / "eval.txt"), "--quality-model", str(tmp_path / "q.json"),
         "--quality-threshold", "0.5", "--report", str(tmp_path / "report.json"), "--workers", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "curate: 12 documents in, 6 out" in proc.stderr
    out = read_jsonl(tmp_path / "out.jsonl")
    assert sorted((o["id"], o["text"]) for o in out) == sorted((f"r{i}", docs[i]) for i in range(6))
    with open(tmp_path / "report.json") as f:
        report = json.load(f)
    counts = {name: (s["seen"], s["removed"]) for name, s in report["stages"].items()}
    assert counts == {"c4": (12, 2), "gopher_quality": (10, 1), "gopher_repetition": (9, 0),
                      "decontaminate": (9, 1), "exact_dedup": (8, 1), "minhash_dedup": (7, 1), "quality": (6, 0)}
    assert report["totals"]["documents_in"] == 12 and report["totals"]["documents_out"] == 6
    assert report["stages"]["minhash_dedup"]["examples"]["near_duplicate"]["detail"]["duplicate_of"] in ("r1", "r7")
    assert report["config"]["minhash_num_buckets"] == 20 and not os.path.exists(tmp_path / "out.jsonl.work")


def test_bad_settings_are_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "cfg.yaml").write_text("gopher_min_doc_words: 10\ngopher_min_wrods: 20\n")
    cases = [(["--config", str(tmp_path / "cfg.yaml")], "unknown key 'gopher_min_wrods'"),
             (["--set", "c4_min_sentence=3"], "unknown key 'c4_min_sentence'"),
             (["--set", "c4_min_num_sentences=many"], "c4_min_num_sentences: bad value 'many'"),
             (["--set", "gopher_min_words=20"], "gopher_min_words: renamed to gopher_min_doc_words"),
             (["--filters", "c4,language"], "language_model: the language filter needs a local fastText model"),
             (["--executor", "slurm"], "slurm_partition: required with executor slurm")]
    for flags, message in cases:
        assert main(["--input", "x", "--output", "y", *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (flags, err)
