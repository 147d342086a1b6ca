"""Post-training data (jaxllm.data.posttrain / examples / preference_data): sft rows, pairs, kto examples."""

import json

import numpy as np
import pytest

from jaxllm.config import Config, build
from jaxllm.data import chat, examples, posttrain
from jaxllm.data.files import SourceError
from jaxllm.data.records import RecordSource
from jaxllm.data.tokenizer import Tokenizer, train_sentencepiece

END = "<|im_end|>"
WORDS = ["apple", "river", "stone", "cloud", "seven", "green", "tiger", "piano", "eleven", "house", "lemon", "quiet"]
SENTENCES = (["<|im_start|>system\nBe brief.<|im_end|>", "<|im_start|>user\nWhat is 12 + 30?<|im_end|>",
              "<|im_start|>assistant\nThe answer is 42.<|im_end|>", "Reverse the word apple.",
              "Tell me about the river and the stone.", "The sky is blue and the grass is green."]
             + [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]) * 4


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    return Tokenizer(train_sentencepiece(SENTENCES, 512, str(tmp_path_factory.mktemp("sp") / "tiny")))


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def _cfg(train, eval_=None, *, seq_len=48, batch=2, **sections):
    raw = {"data": {"train": [train], "eval": [eval_ or train], "seq_len": seq_len, **sections.pop("data", {})},
           "trainer": {"batch_size": batch}, **sections}
    return build(Config, raw)


def _user(t):
    return {"role": "user", "content": t}


def _asst(t):
    return {"role": "assistant", "content": t}


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _render(messages, gen=False):
    return chat.load_template("chatml").render(messages, add_generation_prompt=gen)


def _seq(row, prefix=""):
    """The real token ids of an unpacked row: tokens plus the last target."""
    n = int((row[prefix + "segment_ids"] > 0).sum())
    return np.append(row[prefix + "tokens"][:n], row[prefix + "targets"][n - 1]) if n else np.zeros(0, np.int32)


def _has_pending(state):
    if isinstance(state, dict):
        return state.get("pending") is True or any(_has_pending(v) for v in state.values())
    return False


# ----------------------------------------------------------------------------- sft


def _sft_records(n=10):
    recs = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        msgs = [_user(f"Reverse the word {w}."), _asst(w[::-1] + f" {i}")]
        if i % 3 == 0:  # multi-turn with a system prompt
            msgs = [{"role": "system", "content": "Be brief."}, _user("What is 12 + 30?"), _asst(f"The answer is {i}."),
                    *msgs]
        recs.append({"messages": msgs, "negative": f"{w} is {i} wrong"})
    return recs


def test_sft_masks_and_negative_segments(tmp_path, sp):
    recs = _sft_records()
    cfg = _cfg(_write(tmp_path / "sft.jsonl", recs), seq_len=96, sft={"unlikelihood_weight": 0.5})
    by_text = {}
    for r in recs:
        by_text[_render(r["messages"])] = ("pos", r)
        ctx = r["messages"][:-1]
        by_text[_render(ctx + [_asst(r["negative"])])] = ("neg", r)
    seen = set()
    it = posttrain.train_iterator(cfg, sp, "sft", process_index=0, process_count=1)
    for batch in _take(it, 12):
        assert set(batch) == {"tokens", "targets", "positions", "segment_ids", "loss_mask", "ul_mask"}
        for b in range(batch["tokens"].shape[0]):
            seg = batch["segment_ids"][b]
            assert (batch["loss_mask"][b][seg == 0] == 0).all() and (batch["ul_mask"][b][seg == 0] == 0).all()
            for s in range(1, seg.max() + 1):
                at = np.flatnonzero(seg == s)
                assert (batch["positions"][b][at] == np.arange(len(at))).all()
                ids = np.append(batch["tokens"][b][at], batch["targets"][b][at[-1]])
                assert ids[0] == sp.bos_id
                kind, r = by_text[sp.decode(ids)]
                lm, ul, tg = batch["loss_mask"][b][at], batch["ul_mask"][b][at], batch["targets"][b][at]
                # Exactly the tokens chat.sft_segments makes for the record.
                ref = chat.sft_segments(r["messages"], sp, "chatml", max_len=97, add_bos=True, negative=r["negative"])
                ref_ids, ref_lm, ref_ul = ref[0] if kind == "pos" else ref[1]
                assert (ids == ref_ids).all() and (lm == ref_lm[1:]).all() and (ul == ref_ul[1:]).all()
                if kind == "pos":
                    assert not ul.any()
                    runs = [m["content"] + END for m in r["messages"] if m["role"] == "assistant"]
                    got = [sp.decode(tg[a:b_ + 1]) for a, b_ in _runs(lm)]
                    assert got == runs
                else:
                    assert not lm.any()
                    assert sp.decode(tg[ul > 0]) == r["negative"] + END
                    assert len(_runs(ul)) == 1
                seen.add((kind, id(r)))
    assert len(seen) == 2 * len(recs)


