"""Chat SFT data: templates, loss masks, truncation, packing, readers, HF tokenizer."""

import dataclasses
import json
import pickle
import random

import grain
import numpy as np
import pytest

from jaxllm.config import Config, build
from jaxllm.data import examples
from jaxllm.data.chat import ChatTemplate, TemplateError, load_template, tokenize_conversation
from jaxllm.data.files import SourceError
from jaxllm.data.hf_tokenizer import HFTokenizer
from jaxllm.data.records import RecordSource
from jaxllm.data.sft_packing import SFTPackIterDataset
from jaxllm.data.tokenizer import Tokenizer, train_sentencepiece

CONV = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Add 2 and 3."},
    {"role": "assistant", "content": "5"},
]
SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<|system|>", "<|user|>", "<|assistant|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
SENTENCES = ["You are terse.", "Hi there", "Hello! How can I help you today?", "Add 2 and 3.", "The answer is 5.",
             "system user assistant", "Write a short poem about the sea.", "def add(a, b): return a + b"] * 5
# The chatml template as a Hugging Face config would write it: multi-line, relying on
# trim_blocks / lstrip_blocks to drop the layout whitespace.
HF_CHATML = """{% for message in messages %}
    {% if message['role'] %}
{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}
    {%- endif %}
{% endfor %}
{% if add_generation_prompt %}
{{ '<|im_start|>assistant\n' }}
{%- endif %}
"""


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tokenizers import Tokenizer as RawTok, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("hf")
    tok = RawTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}, "pad_token": "<pad>",
        "chat_template": HF_CHATML}))
    return d


