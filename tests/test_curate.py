"""Data curation: every C4 / Gopher rule on crafted documents, exact and MinHash near dedup,
decontamination, the quality classifier and its selection, and the CLI end to end."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from jaxllm.curate import quality
from jaxllm.curate.cli import main
from jaxllm.curate.config import CurateConfig
from jaxllm.curate.decontaminate import Decontaminator
from jaxllm.curate.dedup import ExactDedup, MinHashDedup, lsh_params
from jaxllm.curate.filters import C4Filter, GopherQualityFilter, GopherRepetitionFilter
from jaxllm.curate.pipeline import curate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STOP = ["the", "be", "to", "of", "and", "that", "have", "with"]


def rand_word(rng, lo=3, hi=8):
    return "".join(rng.choice("abcdefghijklmnoprstuvwy") for _ in range(rng.randint(lo, hi)))


def prose(rng, n_words, per_line=10, end="."):
    """Lines of random words sprinkled with stop words: unrepetitive text every rule accepts."""
    tokens = [rng.choice(STOP) if rng.random() < 0.2 else rand_word(rng) for _ in range(n_words)]
    lines = [tokens[i:i + per_line] for i in range(0, n_words, per_line)]
    return "\n".join(" ".join(line).capitalize() + end for line in lines)


def write_jsonl(path, texts):
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return str(path)


def run_filters(tmp_path, docs: dict, **settings):
    """Curates `docs` (name -> text) with only the given settings; returns (kept names, report)."""
    names = list(docs)
    cfg = CurateConfig(input=[write_jsonl(tmp_path / "in.jsonl", docs.values())], output=str(tmp_path / "out.jsonl"),
                       dedup=[], **settings)
    report = curate(cfg)
    with open(cfg.output) as f:
        kept = {names[json.loads(line)["id"]]: json.loads(line)["text"] for line in f}
    return kept, report


def removed_by(report, stage):
    return {rule: c["removed"] for rule, c in report["stages"][stage]["rules"].items() if c["removed"]}


# ----------------------------------------------------------------------------- heuristic filters


def test_c4_rules(tmp_path):
    rng = random.Random(0)
    good = prose(rng, 60)  # 6 lines, one sentence each
    bad_words = tmp_path / "bad.txt"
    bad_words.write_text("# test list\nzonk\nflim flam\n")
    docs = {
        "good": good,
        "boilerplate": ("Home | About | Contact\n" + good + "\nClick here.\nPlease enable JavaScript to view it.\n"
                        "Read our privacy policy for details.\nAnd so it goes on and on...\n"
                        "Cited claims are here [1] and there [citation needed]."),
        "few_sentences": prose(rng, 30),
        "lorem": good + "\nLorem ipsum dolor sit amet, consectetur.",
        "curly": good + "\nCall it as f(x) { return x; } in code.",
        "bad_word": good + "\nThat was a total zonk of a day.",
        "bad_phrase": good + "\nIt was all flim, flam and nothing else.",
        "only_nav": "Home\nAbout us\nContact",
        "long_word": good + "\nThis line has a " + "x" * 1001 + " word.",
    }
    kept, report = run_filters(tmp_path, docs, filters=["c4"], c4_bad_words_path=str(bad_words))
    assert set(kept) == {"good", "boilerplate", "long_word"}
    assert kept["good"] == good and kept["long_word"] == good
    assert kept["boilerplate"] == good + "\nCited claims are here  and there ."
    assert removed_by(report, "c4") == {"too_few_sentences": 2, "lorem_ipsum": 1, "curly_brace": 1, "bad_words": 2}
    rules = report["stages"]["c4"]["rules"]
    assert rules["terminal_punctuation"] == {"removed": 0, "modified": 1, "lines_removed": 2}  # nav line, "..."
    assert rules["too_few_words"]["lines_removed"] == 1 and rules["javascript"]["lines_removed"] == 1
    assert rules["policy"]["lines_removed"] == 1 and rules["citations"]["modified"] == 1
    assert rules["long_word"]["lines_removed"] == 1
    stage = report["stages"]["c4"]
    assert (stage["seen"], stage["removed"], stage["modified"]) == (9, 6, 2)
    assert stage["examples"]["bad_words"]["detail"] == "zonk" and stage["examples"]["curly_brace"]["id"] == 4

    # --code (or c4_curly_braces: false) keeps the braces; the bundled bad-words list loads.
    kept, _ = run_filters(tmp_path, docs, filters=["c4"], code=True, c4_bad_words_path=str(bad_words))
    assert "curly" in kept
    assert C4Filter(CurateConfig()).bad_words  # the shipped list is found and non-empty


def test_gopher_quality_rules(tmp_path):
    rng = random.Random(1)
    good = prose(rng, 80)
    lines = good.splitlines()
    docs = {
        "good": good,
        "short": prose(rng, 30),
        "long": prose(rng, 130),
        "tiny_words": " ".join(rng.choice(["a", "I", "to", "be", "of", "is", "at", "xy"]) for _ in range(80)) + ".",
        "huge_words": " ".join(["the", "of"] + [rand_word(rng, 11, 14) for _ in range(78)]) + ".",
        "hashes": good + " " + " ".join("#tag" for _ in range(10)),
        "ellipses": good + " " + " ".join("wait..." for _ in range(10)),
        "bullets": "\n".join("- " + line for line in lines),
        "end_ellipsis": "\n".join(line[:-1] + "..." if i < 3 else line for i, line in enumerate(lines)),
        "numbers": good + " " + " ".join(str(rng.randint(100, 999)) for _ in range(30)),
        "no_stop_words": " ".join(rand_word(rng) for _ in range(80)) + " the.",
    }
    kept, report = run_filters(tmp_path, docs, filters=["gopher_quality"], gopher_max_words=120)
    assert set(kept) == {"good"}
    assert removed_by(report, "gopher_quality") == {
        "min_words": 1, "max_words": 1, "mean_word_length": 2, "hash_ratio": 1, "ellipsis_ratio": 1,
        "bullet_lines": 1, "ellipsis_lines": 1, "alpha_words": 1, "stop_words": 1}
    # Each threshold is a setting; null switches its rule off.
    f = GopherQualityFilter(CurateConfig(gopher_min_words=20, gopher_min_stop_words=None))
    assert f(docs["short"]).text is not None and f(docs["no_stop_words"]).text is not None
    assert f(docs["bullets"]).rule == "bullet_lines"


def test_gopher_repetition_rules(tmp_path):
    rng = random.Random(2)
    unique = lambda n: prose(rng, n * 10).splitlines()  # noqa: E731 - n unique lines of 10 words
    spam = "Subscribe now to get the best deals on our shop."
    long_line = prose(rng, 80, per_line=80)
    repeated_phrase = " ".join(rand_word(rng) for _ in range(10))
    filler = " ".join(rand_word(rng, 5, 8) for _ in range(20)) + " of the"  # >100 chars of unique words
    phrase_doc = "\n".join(f"{filler} {rand_word(rng)} {repeated_phrase} {rand_word(rng)} {prose(rng, 10)}"
                           if i < 3 else prose(rng, 10) for i in range(9))
    bigram_doc = "\n".join(" ".join([rand_word(rng), rand_word(rng), "alpha beta"]) + "." for _ in range(30))
    docs = {
        "good": "\n".join(unique(10)),
        "dup_lines": "\n".join(unique(6) + [spam] * 5),  # 4 of 11 lines repeat one: 0.36 > 0.3
        "dup_paragraphs": "\n\n".join(unique(6) + [spam] * 5),
        "dup_line_chars": "\n".join(unique(3)[:1] + [long_line] + unique(10) + [long_line]),
        "dup_para_chars": "\n\n".join(unique(3)[:1] + [long_line] + unique(10) + [long_line]),
        "top_bigram": bigram_doc,
        "dup_5grams": phrase_doc,
    }
    kept, report = run_filters(tmp_path, docs, filters=["gopher_repetition"])
    assert set(kept) == {"good"}
    assert removed_by(report, "gopher_repetition") == {
        "dup_line_frac": 1, "dup_para_frac": 1, "dup_line_char_frac": 1, "dup_para_char_frac": 1,
        "top_2gram": 1, "dup_5gram": 1}
    # Thresholds per n are settings too: without the 2-gram rule the bigram doc passes.
    f = GopherRepetitionFilter(CurateConfig(gopher_top_ngram_char_frac={3: 0.18, 4: 0.16}))
    assert f(bigram_doc).text is not None and f(phrase_doc).rule == "dup_5gram"


# ----------------------------------------------------------------------------- dedup


def test_exact_dedup():
    dedup = ExactDedup()
    assert dedup("Hello  World.\n", 0) is None
    assert dedup("hello world.", 1) == 0          # case and whitespace are normalised away
    assert dedup("Hello, World.", 2) is None      # punctuation is not
    assert dedup("HELLO WORLD.  ", 3) == 0


def _edit(rng, text, frac):
    words = text.split()
    for i in rng.sample(range(len(words)), int(round(frac * len(words)))):
        words[i] = rand_word(rng, 9, 12)
    return " ".join(words)


@pytest.mark.parametrize("edit, threshold", [(0.05, 0.5), (0.01, 0.8)])
def test_minhash_finds_planted_near_duplicates(tmp_path, edit, threshold):
    # With 5-word shingles, changing 5% of words leaves Jaccard ~0.63 and 1% ~0.9.
    rng = random.Random(3)
    vocab = [rand_word(rng) for _ in range(2000)]
    originals = [" ".join(rng.choice(vocab) for _ in range(200)) for _ in range(50)]
    copied = rng.sample(range(50), 20)
    docs = originals + [_edit(rng, originals[i], edit) for i in copied]
    mh = MinHashDedup(str(tmp_path / "sig"), threshold=threshold, shard_docs=16)  # several shards
    for d in docs:
        mh.add(d)
    assert len(os.listdir(tmp_path / "sig")) == 4  # 4 full shards; the last 6 are flushed by duplicates()
    dup = mh.duplicates()
    mh.close()
    assert (dup[:50] == -1).all()  # no original is removed: no false positives among unrelated docs
    found = [dup[50 + k] == copied[k] for k in range(20)]
    assert all(d in (-1, copied[k]) for k, d in enumerate(dup[50:]))  # a copy only matches its original
    assert np.mean(found) >= 0.9
    assert mh.stats["clusters"] == sum(found) and not os.listdir(tmp_path / "sig")


def test_minhash_char_shingles_and_banding(tmp_path):
    assert lsh_params(0.8, 128) == (16, 8)  # the documented default banding
    rng = random.Random(7)
    base = prose(rng, 150)
    typos = "".join(c.upper() if rng.random() < 0.01 else c for c in base)  # case is normalised away...
    edited = base.replace("e", "3", 2)                                       # ...two characters are not
    mh = MinHashDedup(str(tmp_path), shingle="char", ngram=5)
    for d in (base, prose(rng, 150), typos, edited):
        mh.add(d)
    assert mh.duplicates().tolist() == [-1, -1, 0, 0]


# ----------------------------------------------------------------------------- decontamination


def test_decontamination(tmp_path):
    rng = random.Random(4)
    passages = [" ".join(rand_word(rng) for _ in range(30)) for _ in range(3)]
    eval_a = write_jsonl(tmp_path / "eval_a.jsonl", passages[:2] + ["too short to matter"])
    eval_b = tmp_path / "eval_b.txt"
    eval_b.write_text(passages[2])
    words = passages[1].split()
    planted = prose(rng, 40) + " " + " ".join(w.upper() + "," for w in words[5:18]) + " " + prose(rng, 40)
    near_miss = prose(rng, 40) + " " + " ".join(words[5:17]) + " " + prose(rng, 40)  # 12 words only
    from_b = prose(rng, 20) + "\n" + passages[2] + "\n" + prose(rng, 20)
    unrelated = prose(rng, 200)
    dec = Decontaminator([eval_a, str(eval_b)], ngram=13)
    assert dec.stats == {"eval_docs": 4, "eval_docs_too_short": 1, "eval_ngrams": 3 * 18}
    hit = dec(planted)
    assert hit == {"ngram": " ".join(words[5:18]), "eval_file": eval_a, "matches": 1}
    assert dec(near_miss) is None and dec(unrelated) is None
    assert dec(from_b)["eval_file"] == str(eval_b) and dec(from_b)["matches"] == 18
    assert Decontaminator([eval_a, str(eval_b)], ngram=13, min_matches=2)(planted) is None
    assert Decontaminator([eval_a], ngram=8)(near_miss)["matches"] == 5  # smaller n catches more

    kept, report = run_filters(tmp_path, {"planted": planted, "near_miss": near_miss, "unrelated": unrelated},
                               filters=[], decontaminate=[eval_a, str(eval_b)], removed=str(tmp_path / "rm.jsonl"))
    assert set(kept) == {"near_miss", "unrelated"}
    assert report["stages"]["decontaminate"]["by_eval_file"] == {eval_a: 1}
    with open(tmp_path / "rm.jsonl") as f:
        logged = [json.loads(line) for line in f]
    assert [(r["id"], r["rule"], r["detail"]["eval_file"]) for r in logged] == [(0, "ngram_overlap", eval_a)]


# ----------------------------------------------------------------------------- quality model


def _quality_docs(rng, n, label):
    good, bad = [f"good{i}" for i in range(60)], [f"bad{i}" for i in range(60)]
    major, minor = (good, bad) if label else (bad, good)
    return [" ".join(rng.choice(major) if rng.random() < 0.65 else rng.choice(minor) for _ in range(60))
            for _ in range(n)]


def test_quality_classifier_and_selection(tmp_path):
    rng = random.Random(5)
    texts = _quality_docs(rng, 150, 1) + _quality_docs(rng, 150, 0)
    labels = [1] * 150 + [0] * 150
    model = quality.train(texts, labels, epochs=100)
    test = _quality_docs(rng, 50, 1) + _quality_docs(rng, 50, 0)
    y = np.array([1] * 50 + [0] * 50)
    logits = np.array([model.logit(t) for t in test])
    assert np.mean((logits >= 0) == y) > 0.9
    for name in ("m.json", "m.npz"):
        model.save(str(tmp_path / name))
        loaded = quality.QualityModel.load(str(tmp_path / name))
        assert np.allclose([loaded.logit(t) for t in test[:5]], logits[:5], atol=1e-5)

    keep = quality.select(logits, threshold=0.5)
    assert np.array_equal(keep, 1 / (1 + np.exp(-logits)) >= 0.5) and abs(keep.mean() - 0.5) <= 0.1
    high = quality.select(logits, threshold=0.99)
    assert high.sum() == np.sum(1 / (1 + np.exp(-logits)) >= 0.99) < keep.sum()
    sampled = quality.select(logits, tau=1.0, keep_fraction=0.3, seed=1)
    assert sampled.sum() == 30 and np.array_equal(sampled, quality.select(logits, tau=1.0, keep_fraction=0.3, seed=1))
    assert y[sampled].mean() > 0.8  # sampling favours high scores...
    top = quality.select(logits, tau=1e-6, keep_fraction=0.3)  # ...and tau -> 0 is top-k
    assert np.array_equal(np.flatnonzero(top), np.sort(np.argsort(-logits)[:30]))
    rates = np.mean([quality.select(logits, tau=1e6, keep_fraction=0.3, seed=s) for s in range(200)], axis=0)
    assert abs(rates[y == 1].mean() - rates[y == 0].mean()) < 0.05  # tau -> inf is uniform


# ----------------------------------------------------------------------------- CLI


def test_cli_end_to_end(tmp_path):
    rng = random.Random(6)
    docs = [prose(rng, 80) for _ in range(6)]
    eval_passage = " ".join(rand_word(rng) for _ in range(20))
    (tmp_path / "eval.txt").write_text(eval_passage)
    corpus = docs + [
        docs[0].upper(),                                        # exact duplicate (case)
        docs[1].replace(docs[1].split()[10], "changed", 1),     # near duplicate: one word differs
        prose(rng, 20),                                         # c4: too few sentences
        docs[2] + "\nLorem ipsum dolor sit amet is here.",      # c4: lorem ipsum
        "\n".join("- " + line for line in prose(rng, 80).splitlines()),  # gopher: bullets
        prose(rng, 40) + "\n" + eval_passage + ".\n" + prose(rng, 40),   # contaminated
    ]
    src = write_jsonl(tmp_path / "in.jsonl", corpus)
    # positives look like the corpus' prose, negatives are word salad without stop words
    write_jsonl(tmp_path / "pos.jsonl", [prose(rng, 80) for _ in range(40)])
    write_jsonl(tmp_path / "neg.jsonl", [" ".join(rand_word(rng, 2, 3).upper() for _ in range(80)) for _ in range(40)])
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    train = subprocess.run([sys.executable, "-m", "jaxllm.curate", "train-quality", "--positive",
                            str(tmp_path / "pos.jsonl"), "--negative", str(tmp_path / "neg.jsonl"),
                            "--out", str(tmp_path / "q.json"), "--epochs", "50"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert train.returncode == 0, train.stderr
    assert "held-out accuracy 1.000" in train.stderr
    (tmp_path / "cfg.yaml").write_text("c4_min_sentences: 5\nminhash_threshold: 0.7\n")
    proc = subprocess.run(
        [sys.executable, "-m", "jaxllm.curate", "--config", str(tmp_path / "cfg.yaml"), "--input", src,
         "--output", str(tmp_path / "out.jsonl"), "--filters", "c4,gopher", "--dedup", "exact,minhash",
         "--decontaminate", str(tmp_path / "eval.txt"), "--quality-model", str(tmp_path / "q.json"),
         "--quality-threshold", "0.5", "--report", str(tmp_path / "report.json")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "12 documents in, 6 out" in proc.stderr
    with open(tmp_path / "out.jsonl") as f:
        out = [json.loads(line) for line in f]
    assert [o["id"] for o in out] == list(range(6)) and [o["text"] for o in out] == docs
    assert all(o["source"] == src for o in out)
    with open(tmp_path / "report.json") as f:
        report = json.load(f)
    counts = {name: (s["seen"], s["removed"]) for name, s in report["stages"].items()}
    assert counts == {"c4": (12, 2), "gopher_quality": (10, 1), "gopher_repetition": (9, 0),
                      "decontaminate": (9, 1), "exact_dedup": (8, 1), "minhash_dedup": (7, 1), "quality": (6, 0)}
    assert report["totals"]["documents_in"] == 12 and report["totals"]["documents_out"] == 6
    assert report["stages"]["minhash_dedup"]["examples"]["near_duplicate"]["detail"] == {"duplicate_of": 1}
    assert report["stages"]["exact_dedup"]["examples"]["duplicate"]["detail"] == {"duplicate_of": 0}
    assert report["config"]["minhash_threshold"] == 0.7


def test_bad_config_key_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "cfg.yaml").write_text("gopher_min_words: 10\ngopher_min_wrods: 20\n")
    assert main(["--config", str(tmp_path / "cfg.yaml"), "--input", "x", "--output", "y"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown key 'gopher_min_wrods'" in err
    assert main(["--input", "x", "--output", "y", "--set", "c4_min_sentence=3"]) == 2
    assert "unknown key 'c4_min_sentence'" in capsys.readouterr().err
    assert main(["--input", "x", "--output", "y", "--set", "c4_min_sentences=many"]) == 2
    assert "c4_min_sentences: bad value 'many'" in capsys.readouterr().err