def test_sft_without_packing_one_conversation_per_row(tmp_path, sp):
    """sft.packing false: the same conversations in the same order, one per row, padded."""
    path = _write(tmp_path / "sft.jsonl", _sft_records(10))

    def conversations(packing, batches):
        cfg = _cfg(path, seq_len=96, sft={"packing": packing})
        out, per_row = [], []
        for batch in _take(posttrain.train_iterator(cfg, sp, "sft", process_index=0, process_count=1), batches):
            for b in range(len(batch["tokens"])):
                seg = batch["segment_ids"][b]
                per_row.append(int(seg.max()))
                out += [batch["tokens"][b][seg == s].tolist() for s in range(1, seg.max() + 1)]
        return out, per_row

    packed, packed_rows = conversations(True, 5)
    single, single_rows = conversations(False, 5)  # 10 rows: epoch 0
    assert max(packed_rows) > 1 and single_rows == [1] * 10
    assert single == packed[:10]
    cfg = _cfg(path, seq_len=96, sft={"packing": False})
    assert posttrain.batches_per_epoch(cfg, sp, "sft", process_count=1) == {"batches": 5, "rows": 10, "skipped": 0}


def _runs(mask):
    out, start = [], None
    for k, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = k
        elif not m and start is not None:
            out.append((start, k - 1))
            start = None
    return out


def test_sft_negatives_off_without_unlikelihood(tmp_path, sp):
    cfg = _cfg(_write(tmp_path / "sft.jsonl", _sft_records(4)), seq_len=128)
    batches = _take(posttrain.train_iterator(cfg, sp, "sft", process_index=0, process_count=1), 4)
    assert all(not b["ul_mask"].any() for b in batches)
    assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches) >= 4


def test_sft_resume_mid_stream_equals_uninterrupted(tmp_path, sp):
    cfg = _cfg(_write(tmp_path / "sft.jsonl", _sft_records(9)), seq_len=40, batch=2,
               sft={"unlikelihood_weight": 1.0})
    ref = _take(posttrain.train_iterator(cfg, sp, "sft", process_index=0, process_count=1), 14)
    pending = []
    for cut in (1, 3, 4, 7):
        it = posttrain.train_iterator(cfg, sp, "sft", process_index=0, process_count=1)
        _take(it, cut)
        state = json.loads(json.dumps(it.get_state()))
        assert state["settings"]["format"] == "sft" and "task" not in state["settings"]
        pending.append(_has_pending(state))
        again = posttrain.train_iterator(cfg, sp, "sft", process_index=0, process_count=1)
        again.set_state(state)
        _assert_batches_equal(_take(again, 14 - cut), ref[cut:])
    assert any(pending)  # some cut fell between a record's two segments
    other = posttrain.train_iterator(_cfg(cfg.data.train[0], seq_len=40, batch=2, data={"seed": 1},
                                          sft={"unlikelihood_weight": 1.0}), sp, "sft",
                                     process_index=0, process_count=1)
    with pytest.raises(ValueError, match="seed: saved 0, now 1"):
        other.set_state(state)