@pytest.fixture(scope="module")
def hf(hf_dir):
    return HFTokenizer(str(hf_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    return Tokenizer(train_sentencepiece(SENTENCES, 300, str(tmp_path_factory.mktemp("sp") / "tiny")))


def _write_conversations(path, conversations):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return str(path)


def _sft_cfg(train, seq_len, template="chatml", *, strict=False, **sft):
    return build(Config, {"data": {"train": [str(train)], "seq_len": seq_len, "add_bos": False, "strict": strict},
                          "sft": {"template": template, **sft}})


def _sft_rows(cfg, tok, source=None):
    """(rows, skip counts) of the trainer's SFT chain over data.train (or `source`) in index order
    (unshuffled): records -> examples.Examples -> examples.CountSkips -> SFTPackIterDataset."""
    source = examples.open_split(cfg, "sft", "train") if source is None else source
    make = examples.Examples(cfg, tok, source, "sft")
    records = grain.MapDataset.source(examples.IndexedSource(source)).map(make)
    counted = examples.CountSkips(records.to_iter_dataset(), 2 * len(source))
    return list(SFTPackIterDataset(counted, cfg.data.seq_len, tok.pad_id, pack=cfg.sft.packing)), counted.counts


def _segments(rows):
    return sum(int(r["segment_ids"].max()) for r in rows)


def _runs(ids, mask):
    """Contiguous runs of masked token ids."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(int(i))
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


# ----------------------------------------------------------------------------- templates


def test_builtin_templates_render_exactly():
    r = lambda name, msgs, gen=False: load_template(name).render(msgs, bos_token="<s>", eos_token="</s>",
                                                                 add_generation_prompt=gen)
    assert r("chatml", CONV) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nAdd 2 and 3.<|im_end|>\n"
        "<|im_start|>assistant\n5<|im_end|>\n")
    assert r("chatml", CONV[:2], True).endswith("Hi there<|im_end|>\n<|im_start|>assistant\n")
    assert r("tulu", CONV) == (
        "<|system|>\nYou are terse.\n<|user|>\nHi there\n<|assistant|>\nHello!</s>\n"
        "<|user|>\nAdd 2 and 3.\n<|assistant|>\n5</s>")
    assert r("tulu", CONV[:4], True).endswith("<|user|>\nAdd 2 and 3.\n<|assistant|>\n")
    assert r("llama3", CONV) == (
        "<s><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAdd 2 and 3.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n5<|eot_id|>")


def test_template_from_tokenizer_config(hf_dir, hf):
    builtin = load_template("chatml")
    for t in (load_template(str(hf_dir / "tokenizer_config.json")), load_template(str(hf_dir)),
              load_template(None, hf)):
        for gen in (False, True):
            assert t.render(CONV, add_generation_prompt=gen) == builtin.render(CONV, add_generation_prompt=gen)
    with pytest.raises(TemplateError, match="not a built-in"):
        load_template("nonesuch")
    with pytest.raises(TemplateError, match="bad Jinja"):
        ChatTemplate("{% for %}")
    # The sandbox: no access to Python internals.
    with pytest.raises(Exception):
        ChatTemplate("{{ messages.__class__.__mro__ }}").render(CONV)


def test_prefix_inconsistent_template_raises(hf):
    bad = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}<|im_end|>{% endif %}{% endfor %}"
    with pytest.raises(TemplateError, match="prefix-consistent"):
        tokenize_conversation(CONV, hf, bad, max_len=1000)


# ----------------------------------------------------------------------------- loss masks


@pytest.mark.parametrize("name,end", [("chatml", "<|im_end|>"), ("tulu", "</s>"), ("llama3", "<|eot_id|>")])
def test_mask_covers_exactly_assistant_replies_hf(hf, name, end):
    ids, mask = tokenize_conversation(CONV, hf, name, max_len=1000)
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and len(ids) == len(mask)
    rendered = load_template(name).render(CONV, bos_token="<s>", eos_token="</s>")
    assert hf.decode(ids) == rendered  # the pieces concatenate to the whole conversation
    assert [hf.decode(r) for r in _runs(ids, mask)] == ["Hello!" + end, "5" + end]
    if name == "llama3":
        assert ids[0] == hf.bos_id


def test_template_ignoring_generation_prompt(hf):
    # Without add_generation_prompt support the reply is located in the render; header excluded.
    t = "{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] }}</s>{% endfor %}"
    ids, mask = tokenize_conversation(CONV, hf, t, max_len=1000)
    assert [hf.decode(r) for r in _runs(ids, mask)] == ["Hello!</s>", "5</s>"]


def test_mask_sentencepiece(sp):
    ids, mask = tokenize_conversation(CONV, sp, "chatml", max_len=1000)
    assert sp.decode(ids) == load_template("chatml").render(CONV)
    assert [sp.decode(r) for r in _runs(ids, mask)] == ["Hello!<|im_end|>", "5<|im_end|>"]
    # tulu's eos_token text maps to the EOS id (SentencePiece never matches "</s>" in text).
    ids, mask = tokenize_conversation(CONV, sp, "tulu", max_len=1000, add_bos=True)
    assert ids[0] == sp.bos_id and mask[0] == 0
    runs = _runs(ids, mask)
    assert [r[-1] for r in runs] == [sp.eos_id, sp.eos_id]
    assert [sp.decode(r[:-1]) for r in runs] == ["Hello!", "5"]
    assert (ids == sp.eos_id).sum() == 2


def test_truncation(hf):
    ids, mask = tokenize_conversation(CONV, hf, "chatml", max_len=1000)
    n = len(ids)
    cut = tokenize_conversation(CONV, hf, "chatml", max_len=n - 3)
    assert len(cut[0]) == n - 3 and (cut[0] == ids[:n - 3]).all() and (cut[1] == mask[:n - 3]).all()
    assert tokenize_conversation(CONV, hf, "chatml", max_len=n, truncation="drop") is not None
    assert tokenize_conversation(CONV, hf, "chatml", max_len=n - 1, truncation="drop") is None
    first = int(np.argmax(mask))  # a cut before the first reply token leaves nothing to train on
    assert tokenize_conversation(CONV, hf, "chatml", max_len=first) is None
    with pytest.raises(ValueError, match="truncation"):
        tokenize_conversation(CONV, hf, "chatml", max_len=10, truncation="middle")


BAD = [
    [],
    [{"role": "user"}, {"role": "assistant", "content": "x"}],
    [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}],
    [{"role": "user", "content": "hi"}],
]


def test_malformed_skipped_and_counted_or_strict(hf, tmp_path):
    path = _write_conversations(tmp_path / "c.jsonl", [CONV, *BAD, CONV[:3]])
    rows, skipped = _sft_rows(_sft_cfg(path, 128), hf)
    assert _segments(rows) == 2  # the two good conversations
    assert dict(skipped) == {"empty conversation": 1, "message lacks role or content": 1,
                             "unknown role": 1, "no assistant turn": 1}
    with pytest.raises(SourceError, match="c.jsonl:2: empty conversation"):
        _sft_rows(_sft_cfg(path, 128, strict=True), hf)
    short = len(tokenize_conversation(CONV[:3], hf, "chatml", max_len=1000)[0])
    path = _write_conversations(tmp_path / "d.jsonl", [CONV, CONV[:3]])
    rows, skipped = _sft_rows(_sft_cfg(path, short - 1, truncation="drop"), hf)
    assert _segments(rows) == 1 and dict(skipped) == {"too long": 1}


# ----------------------------------------------------------------------------- packing


def _check_packing(rows, examples, seq_len, pad_id):
    """Every example lies whole, in order, in one row; packing is greedy."""
    found = []
    for row in rows:
        for k in ("tokens", "targets", "positions", "segment_ids"):
            assert row[k].dtype == np.int32 and row[k].shape == (seq_len,)
        assert row["loss_mask"].dtype == np.float32
        seg = row["segment_ids"]
        nseg = int(seg.max())
        used = int((seg > 0).sum())
        assert (seg[:used] > 0).all() and (seg[used:] == 0).all()  # padding only at the end
        assert (row["tokens"][used:] == pad_id).all() and (row["loss_mask"][used:] == 0).all()
        for s in range(1, nseg + 1):
            at = np.flatnonzero(seg == s)
            assert (at == np.arange(at[0], at[0] + len(at))).all()
            assert (row["positions"][at] == np.arange(len(at))).all()
            ids = np.append(row["tokens"][at], row["targets"][at[-1]])
            assert (row["targets"][at[:-1]] == row["tokens"][at[1:]]).all()
            found.append((ids, row["loss_mask"][at], used))
    assert len(found) == len(examples)
    for (ids, lm, _), (ref_ids, ref_mask) in zip(found, examples):
        assert (ids == ref_ids).all()
        assert (lm == ref_mask[1:]).all()  # loss on the target token's mask
    # Greedy: a row was closed only because the next example did not fit.
    for row, nxt in zip(rows, rows[1:]):
        first = np.flatnonzero(nxt["segment_ids"] == 1)
        assert int((row["segment_ids"] > 0).sum()) + len(first) > seq_len


def _pack(segments, seq_len, pad=0):
    """SFTPackIterDataset over records of one (ids, mask, no ul_mask) segment each."""
    records = [[(ids, mask, np.zeros_like(mask))] for ids, mask in segments]
    return list(SFTPackIterDataset(grain.MapDataset.source(records).to_iter_dataset(), seq_len, pad))


def test_pack_segments_whole_and_masks():
    rng = random.Random(0)
    seq_len, pad = 16, 3
    segments = []
    for _ in range(40):
        n = rng.randint(2, seq_len + 1)
        segments.append((np.array([rng.randrange(5, 100) for _ in range(n)], np.int32),
                         np.array([rng.randint(0, 1) for _ in range(n)], np.int32)))
    rows = _pack(segments, seq_len, pad)
    _check_packing(rows, segments, seq_len, pad)
    assert all(not r["ul_mask"].any() for r in rows)
    with pytest.raises(ValueError, match="does not fit"):
        _pack([(np.zeros(seq_len + 2, np.int32), np.zeros(seq_len + 2, np.int32))], seq_len)


def test_sft_rows_match_per_conversation_reference(hf, tmp_path):
    rng = random.Random(1)
    convs = []
    for _ in range(12):
        msgs = []
        for _ in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": rng.choice(SENTENCES)})
            msgs.append({"role": "assistant", "content": " ".join(rng.sample(SENTENCES, rng.randint(1, 3)))})
        convs.append(msgs)
    seq_len = 96
    rows, skipped = _sft_rows(_sft_cfg(_write_conversations(tmp_path / "c.jsonl", convs), seq_len, "tulu"), hf)
    assert not skipped
    ref = [tokenize_conversation(c, hf, "tulu", max_len=seq_len + 1) for c in convs]
    assert any(len(r[0]) == seq_len + 1 for r in ref)  # some were truncated to fit a row
    _check_packing(rows, ref, seq_len, hf.pad_id)
    assert len(rows) > 1


# ----------------------------------------------------------------------------- readers


def test_read_jsonl_and_parquet(tmp_path, hf):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = [CONV, CONV[:3], [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]
    lines = [json.dumps({"messages": good[0]}), "{not json", json.dumps({"other": 1}),
             json.dumps({"messages": "text"}), "", json.dumps({"messages": good[1], "id": 7}),
             json.dumps({"messages": good[2]})]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    conversations = lambda spec, field="messages", **kw: RecordSource(str(spec), {field: (list,)}, **kw)
    src = conversations(tmp_path / "a.jsonl")
    assert len(src) == 3 and [r["messages"] for r in src] == good
    assert dict(src.skipped) == {"malformed JSON": 1, "missing field 'messages'": 1,
                                 "field 'messages' is not a list": 1}
    assert src.where(1) == f"{tmp_path / 'a.jsonl'}:6"
    with pytest.raises(SourceError, match=r"a.jsonl:2: malformed JSON"):
        conversations(tmp_path / "a.jsonl", strict=True)

    msg_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    table = pa.table({"messages": pa.array(good + [None, BAD[3]], type=msg_type)})
    pq.write_table(table, tmp_path / "b.parquet", row_group_size=2)
    psrc = conversations(tmp_path / "b.parquet")
    assert [r["messages"] for r in psrc] == good + [BAD[3]] and dict(psrc.skipped) == {"missing field 'messages'": 1}
    assert psrc.where(3) == f"{tmp_path / 'b.parquet'}: row group 2, row 0"
    psrc = pickle.loads(pickle.dumps(psrc))
    assert psrc[2]["messages"] == good[2]
    with pytest.raises(SourceError, match="no column 'chat'"):
        conversations(tmp_path / "b.parquet", "chat")

    # A folder spec reads both; record-level problems name the record in strict mode.
    both = conversations(tmp_path)
    assert len(both) == 7
    with pytest.raises(SourceError, match=r"b.parquet: row group 2, row 0: no assistant turn"):
        _sft_rows(_sft_cfg(tmp_path, 128, strict=True), hf, both)
    rows, skipped = _sft_rows(_sft_cfg(tmp_path, 128), hf)
    assert _segments(rows) == 6 and dict(skipped) == {"no assistant turn": 1}


# ----------------------------------------------------------------------------- HF tokenizer


def test_hf_tokenizer(hf_dir, hf):
    text = "Hello! How are you?\n  def f(x): return x  # ünïcode ✓"
    ids = hf.encode(text)
    assert hf.decode(ids) == text
    assert hf.bos_id == hf.token_to_id("<s>") >= 0 and hf.eos_id == hf.token_to_id("</s>") >= 0
    assert hf.pad_id == hf.token_to_id("<pad>") and len({hf.bos_id, hf.eos_id, hf.pad_id}) == 3
    assert hf.encode("<|im_start|>user")[0] == hf.token_to_id("<|im_start|>")
    assert hf.encode("Hi")[0] != hf.bos_id  # no special tokens added
    assert hf.vocab_size >= len(SPECIALS) and all(0 <= i < hf.vocab_size for i in ids)
    again = pickle.loads(pickle.dumps(hf))
    assert again.encode(text) == ids and again.eos_id == hf.eos_id
    # Without a config: no bos/eos unless given, pad falls back to eos then 0.
    bare_dir = hf_dir.parent / "bare"
    bare_dir.mkdir(exist_ok=True)
    (bare_dir / "tokenizer.json").write_text((hf_dir / "tokenizer.json").read_text())
    bare = HFTokenizer(str(bare_dir))
    assert (bare.bos_id, bare.eos_id, bare.pad_id, bare.chat_template) == (-1, -1, 0, None)
    assert HFTokenizer(str(bare_dir), eos_token="</s>").pad_id == hf.eos_id
    with pytest.raises(ValueError, match="not in the vocabulary"):
        HFTokenizer(str(bare_dir), bos_token="<nope>")
    with pytest.raises(FileNotFoundError):
        HFTokenizer(str(hf_dir / "missing.json"))


def test_load_tokenizer_takes_a_hf_tokenizer_json_for_pretraining(hf_dir, hf, tmp_path):
    """`data.tokenizer` may name a tokenizer.json (or its folder); the pretraining pipeline uses it."""
    from jaxllm.config import Config, build
    from jaxllm.data.pipeline import make_train_iterator
    from jaxllm.data.tokenizer import load_tokenizer

    doc = "Hello! How are you? I am fine, thank you very much.\n" * 4
    (tmp_path / "doc.txt").write_text(doc)
    cfg = build(Config, {"data": {"train": [str(tmp_path / "doc.txt")], "tokenizer": str(hf_dir),
                                  "seq_len": 16},
                         "trainer": {"batch_size": 2}})
    tok = load_tokenizer(cfg.data, vocab_size=hf.vocab_size)
    assert type(tok).__name__ == "HFTokenizer" and tok.encode(doc) == hf.encode(doc)
    as_file = dataclasses.replace(cfg.data, tokenizer=str(hf_dir / "tokenizer.json"))
    assert load_tokenizer(as_file, vocab_size=hf.vocab_size).encode("Hi") == hf.encode("Hi")
    batch = next(make_train_iterator(cfg, tok, process_index=0, process_count=1))
    want = [hf.bos_id] + hf.encode(doc) + [hf.eos_id]
    pairs = set(zip(want[:-1], want[1:]))
    got = zip(batch["tokens"][batch["loss_mask"] > 0].tolist(), batch["targets"][batch["loss_mask"] > 0].tolist())
    assert all(p in pairs for p in got)
    with pytest.raises(ValueError, match="model.vocab_size"):
        load_tokenizer(cfg.data, vocab_size=hf.vocab_size - 1)
