"""Data mixtures and curricula: weights, determinism, stage switches, resume, exhaustion, config.

Documents are lists of integers ("tokenized" by `IntTokenizer`), unique across the corpus and
in a range per source (source k: 100000 * (k + 1) and up), so every (token, target) pair names
its document and every row names its source without trusting the pipeline's own bookkeeping.
"""

import collections
import dataclasses
import json
import os

import grain
import numpy as np
import pytest

from jaxllm.config import Config, ConfigError, DataConfig, TrainerConfig, build, dump_yaml, load_config, validate
from jaxllm.data import curriculum, mixture, pipeline
from jaxllm.data.curriculum import stage_plan
from jaxllm.data.documents import Tokenize, open_source
from jaxllm.data.packing import PackIterDataset, packing_stats
from jaxllm.data.pipeline import make_eval_batches, make_train_iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")
NAMES = ("web", "code", "math")


class IntTokenizer:
    """Text "12 13 14" -> [12, 13, 14]; BOS 1, EOS 2, padding 0."""

    bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 100_000

    def encode(self, text):
        return [int(t) for t in text.split()]


TOK = IntTokenizer()


def _write_source(folder, k, num_docs, rng):
    """num_docs documents of source k as jsonl; returns their token lists with BOS/EOS."""
    docs = []
    with open(folder / f"{NAMES[k] if k < len(NAMES) else k}.jsonl", "w") as f:
        for i in range(num_docs):
            n = int(rng.integers(3, 40))
            ids = [100000 * (k + 1) + 100 * i + j for j in range(n)]
            f.write(json.dumps({"text": " ".join(map(str, ids))}) + "\n")
            docs.append([TOK.bos_id] + ids + [TOK.eos_id])
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(0)
    docs = {}
    for k, (name, n) in enumerate(zip(NAMES, (400, 300, 100))):
        (root / name).mkdir()
        docs[name] = _write_source(root / name, k, n, rng)
    (root / "eval").mkdir()
    eval_docs = _write_source(root / "eval", 4, 6, rng)  # tokens 500000 and up
    return root, docs, eval_docs


@pytest.fixture(autouse=True)
def window(monkeypatch):
    # Row-shuffle windows of 1024 rows at seq_len 16. (grain's index_shuffle is slow for small
    # windows: about 60 / n ms per element of an n-element window.)
    monkeypatch.setattr(mixture, "ROW_SHUFFLE_TOKENS", 1024 * 16)


def _cfg(root, stages=(), sources=NAMES, batch_size=8, seq_len=16, seed=0, on_exhaust=None, **data):
    on_exhaust = on_exhaust or {}
    raw = {"data": {"sources": [{"name": n, "train": [str(root / n)], "on_exhaust": on_exhaust.get(n, "repeat"),
                                 **({"eval": [str(root / "eval")]} if n == "web" else {})} for n in sources],
                    "stages": list(stages), "seq_len": seq_len, "seed": seed, "tokenizer": "unused", **data},
           "trainer": {"batch_size": batch_size}}
    cfg = build(Config, raw)
    validate(cfg)
    return cfg


def _source_of_rows(batch):
    """Source index of every row, from its token values (not from the pipeline)."""
    top = np.maximum(batch["tokens"].max(axis=1), batch["targets"].max(axis=1))
    return top // 100000 - 1


def _pairs(batch, rows=None):
    mask = batch["loss_mask"] > 0
    out = []
    for r in range(batch["tokens"].shape[0]) if rows is None else rows:
        m = mask[r]
        out += list(zip(batch["tokens"][r][m].tolist(), batch["targets"][r][m].tolist()))
    return out


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y) == set(FIELDS)
        for k in FIELDS:
            np.testing.assert_array_equal(x[k], y[k])


# ----------------------------------------------------------------------------- mixing