def test_sft_truncation_and_skips(tmp_path, sp):
    long = " ".join(WORDS * 3)
    recs = [{"messages": [_user("Hi"), _asst(long)]}, {"messages": [_user("Hi"), _asst("ok")]},
            {"messages": [_user("Hi"), {"role": "robot", "content": "x"}]},
            {"messages": [_user(long + long), _asst("late")]}]
    path = _write(tmp_path / "sft.jsonl", recs)
    full = chat.encode_conversation(recs[0]["messages"], sp, "chatml", add_bos=True)[0]
    assert len(full) > 33
    it = posttrain.train_iterator(_cfg(path, seq_len=32, batch=1), sp, "sft", process_index=0, process_count=1)
    rows = _take(it, 4)
    cut = [r for r in rows if r["segment_ids"][0].max() == 1 and (r["segment_ids"][0] > 0).all()]
    assert cut and all((np.append(r["tokens"][0], r["targets"][0][-1]) == full[:33]).all() for r in cut)
    assert it.skipped["unknown role"] >= 1 and it.skipped["no assistant token after truncation"] >= 1
    it = posttrain.train_iterator(_cfg(path, seq_len=32, batch=1, sft={"truncation": "drop"}), sp, "sft",
                                  process_index=0, process_count=1)
    rows = _take(it, 3)
    assert all(r["segment_ids"].max() == 1 and (r["segment_ids"] > 0).sum() < 32 for r in rows)
    assert it.skipped["too long"] >= 2 and set(it.skipped) == {"too long", "unknown role"}
    # Nothing usable at all: an error, not an endless loop.
    it = posttrain.train_iterator(_cfg(_write(tmp_path / "bad.jsonl", [recs[3]]), seq_len=32, batch=1), sp,
                                  "sft", process_index=0, process_count=1)
    with pytest.raises(SourceError, match="could not be used"):
        next(it)


def test_sft_eval_batches_fixed_and_sliced(tmp_path, sp):
    path = _write(tmp_path / "sft.jsonl", _sft_records(10))
    cfg = _cfg(path, seq_len=64, batch=4)
    whole = posttrain.eval_batches(cfg, sp, "sft", 2, process_index=0, process_count=1)
    assert len(whole) == 2
    _assert_batches_equal(whole, posttrain.eval_batches(cfg, sp, "sft", 2, process_index=0, process_count=1))
    halves = [posttrain.eval_batches(cfg, sp, "sft", 2, process_index=p, process_count=2) for p in (0, 1)]
    for k, b in enumerate(whole):
        for f in b:
            np.testing.assert_array_equal(np.concatenate([halves[0][k][f], halves[1][k][f]]), b[f])


# ----------------------------------------------------------------------------- pairs


def _pair_records(n=12):
    recs = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        q = f"Reverse the word {w} ({i})."
        kind = i % 3
        if kind == 0:  # UltraFeedback: prompt string, chosen / rejected lists
            recs.append({"prompt": q, "chosen": [_user(q), _asst(w[::-1])], "rejected": [_user(q), _asst(w)],
                         "score": float(i)})
        elif kind == 1:  # prompt taken from the chosen list (multi-turn, with a system turn)
            ctx = [{"role": "system", "content": "Be brief."}, _user("What is 12 + 30?"), _asst("42"), _user(q)]
            recs.append({"chosen": ctx + [_asst(w[::-1])], "rejected": ctx + [_asst(w + "s")], "score": i})
        else:  # plain reply strings
            recs.append({"prompt": q, "chosen": w[::-1], "rejected": "no", "score": -i})
    return recs


def _pair_parts(r):
    if "prompt" in r:
        prompt = [_user(r["prompt"])]
    else:
        prompt = r["chosen"][:-1]
    reply = lambda v: v if isinstance(v, str) else v[-1]["content"]
    return prompt, reply(r["chosen"]), reply(r["rejected"])


