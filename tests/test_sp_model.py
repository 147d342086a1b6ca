"""SentencePiece .model files: conversion to tokenizer.json (same ids and text as SentencePiece
itself) and the piece variants chat encoding uses."""

import io
import os
import sysconfig

import pytest
import sentencepiece as spm

pytest.importorskip("tokenizers")
from tokenizers import Tokenizer as HFTok  # noqa: E402

from jaxllm.data import sp_model  # noqa: E402
from jaxllm.data.tokenizer import Tokenizer, train_sentencepiece  # noqa: E402

STDLIB = sysconfig.get_paths()["stdlib"]
TRAIN = [open(os.path.join(STDLIB, n), encoding="utf-8").read()
         for n in ("textwrap.py", "bisect.py", "colorsys.py")]
EDGE = ["  Hello,   world!  ", "ünïcode ✓ 日本語 😀\tTabs\n\nNewlines  ", "x" * 50, "    def f(x):\n        return x",
        "ＡＢＣ ﬁ ① (NFKC)", "", " ", "<s> and </s> as text"]


def _default_model(model_type: str) -> bytes:
    """SentencePiece's own defaults (nmt_nfkc, dummy prefix, whitespace removal), as Llama 2's."""
    buf = io.BytesIO()
    lines = [line for text in TRAIN for line in text.split("\n") if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=500,
                                   model_type=model_type, byte_fallback=True, minloglevel=2)
    return buf.getvalue()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp")
    out = {}
    for kind in ("bpe", "unigram"):
        with open(train_sentencepiece(TRAIN, 600, str(d / kind), model_type=kind), "rb") as f:
            out[f"jaxllm-{kind}"] = f.read()
        out[f"default-{kind}"] = _default_model(kind)
    return out


@pytest.mark.parametrize("name", ["jaxllm-bpe", "jaxllm-unigram", "default-bpe", "default-unigram"])
def test_converted_tokenizer_encodes_as_sentencepiece(models, name):
    proto = models[name]
    sp = spm.SentencePieceProcessor(model_proto=proto)
    hf = HFTok.from_str(sp_model.to_tokenizer_json(proto))
    held_out = [open(os.path.join(STDLIB, n), encoding="utf-8").read() for n in ("fnmatch.py", "keyword.py")]
    texts = held_out + EDGE[:-1] + [line for t in held_out for line in t.split("\n")]
    ties = 0
    for text in texts:
        ids, got = sp.encode(text), hf.encode(text, add_special_tokens=False).ids
        assert hf.decode(got) == sp.decode(ids) == hf.decode(ids)
        if got != ids:  # Unigram only: another segmentation of the same score (float order picks one)
            assert name.endswith("unigram"), text[:60]
            assert sum(map(sp.get_score, got)) == pytest.approx(sum(map(sp.get_score, ids)), abs=1e-4)
            ties += 1
    assert ties <= 2
    # Special pieces' text maps to their ids (SentencePiece itself reads it as characters).
    specials = sp_model.special_pieces(proto)
    assert specials == {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"} | (
        {"pad_token": "<pad>"} if name.startswith("jaxllm") else {})
    assert hf.encode(EDGE[-1], add_special_tokens=False).ids[0] == sp.bos_id()
    with_bos = HFTok.from_str(sp_model.to_tokenizer_json(proto, bos_on_encode=True))
    assert with_bos.encode("def f").ids == [sp.bos_id()] + sp.encode("def f")


def test_piece_models(models):
    # jaxllm's own models have neither setting: their chat encoding is plain `encode`, as before.
    assert sp_model.piece_models(models["jaxllm-bpe"]) == (None, None)
    tok = Tokenizer(model_proto=models["default-bpe"])
    start, rest = (spm.SentencePieceProcessor(model_proto=p) for p in sp_model.piece_models(models["default-bpe"]))
    assert tok.encode_piece("Hello  world ", start=True) == start.encode("Hello  world ")
    assert tok.decode(tok.encode_piece("Hello  world ", start=True)) == "Hello  world "  # nothing dropped
    assert tok.id_to_piece(tok.encode_piece("Hello", start=True)[0]).startswith("▁")  # the dummy prefix
    assert tok.encode_piece("Hello") == rest.encode("Hello")
    assert not tok.id_to_piece(rest.encode("Hello")[0]).startswith("▁")
    assert tok.encode("  Hello  ") == tok.encode("Hello")  # SentencePiece itself strips and collapses


def test_unsupported_models_are_refused():
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a b c d e f"] * 20), model_writer=buf, vocab_size=12,
                                   model_type="char", minloglevel=2)
    with pytest.raises(sp_model.ConversionError, match="model type 4"):
        sp_model.to_tokenizer_json(buf.getvalue())