def test_realised_fractions_follow_unnormalised_weights(corpus):
    root, docs, _ = corpus
    cfg = _cfg(root, stages=[{"weights": {"web": 5, "code": 3, "math": 2}}])  # sums to 10
    it = make_train_iterator(cfg, TOK, process_index=0, process_count=1)
    rows = collections.Counter()
    tokens = collections.Counter()
    for _ in range(1000):  # 8000 draws: 2% is more than 3.5 standard deviations
        batch = next(it)
        src = _source_of_rows(batch)
        rows.update(src.tolist())
        for r, s in enumerate(src):
            tokens[NAMES[s]] += int(batch["loss_mask"][r].sum())
    total = sum(rows.values())
    for k, want in enumerate((0.5, 0.3, 0.2)):
        assert abs(rows[k] / total - want) < 0.02
    stats = it.stats()
    for name in NAMES:  # the iterator's own accounting equals the rows' token values
        assert stats[f"tokens/{name}"] == tokens[name]
        assert stats[f"frac/{name}"] == pytest.approx(tokens[name] / sum(tokens.values()), abs=1e-12)
    # Epochs (documents read / documents) match the tokens taken over a pass's pairs, up to
    # the pass in progress; math (12 documents) was read more often than web (60).
    for name in NAMES:
        per_pass = sum(len(d) - 1 for d in docs[name])
        assert abs(stats[f"epoch/{name}"] - tokens[name] / per_pass) < 1
    assert stats["epoch/math"] > stats["epoch/web"] > 2
    assert stats["stage"] == 0
    assert packing_stats(it)["real_tokens"] >= sum(tokens.values())  # packers' counters are reachable


def test_same_seed_same_batches_other_seed_differs(corpus):
    root, _, _ = corpus
    stages = [{"weights": {"web": 1, "code": 1, "math": 1}}]
    a = _take(make_train_iterator(_cfg(root, stages), TOK, process_index=0, process_count=1), 20)
    b = _take(make_train_iterator(_cfg(root, stages), TOK, process_index=0, process_count=1), 20)
    _assert_same(a, b)
    c = _take(make_train_iterator(_cfg(root, stages, seed=1), TOK, process_index=0, process_count=1), 20)
    assert [_source_of_rows(x).tolist() for x in a] != [_source_of_rows(x).tolist() for x in c]


def test_every_process_draws_the_same_sources_from_disjoint_documents(corpus):
    root, _, _ = corpus
    cfg = _cfg(root, [{"weights": {"web": 2, "code": 1, "math": 1}}])
    halves = [_take(make_train_iterator(cfg, TOK, process_index=p, process_count=2), 30) for p in (0, 1)]
    pairs = []
    for h in halves:
        assert all(b["tokens"].shape == (4, 16) for b in h)
        pairs.append({p for b in h for p in _pairs(b)})
    for b0, b1 in zip(*halves):
        np.testing.assert_array_equal(_source_of_rows(b0), _source_of_rows(b1))
    assert not pairs[0] & pairs[1]