def test_pair_rows_masks_and_token_boundaries(tmp_path, sp):
    recs = _pair_records()
    cfg = _cfg(_write(tmp_path / "pairs.jsonl", recs), seq_len=128, batch=4,
               preference={"margin_field": "score"})
    run = posttrain.split_pass(cfg, sp, "pairs", "train", process_index=0, process_count=1)
    batches = list(run)
    assert len(batches) == 3 and not run.skipped
    assert sorted(np.concatenate([b["index"] for b in batches]).tolist()) == list(range(len(recs)))
    for batch in batches:
        for b, i in enumerate(batch["index"]):
            prompt, chosen, rejected = _pair_parts(recs[i])
            assert batch["margin"][b] == np.float32(recs[i]["score"]) and batch["pair_mask"][b] == 1
            prompt_ids = None
            for side, reply in (("chosen_", chosen), ("rejected_", rejected)):
                ids = _seq({k: v[b] for k, v in batch.items() if k != "index"}, side)
                mask = batch[side + "loss_mask"][b]
                n = len(ids) - 1
                assert (batch[side + "positions"][b][:n] == np.arange(n)).all()
                assert (batch[side + "segment_ids"][b][n:] == 0).all() and (mask[n:] == 0).all()
                first = int(np.argmax(mask))  # first target that is a completion token
                assert mask[first:n].all() and not mask[:first].any()
                assert sp.decode(batch[side + "targets"][b][first:n]) == reply + END
                assert sp.decode(ids[:first + 1]) == _render(prompt, gen=True) and ids[0] == sp.bos_id
                prompt_ids = ids[:first + 1] if prompt_ids is None else prompt_ids
                assert (ids[:first + 1] == prompt_ids).all()  # one prompt for both
                # Token boundaries as in SFT: the same ids as the SFT tokenization, up to the turn end.
                sft_ids, sft_mask = chat.tokenize_conversation(prompt + [{"role": "assistant", "content": reply}], sp,
                                                               "chatml", max_len=1000, add_bos=True)
                last = np.flatnonzero(sft_mask)[-1]
                assert (ids == sft_ids[:last + 1]).all()


def test_pair_truncation_and_skip_counts(tmp_path, sp):
    long_prompt = "Tell me about " + " ".join(WORDS * 2) + "."
    long_reply = " ".join(WORDS * 2)
    recs = [
        {"prompt": long_prompt, "chosen": "yes", "rejected": "no"},  # 0: prompt too long (unless cut)
        {"prompt": "Hi", "chosen": long_reply, "rejected": "no"},  # 1: completion cut at the end
        {"prompt": "Hi", "chosen": [_user("Hi")], "rejected": "no"},  # 2: chosen ends with the user
        {"prompt": [_user("Hi"), {"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"},  # 3
        {"chosen": [_user("A"), _asst("x")], "rejected": [_user("B"), _asst("y")]},  # 4: prompts differ
        {"chosen": "a", "rejected": "b"},  # 5: no prompt at all
        {"prompt": "Hi", "chosen": "ok", "rejected": "fine"},  # 6: fine
    ]
    path = _write(tmp_path / "pairs.jsonl", recs)
    seq_len = 40
    enc = lambda prompt, reply: chat.encode_conversation([_user(prompt), _asst(reply)], sp, "chatml", add_bos=True)

    run = posttrain.split_pass(_cfg(path, seq_len=seq_len, batch=8), sp, "pairs", "train",
                               process_index=0, process_count=1)
    (batch,) = list(run)
    assert dict(run.skipped) == {"prompt leaves no room for a completion": 1,
                                 "chosen does not end with an assistant turn": 1, "unknown role": 1,
                                 "chosen and rejected have different prompts": 1, "missing field 'prompt'": 1}
    assert batch["index"].tolist() == [-1, 1, -1, -1, -1, -1, 6, -1]
    assert batch["pair_mask"].tolist() == [0, 1, 0, 0, 0, 0, 1, 0]
    pad = batch["index"] < 0
    assert not batch["chosen_loss_mask"][pad].any() and not batch["rejected_segment_ids"][pad].any()
    # Record 1: the pair fills seq_len + 1 tokens exactly; the completion keeps its start.
    ids, turns = enc("Hi", long_reply)
    assert len(ids) > seq_len + 1
    chosen = _seq({k: v[1] for k, v in batch.items()}, "chosen_")
    assert len(chosen) == seq_len + 1 and (chosen == ids[:seq_len + 1]).all()
    assert batch["chosen_loss_mask"][1].sum() == seq_len + 1 - np.argmax(turns)

    # max_prompt_len keeps the prompt's end (and its BOS): record 0 is kept.
    run = posttrain.split_pass(_cfg(path, seq_len=seq_len, batch=8, preference={"max_prompt_len": 12}),
                               sp, "pairs", "train", process_index=0, process_count=1)
    (batch,) = list(run)
    assert batch["index"][0] == 0 and "prompt leaves no room for a completion" not in run.skipped
    ids, turns = enc(long_prompt, "yes")
    prompt = ids[:np.argmax(turns)]
    got = _seq({k: v[0] for k, v in batch.items()}, "chosen_")
    want = np.concatenate([prompt[:1], prompt[-11:], ids[turns > 0]])
    assert (got == want).all() and got[0] == sp.bos_id


def test_pairs_resume_and_reference_join(tmp_path, sp):
    recs = _pair_records(10)
    path = _write(tmp_path / "pairs.jsonl", recs)
    cfg = _cfg(path, seq_len=128, batch=2)
    n = posttrain.split_size(cfg, "pairs", "train")
    assert n == 10
    reference = {"train": {"ref_chosen_logps": -np.arange(n, dtype=np.float32),
                           "ref_rejected_logps": -10 - np.arange(n, dtype=np.float32)},
                 "eval": {"ref_chosen_logps": np.ones(n), "ref_rejected_logps": np.zeros(n)}}
    make = lambda: posttrain.train_iterator(cfg, sp, "pairs", process_index=0, process_count=1, reference=reference)
    ref = _take(make(), 13)  # more than an epoch
    for b in ref:
        assert (b["ref_chosen_logps"] == -b["index"]).all() and (b["ref_rejected_logps"] == -10 - b["index"]).all()
    epoch = np.concatenate([b["index"] for b in ref[:5]])
    assert sorted(epoch.tolist()) == list(range(10))
    assert np.concatenate([b["index"] for b in ref[5:10]]).tolist() != epoch.tolist()  # reshuffled
    for cut in (2, 7):
        it = make()
        _take(it, cut)
        state = json.loads(json.dumps(it.get_state()))
        again = make()
        again.set_state(state)
        _assert_batches_equal(_take(again, 13 - cut), ref[cut:])
    ev = posttrain.eval_batches(cfg, sp, "pairs", 2, process_index=0, process_count=1, reference=reference)
    assert [b["index"].tolist() for b in ev] == [[0, 3], [6, 9]]  # evenly spaced over the split
    assert all((b["ref_chosen_logps"] == 1).all() for b in ev)
    with pytest.raises(ValueError, match="shape"):
        posttrain.train_iterator(cfg, sp, "pairs", process_index=0, process_count=1,
                                 reference={"train": {"ref_chosen_logps": np.zeros(3),
                                                      "ref_rejected_logps": np.zeros(3)}})
    with pytest.raises(ValueError, match="exactly"):
        posttrain.train_iterator(cfg, sp, "pairs", process_index=0, process_count=1,
                                 reference={"train": {"ref_chosen_logps": np.zeros(n)}})
    with pytest.raises(ValueError, match="for formats pairs and kto, not 'sft'"):
        posttrain.JoinReference("sft", reference, "train", n)
    with pytest.raises(ValueError, match="data format 'dpo' is not one of sft, pairs, kto"):
        posttrain.train_iterator(cfg, sp, "dpo", process_index=0, process_count=1)


def test_process_slices_disjoint_and_cover_the_split(tmp_path, sp):
    path = _write(tmp_path / "pairs.jsonl", _pair_records(12))
    cfg = _cfg(path, seq_len=128, batch=4)
    seen = []
    for p in (0, 1):
        it = posttrain.train_iterator(cfg, sp, "pairs", process_index=p, process_count=2)
        idx = np.concatenate([b["index"] for b in _take(it, 3)]).tolist()  # one epoch of this slice
        assert sorted(idx) == list(range(p, 12, 2))
        seen.append(set(idx))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(12))


def test_split_pass_covers_every_index_once(tmp_path, sp):
    path = _write(tmp_path / "pairs.jsonl", _pair_records(7))
    cfg = _cfg(path, seq_len=128, batch=4)
    runs = [posttrain.split_pass(cfg, sp, "pairs", "train", process_index=p, process_count=2) for p in (0, 1)]
    assert [len(r) for r in runs] == [2, 2]
    parts = [list(r) for r in runs]
    whole = list(posttrain.split_pass(cfg, sp, "pairs", "train", process_index=0, process_count=1))
    order = []
    for k in range(2):
        glued = {f: np.concatenate([parts[0][k][f], parts[1][k][f]]) for f in whole[k]}
        for f in whole[k]:
            np.testing.assert_array_equal(glued[f], whole[k][f])
        order += glued["index"].tolist()
    assert order == [0, 1, 2, 3, 4, 5, 6, -1]
    last = whole[1]
    assert last["pair_mask"].tolist() == [1, 1, 1, 0]
    for side in ("chosen_", "rejected_"):
        assert not last[side + "loss_mask"][3].any() and not last[side + "segment_ids"][3].any()
    # The rows are the training iterator's rows for the same index.
    train = _take(posttrain.train_iterator(cfg, sp, "pairs", process_index=0, process_count=1), 2)
    by_index = {int(i): (k, r) for k, b in enumerate(whole) for r, i in enumerate(b["index"]) if i >= 0}
    for batch in train:
        for b, i in enumerate(batch["index"]):
            k, row = by_index[int(i)]
            for f in batch:
                np.testing.assert_array_equal(batch[f][b], whole[k][f][row], err_msg=f)


def test_parquet_pairs_match_jsonl(tmp_path, sp):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [r for r in _pair_records(6) if not isinstance(r["chosen"], str)]
    for r in recs:
        r.setdefault("prompt", None)
    jsonl = _write(tmp_path / "p.jsonl", recs)
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "p.parquet", row_group_size=2)
    rows = lambda path: list(posttrain.split_pass(_cfg(path, seq_len=128, batch=2), sp, "pairs", "train",
                                                  process_index=0, process_count=1))
    _assert_batches_equal(rows(jsonl), rows(str(tmp_path / "p.parquet")))