def _single_source_reference(data, batch_size, process_index, process_count):
    """The plain pipeline composed from grain stages: data.train's documents, this process's
    shard, shuffled by data.seed, repeated, tokenized, packed, rows shuffled in windows, batched."""
    source = open_source(data.train, text_field=data.text_field, strict=data.strict, eval_fraction=data.eval_fraction)
    docs = grain.MapDataset.source(source)[process_index::process_count].shuffle(seed=data.seed).repeat()
    ids = docs.map(Tokenize(TOK, data.add_bos, data.add_eos))
    rows = PackIterDataset(ids.to_iter_dataset(), data.seq_len, TOK.pad_id, method=data.packing,
                           split_policy=data.split_policy, buffer_docs=data.pack_buffer)
    window = max(batch_size, mixture.ROW_SHUFFLE_TOKENS // data.seq_len)
    rows = grain.experimental.WindowShuffleIterDataset(rows, window_size=window, seed=data.seed)
    return rows.batch(batch_size, drop_remainder=True).__iter__()


@pytest.mark.parametrize("packing, process_index", [("greedy", 0), ("best_fit", 1)])
def test_implicit_source_equals_the_single_source_pipeline(corpus, monkeypatch, packing, process_index):
    """No data.sources / data.stages: data.train through the plain pipeline, batch for batch."""
    monkeypatch.setattr(mixture, "ROW_SHUFFLE_TOKENS", 64 * 16)  # windows of 64 rows: several per run
    root, _, _ = corpus
    cfg = Config(data=DataConfig(train=(str(root / "web"), str(root / "code")), tokenizer="unused", seq_len=16,
                                 seed=5, packing=packing, pack_buffer=8), trainer=TrainerConfig(batch_size=8))
    it = make_train_iterator(cfg, TOK, process_index=process_index, process_count=2)
    want = _single_source_reference(cfg.data, 4, process_index, 2)
    _assert_same(_take(it, 40), _take(want, 40))
    assert it.names == ["train"] and it.stats()["frac/train"] == 1.0


# ----------------------------------------------------------------------------- stages


STAGES = [
    {"name": "warm", "weights": {"web": 1}},
    {"name": "code", "start_step": 5, "weights": {"code": 1}, "seq_len": 32, "batch_size": 4},
    # 5 * 8 * 16 + 3 * 4 * 32 = 1024 tokens: step 5 + 3 = 8
    {"name": "long", "start_tokens": 1024, "weights": {"web": 1, "math": 3}, "rope_theta": 40000.0},
]


def test_stage_switches_exactly_at_start_step_with_new_shapes(corpus):
    root, _, _ = corpus
    cfg = _cfg(root, STAGES)
    plan = stage_plan(cfg)
    assert [s.start_step for s in plan] == [0, 5, 8]
    assert [(s.seq_len, s.batch_size) for s in plan] == [(16, 8), (32, 4), (16, 8)]
    assert plan[2].weights == (0.25, 0.0, 0.75)
    assert [curriculum.stage_at(cfg, s)[0] for s in (0, 4, 5, 7, 8, 10**6)] == [0, 0, 1, 1, 2, 2]
    assert curriculum.model_overrides(plan[0]) == {} and curriculum.model_overrides(plan[2]) == {"rope_theta": 40000.0}
    it = make_train_iterator(cfg, TOK, process_index=0, process_count=1)
    for step in range(14):
        assert it.stage.index == curriculum.stage_at(cfg, step)[0]
        batch = next(it)
        src = set(_source_of_rows(batch).tolist())
        if step < 5:
            assert batch["tokens"].shape == (8, 16) and src == {0}
        elif step < 8:
            assert batch["tokens"].shape == (4, 32) and src == {1}
        else:
            assert batch["tokens"].shape == (8, 16) and src <= {0, 2}
        assert it.stats()["stage"] == curriculum.stage_at(cfg, step)[0]


def _reference_pairs(root, name, n_pairs):
    """The first n_pairs (token, target) pairs of one source's stream read alone, in order."""
    cfg = _cfg(root, sources=(name,), batch_size=1)  # one row per batch: no reordering
    it = make_train_iterator(cfg, TOK, process_index=0, process_count=1)
    out = []
    while len(out) < n_pairs:
        out += _pairs(next(it))
    return out[:n_pairs]


@pytest.mark.parametrize("packing", ["greedy", "best_fit"])
def test_sources_keep_their_position_across_stages(corpus, monkeypatch, packing):
    """web is used in stages 0 and 2 (and math in 2 only, code in 1 only): the pairs each source
    gave, over all stages and across a seq_len change, are exactly the start of its own stream
    (best_fit reorders documents within its buffer: there, no pair may come twice)."""
    root, _, _ = corpus
    # Up to the start of a fourth stage, every row drawn has been emitted.
    cfg = _cfg(root, [*STAGES, {"start_step": 20, "weights": {"code": 1}}], packing=packing, pack_buffer=8)
    it = make_train_iterator(cfg, TOK, process_index=0, process_count=1)
    got = collections.defaultdict(list)
    for _ in range(20):
        batch = next(it)
        for r, s in enumerate(_source_of_rows(batch)):
            got[NAMES[s]] += _pairs(batch, [r])
    assert set(got) == set(NAMES)
    if packing == "best_fit":  # less than one pass of every source: each pair at most once
        assert all(max(collections.Counter(pairs).values()) == 1 for pairs in got.values())
        return
    monkeypatch.setattr(mixture, "ROW_SHUFFLE_TOKENS", 1)  # the references: rows in stream order
    for name, pairs in got.items():
        assert collections.Counter(pairs) == collections.Counter(_reference_pairs(root, name, len(pairs))), name
    # The split document: the first web row of stage 2 continues the last web row of stage 0
    # exactly when stage 0 ended inside a document (no pair lost or repeated, checked above).


@pytest.mark.parametrize("cut, packing", [(3, "greedy"), (5, "greedy"), (7, "greedy"), (8, "greedy"),
                                          (11, "greedy"), (5, "best_fit"), (11, "best_fit")])
def test_resume_mid_stage_and_across_a_switch_equals_uninterrupted(corpus, cut, packing, monkeypatch):
    """Cuts: mid stage 0, at the switch to 1, mid 1, at the switch to 2, in 2."""
    # Windows of 128 rows at seq_len 16: stage 0's 40 rows and stage 1's 12 are windows cut
    # short by the stage's end, and stage 2's first window outlasts the test's 10 batches of it.
    monkeypatch.setattr(mixture, "ROW_SHUFFLE_TOKENS", 128 * 16)
    root, _, _ = corpus
    cfg = _cfg(root, STAGES, packing=packing, pack_buffer=8)
    want_it = make_train_iterator(cfg, TOK, process_index=0, process_count=1)
    want = _take(want_it, 18)
    it = make_train_iterator(cfg, TOK, process_index=0, process_count=1)
    _take(it, cut)
    state = json.loads(json.dumps(it.get_state()))
    stats = it.stats()
    again = make_train_iterator(cfg, TOK, process_index=0, process_count=1)
    again.set_state(state)
    assert again.stats() == stats
    _assert_same(_take(again, 18 - cut), want[cut:])
    assert again.stats() == want_it.stats()


def test_resume_refuses_other_settings_but_allows_new_future_stages(corpus):
    root, _, _ = corpus
    it = make_train_iterator(_cfg(root, STAGES), TOK, process_index=0, process_count=1)
    _take(it, 6)  # in stage 1
    state = json.loads(json.dumps(it.get_state()))
    later = [*STAGES[:2], {**STAGES[2], "weights": {"math": 1}, "rope_theta": 80000.0}]
    after = make_train_iterator(_cfg(root, later), TOK, process_index=0, process_count=1)
    after.set_state(state)  # stage 2 has not started: it may change
    want = _take(it, 2)  # the rest of stage 1 is the same
    _assert_same(_take(after, 2), want)
    for stages, message in [([STAGES[0], {**STAGES[1], "seq_len": 64}, STAGES[2]], "stages[1]: saved"),
                            ([*STAGES[:2], {**STAGES[2], "start_tokens": 2048}], "stages[2].start_step: saved 8"),
                            ([{**STAGES[0], "weights": {"web": 1, "math": 1}}, *STAGES[1:]], "stages[0]: saved")]:
        other = make_train_iterator(_cfg(root, stages), TOK, process_index=0, process_count=1)
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            other.set_state(state)
    other = make_train_iterator(_cfg(root, STAGES, seed=9), TOK, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="seed: saved 0, now 9"):
        other.set_state(state)


# ----------------------------------------------------------------------------- running out


def test_on_exhaust_stop_ends_the_mixture(corpus):
    root, docs, _ = corpus
    cfg = _cfg(root, [{"weights": {"web": 1, "math": 1}}], sources=("web", "math"), on_exhaust={"math": "stop"})
    it = make_train_iterator(cfg, TOK, process_index=0, process_count=1)
    batches = list(it)  # ends by itself
    math_pairs = collections.Counter(p for b in batches for r, s in enumerate(_source_of_rows(b)) if s == 2
                                     for p in _pairs(b, [r]))
    every = collections.Counter((d[j], d[j + 1]) for d in docs["math"] for j in range(len(d) - 1))
    assert max(math_pairs.values()) == 1 and not math_pairs - every  # each pair at most once
    # Only the rows of the dropped, incomplete last batch can be missing.
    assert sum(every.values()) - sum(math_pairs.values()) < 8 * 16
    stats = it.stats()
    assert stats["tokens/math"] == sum(math_pairs.values()) and stats["epoch/math"] == 1.0
    with pytest.raises(StopIteration):
        next(it)
    again = make_train_iterator(cfg, TOK, process_index=0, process_count=1)
    again.set_state(json.loads(json.dumps(it.get_state())))
    with pytest.raises(StopIteration):
        next(again)


def test_on_exhaust_repeat_counts_epochs(corpus, monkeypatch):
    monkeypatch.setattr(mixture, "ROW_SHUFFLE_TOKENS", 1)  # no rows held back in a window
    root, docs, _ = corpus
    cfg = _cfg(root, sources=("math",), batch_size=1, seq_len=64)
    it = make_train_iterator(cfg, TOK, process_index=0, process_count=1)
    seen = collections.Counter()
    for _ in range(80):
        seen.update(_pairs(next(it)))
    epochs = it.stats()["epoch/math"]
    every = {(d[j], d[j + 1]) for d in docs["math"] for j in range(len(d) - 1)}
    assert 2 < epochs < 4 and set(seen) == every
    # Docs read = epochs * 100; every pair was trained on once per pass it was reached in.
    assert epochs * 100 == pytest.approx(round(epochs * 100))
    assert set(seen.values()) <= {int(np.ceil(epochs)) - 1, int(np.ceil(epochs))}
    assert sum(seen.values()) == it.stats()["tokens/math"]


# ----------------------------------------------------------------------------- eval and config


def test_per_source_eval_batches(corpus):
    root, _, eval_docs = corpus
    cfg = _cfg(root, [{"weights": {"web": 1, "code": 1, "math": 1}}])
    assert pipeline.eval_source_names(cfg) == ["web"]
    batches = make_eval_batches(cfg, TOK, 100, process_index=0, process_count=1, source_name="web")
    got = collections.Counter(p for b in batches for p in _pairs(b))
    assert got == collections.Counter((d[j], d[j + 1]) for d in eval_docs for j in range(len(d) - 1))
    with pytest.raises(ValueError, match="no source 'code' with eval files.*some: web"):
        make_eval_batches(cfg, TOK, 1, process_index=0, process_count=1, source_name="code")


def _load(tmp_path, data, **sections):
    raw = {"data": data, **sections}
    (tmp_path / "c.yaml").write_text(json.dumps(raw))  # JSON is YAML
    return load_config(str(tmp_path / "c.yaml"))


TWO = [{"name": "web", "train": ["w"]}, {"name": "code", "train": ["c"]}]


@pytest.mark.parametrize("data, sections, message", [
    ({"sources": TWO, "stages": [{"weights": {"web": 1, "cod": 1}}]}, {},
     "data.stages[0].weights.cod: no such source; data.sources names: web, code"),
    ({"sources": TWO, "stages": [{"weights": {"web": -1.0}}]}, {},
     "data.stages[0]: weights.web must be a finite number >= 0, got -1.0"),
    ({"sources": TWO, "stages": [{"weights": {"web": 0}}]}, {}, "data.stages[0]: weights: at least one weight"),
    ({"sources": TWO, "stages": [{"weights": {"web": "lots"}}]}, {},
     "data.stages[0].weights.web: expected a number, got 'lots'"),
    ({"sources": TWO, "stages": [{"weights": [1, 2]}]}, {}, "data.stages[0].weights: expected a mapping"),
    ({"sources": TWO}, {}, "data.stages: required with more than one source"),
    ({"sources": TWO, "stages": [{"weights": {"web": 1}}, {"weights": {"code": 1}}]}, {},
     "data.stages[1]: set start_step or start_tokens"),
    ({"sources": TWO, "stages": [{"start_step": 3, "weights": {"web": 1}}]}, {},
     "data.stages[0]: the first stage starts at step 0"),
    ({"sources": TWO, "stages": [{"weights": {"web": 1}}, {"start_step": 10, "weights": {"code": 1}},
                                 {"start_step": 10, "weights": {"web": 1}}]}, {},
     "data.stages[2].start_step (10) must be after the start of data.stages[1] (step 10)"),
    ({"sources": TWO, "stages": [{"weights": {"web": 1}}, {"start_tokens": 0, "weights": {"code": 1}}]}, {},
     "data.stages[1].start_tokens (0) must be after the start of data.stages[0]"),
    ({"sources": TWO, "stages": [{"weights": {"web": 1}}, {"start_step": 5, "start_tokens": 9,
                                                           "weights": {"code": 1}}]}, {},
     "data.stages[1]: give start_step or start_tokens, not both"),
    ({"sources": [TWO[0], {"name": "web", "train": ["x"]}]}, {}, "data.sources[1].name: 'web' names two sources"),
    ({"sources": [{"name": "web"}]}, {}, "data.sources[0]: train: source 'web' lists no files"),
    ({"sources": [{"name": "a/b", "train": ["x"]}]}, {}, "data.sources[0]: name 'a/b' must be letters"),
    ({"sources": [{"name": "web", "train": ["x"], "on_exhaust": "loop"}]}, {},
     "data.sources[0].on_exhaust: 'loop' is not one of repeat, stop"),
    ({"sources": [{"name": "web", "train": ["x"], "wieght": 1}]}, {},
     "unknown key 'data.sources[0].wieght'"),
    ({"stages": [{"seq_len": 512}]}, {"model": {"max_seq_len": 256}},
     "data.stages[0].seq_len (512) exceeds model.max_seq_len (256)"),
    ({"stages": [{"batch_size": 6}]}, {"trainer": {"batch_size": 8, "grad_accum_steps": 4}},
     "data.stages[0].batch_size (6) must be divisible by trainer.grad_accum_steps (4)"),
    ({"stages": [{"seq_len": 0}]}, {}, "data.stages[0]: seq_len must be > 0, got 0"),
    ({"sources": [{"name": "web", "train": ["x"]}]}, {"task": "sft"},
     "data.sources / data.stages: mixtures are for task pretrain, not sft"),
])
def test_config_errors_name_the_key(tmp_path, data, sections, message):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, data, **sections)
    assert message in str(e.value)