def test_compressed_jsonl_records_match_plain(tmp_path, sp, monkeypatch):
    """Chat / preference data as .jsonl.gz and .jsonl.zst: the same batches as the plain file,
    messages naming the compressed file and line, a truncated file's tail counted."""
    import gzip
    import re

    import zstandard

    monkeypatch.setenv("JAXLLM_DATA_CACHE", str(tmp_path / "cache"))
    recs = _pair_records(12)
    data = "".join(json.dumps(r) + "\n" for r in recs[:5]) + "{broken\n" + "".join(json.dumps(r) + "\n" for r in recs[5:])
    data = data.encode()
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_bytes(data)
    (tmp_path / "p.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "p.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    rows = lambda path: list(posttrain.split_pass(_cfg(str(path), seq_len=128, batch=4), sp, "pairs", "train",
                                                  process_index=0, process_count=1))
    want = rows(jsonl)
    for name in ("p.jsonl.gz", "p.jsonl.zst"):
        _assert_batches_equal(rows(tmp_path / name), want)
        source = RecordSource(str(tmp_path / name), {"chosen": (str, list)})
        assert len(source) == 12 and dict(source.skipped) == {"malformed JSON": 1}
        assert source.where(5) == f"{tmp_path / name}:7"
        with pytest.raises(SourceError, match=re.escape(f"{tmp_path / name}:6: malformed JSON")):
            RecordSource(str(tmp_path / name), {"chosen": (str, list)}, strict=True)
    # A cut-off download: the whole lines before the cut are records, the cut is counted.
    big = "".join(json.dumps(recs[i % 12]) + "\n" for i in range(3000)).encode()
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(big)[: len(gzip.compress(big)) // 2])
    source = RecordSource(str(tmp_path / "cut.jsonl.gz"), {"chosen": (str, list)})
    assert 0 < len(source) < 3000 and dict(source.skipped) == {"truncated file": 1}
    assert [source[i]["chosen"] for i in range(len(source))] == [recs[i % 12]["chosen"] for i in range(len(source))]


def test_malformed_lines_counted_or_strict(tmp_path, sp):
    lines = [{"prompt": "Hi", "chosen": "a", "rejected": "b"}, "{not json", {"prompt": "Hi", "rejected": "b"},
             {"prompt": "Hi", "chosen": 3, "rejected": "b"}, "",
             {"prompt": [_user("Hi"), {"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"},
             {"prompt": "Yo", "chosen": "c", "rejected": "d"}]
    path = _write(tmp_path / "pairs.jsonl", lines)
    cfg = _cfg(path, seq_len=128, batch=4)
    run = posttrain.split_pass(cfg, sp, "pairs", "train", process_index=0, process_count=1)
    assert len(run.source) == 3 and posttrain.split_size(cfg, "pairs", "train") == 3
    assert dict(run.source_skipped) == {"malformed JSON": 1, "missing field 'chosen'": 1,
                                        "field 'chosen' is not a string or a list": 1}
    (batch,) = list(run)
    assert batch["index"].tolist() == [0, -1, 2, -1] and dict(run.skipped) == {"unknown role": 1}
    strict = _cfg(path, seq_len=128, batch=4, data={"strict": True})
    with pytest.raises(SourceError, match=r"pairs.jsonl:2: malformed JSON"):
        posttrain.split_pass(strict, sp, "pairs", "train", process_index=0, process_count=1)
    ok = _write(tmp_path / "ok.jsonl", [lines[0], lines[5]])
    strict = _cfg(ok, seq_len=128, batch=2, data={"strict": True})
    with pytest.raises(SourceError, match=r"ok.jsonl:2: unknown role"):
        list(posttrain.split_pass(strict, sp, "pairs", "train", process_index=0, process_count=1))
    sft = _write(tmp_path / "sft.jsonl", [{"messages": [_user("Hi"), _asst("a")]}, {"messages": [_user("Hi")]}])
    it = posttrain.train_iterator(_cfg(sft, seq_len=128, batch=1, data={"strict": True}), sp, "sft",
                                  process_index=0, process_count=1)
    with pytest.raises(SourceError, match=r"sft.jsonl:2: no assistant turn"):
        _take(it, 3)


# ----------------------------------------------------------------------------- kto


def test_kto_rows_and_kl_partner(tmp_path, sp):
    recs = [{"prompt": f"Reverse the word {w}.", "completion": w[::-1] if i % 2 else w, "label": bool(i % 2)}
            for i, w in enumerate(WORDS[:5])]
    recs[3]["completion"] = [_user(recs[3]["prompt"]), _asst(recs[3]["completion"])]  # a messages list works too
    reply = lambda r: r["completion"] if isinstance(r["completion"], str) else r["completion"][-1]["content"]
    cfg = _cfg(_write(tmp_path / "kto.jsonl", recs), seq_len=48, batch=4)
    n = len(recs)
    whole = list(posttrain.split_pass(cfg, sp, "kto", "train", process_index=0, process_count=1))
    rows = {int(i): (b, k) for b in whole for k, i in enumerate(b["index"]) if i >= 0}
    assert sorted(rows) == list(range(n))
    for i, (b, k) in rows.items():
        row = {f: v[k] for f, v in b.items()}
        assert row["label"] == float(recs[i]["label"]) and row["pair_mask"] == 1
        for prefix, completion in (("", reply(recs[i])), ("kl_", reply(recs[(i + 1) % n]))):
            ids, mask = _seq(row, prefix), row[prefix + "loss_mask"]
            first = int(np.argmax(mask))
            assert sp.decode(ids[:first + 1]) == _render([_user(recs[i]["prompt"])], gen=True)
            assert sp.decode(row[prefix + "targets"][first:len(ids) - 1]) == completion + END
            assert mask[first:len(ids) - 1].all() and mask.sum() == len(ids) - 1 - first
    # Training batches carry the same, data-level KL rows, and the cached reference by index.
    reference = {"train": {"ref_logps": np.arange(n) * 1.0, "ref_kl_logps": np.arange(n) * 2.0}}
    it = posttrain.train_iterator(cfg, sp, "kto", process_index=0, process_count=1, reference=reference)
    for batch in _take(it, 3):
        assert (batch["ref_kl_logps"] == 2 * batch["index"]).all()
        for k, i in enumerate(batch["index"]):
            b, kk = rows[int(i)]
            for f in b:
                np.testing.assert_array_equal(batch[f][k], b[f][kk], err_msg=f)


# ----------------------------------------------------------------------------- epochs


def test_batches_per_epoch_pairs_is_one_pass_of_usable_examples(tmp_path, sp):
    recs = _pair_records(15)
    recs[4] = {"prompt": "seven " * 200, "chosen": "yes", "rejected": "no"}  # no room for a reply: skipped
    path = _write(tmp_path / "pairs.jsonl", recs[:7] + ["{not json"] + recs[7:])  # malformed: skipped
    cfg = _cfg(path, seq_len=128, batch=4)
    size = posttrain.batches_per_epoch(cfg, sp, "pairs", process_count=1)
    assert size == {"batches": 3, "rows": 14, "skipped": 2}
    # The training stream's first 3 batches are 12 distinct examples of epoch 0; the 4th holds
    # the 2 left of epoch 0, then epoch 1 starts.
    it = posttrain.train_iterator(cfg, sp, "pairs", process_index=0, process_count=1)
    idx = [b["index"].tolist() for b in _take(it, 4)]
    first = sum(idx[:3], [])
    assert len(set(first)) == 12 and 4 not in first
    assert len(set(first) | set(idx[3][:2])) == 14
    # Two processes: slices of 8 and 7 records (the long one in the first), batches of 2 each.
    assert posttrain.batches_per_epoch(cfg, sp, "pairs", process_count=2)["batches"] == 3


def _greedy_rows(lengths, seq_len):
    """Rows a greedy whole-segment packer fills with segments of these token counts, in order."""
    rows, filled = 0, seq_len
    for n in lengths:
        if filled + n - 1 > seq_len:
            rows, filled = rows + 1, 0
        filled += n - 1
    return rows


def test_batches_per_epoch_sft_counts_packed_rows(tmp_path, sp):
    import grain

    recs = _sft_records(11)
    path = _write(tmp_path / "sft.jsonl", recs)
    cfg = _cfg(path, seq_len=160, batch=2)
    size = posttrain.batches_per_epoch(cfg, sp, "sft", process_count=1)
    # Independently: the greedy row count of epoch 0's segments, in epoch 0's order.
    source = examples.open_split(cfg, "sft", "train")
    make = examples.Examples(cfg, sp, source, "sft")
    order = list(grain.MapDataset.range(len(source)).shuffle(seed=cfg.data.seed))
    lengths = [len(ids) for i in order for ids, *_ in make((i, source[i]))]
    rows = _greedy_rows(lengths, 160)
    assert size == {"batches": rows // 2, "rows": rows, "skipped": 0}
    assert rows < len(recs)  # packing put several conversations in a row