def test_stage_config_is_hashable_and_round_trips(tmp_path):
    cfg = _load(tmp_path, {"sources": TWO, "stages": [{"weights": {"web": 3, "code": 1}},
                                                      {"start_tokens": 10**6, "weights": {"code": 1},
                                                       "rope_theta": 5e5}]})
    assert hash(cfg) == hash(dataclasses.replace(cfg))  # jit static arguments need hashable configs
    dump_yaml(cfg, str(tmp_path / "again.yaml"))
    assert load_config(str(tmp_path / "again.yaml")) == cfg
    with pytest.raises(TypeError, match="read-only"):
        cfg.data.stages[0].weights["web"] = 0.0
    # start_tokens at the default shapes (32 rows of 256): ceil(10**6 / 8192) = 123
    assert [s.start_step for s in stage_plan(cfg)] == [0, 123]
    assert stage_plan(cfg)[0].weights == (0.75, 0.25)


def test_recipes_resolve():
    tiny = load_config(os.path.join(ROOT, "configs", "recipes", "tiny-3stage.yaml"))
    plan = stage_plan(tiny)
    assert len(plan) == 3 and plan[-1].seq_len > plan[0].seq_len and plan[-1].rope_theta > tiny.model.rope_theta
    assert plan[-1].start_step < tiny.trainer.total_steps
    smol = load_config(os.path.join(ROOT, "configs", "recipes", "smollm2-135m-4stage.yaml"))
    plan = stage_plan(smol)
    tokens_per_step = smol.trainer.batch_size * smol.data.seq_len
    # The switch points are token counts: the step where that many tokens have been trained.
    for st, tokens in zip(plan[1:], [s.start_tokens for s in smol.data.stages[1:]]):
        assert (st.start_step - 1) * tokens_per_step < tokens <= st.start_step * tokens_per_step
    assert plan[-1].seq_len == 8192 and plan[-1].rope_theta > smol.model.rope_theta
    assert plan[-1].start_step < smol.trainer.total_steps
    assert all(abs(sum(s.weights) - 1) < 1e-12 for s in plan)
