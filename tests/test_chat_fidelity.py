"""Chat encoding against transformers' `apply_chat_template` on tokenizers trained here: every
tokenizer.json kind (byte-level, Metaspace with each prepend scheme, BPE and Unigram, legacy
Prepend/Replace normalizers), real templates, `{% generation %}` masks, template files."""

import difflib
import json
import warnings

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

from jaxllm.data.chat import (ConversationError, TemplateError, encode_conversation, load_template,  # noqa: E402
                              render_segments)
from jaxllm.data.hf_tokenizer import HFTokenizer, prefix_at_start_only  # noqa: E402

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<|system|>", "<|user|>",
            "<|assistant|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CORPUS = ["You are terse.\nHi there, how are you?", "Hello! How can I help you today?\n\nAdd 2 and 3.",
          "The answer is 5.", "system user assistant", "Write a short poem about the sea.",
          "def add(a, b):\n    return a + b", "ünïcode ✓ 日本語 — café", "[INST] Hi [/INST] Hello",
          "  indented\n\tline", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."] * 4
KINDS = ["bytelevel", "metaspace-first-bpe", "metaspace-always-bpe", "metaspace-never-bpe",
         "metaspace-first-unigram", "metaspace-always-unigram", "legacy-prepend"]

# transformers' Llama 3 template and Qwen2.5's (its tool branches left out), as their hubs ship them.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
          "{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN25 = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
           "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
           "{{ message['content'] + eos_token }}{% endif %}{% endfor %}")
# TRL's training chatml: the trained text is marked with generation blocks.
CHATML_GEN = ("{% for message in messages %}{% if message['role'] == 'assistant' %}"
              "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
              "{% endgeneration %}{{ '\n' }}{% else %}"
              "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
              "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEMPLATES = {"chatml": load_template("chatml").source, "tulu": load_template("tulu").source,
             "llama3": LLAMA3, "qwen2.5": QWEN25, "mistral": MISTRAL}

CONVS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Add 2 and 3."},
     {"role": "assistant", "content": "The answer is 5."}, {"role": "user", "content": "ünïcode ✓ 日本語?"},
     {"role": "assistant", "content": "café — ✓"}],
    [{"role": "user", "content": "Write a poem"}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "indent"}, {"role": "assistant", "content": "  def add(a, b):\n    return a + b"}],
]


def _train(kind: str) -> Tokenizer:
    if kind == "bytelevel":  # SmolLM2 / Qwen / Llama 3 style
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIALS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "legacy-prepend":  # Llama 2 / Mistral conversions by older transformers
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS)
    else:
        _, scheme, model = kind.split("-")
        if model == "bpe":
            tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
            trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS)
        else:
            tok = Tokenizer(models.Unigram())
            trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=SPECIALS, unk_token="<unk>")
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=scheme)
        tok.decoder = decoders.Metaspace(prepend_scheme=scheme)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _folder(path, tokenizer_json: str, template: str):
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(tokenizer_json)
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "chat_template": template}))
    return path


def _auto(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoTokenizer.from_pretrained(str(path))


def _hf_ids(tok, conv, **kw):
    return list(tok.apply_chat_template(conv, tokenize=True, return_dict=True, **kw)["input_ids"])


@pytest.fixture(scope="module")
def trained():
    return {kind: _train(kind) for kind in KINDS}


def _check_boundary_only(ours, ref, ref_tok, render, boundaries):
    """`ours` equals `ref` except in runs whose text in `ref` straddles a piece boundary."""
    offsets = ref_tok(render, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, ours, ref, autojunk=False).get_opcodes():
        if op == "equal":
            continue
        assert j2 > j1 and i2 > i1, (op, ours[i1:i2], ref[j1:j2])
        start, end = offsets[j1][0], offsets[j2 - 1][1]
        assert any(start < b < end for b in boundaries), (render[start:end], boundaries)


@pytest.mark.parametrize("kind", KINDS)
def test_chat_ids_match_transformers(kind, trained, tmp_path):
    """The render equals transformers'; the ids decode to it and equal transformers' tokenization
    of it (prefix at the start only) except at piece boundaries."""
    tok = trained[kind]
    first_json = prefix_at_start_only(tok.to_str())
    exact = total = 0
    for name, source in TEMPLATES.items():
        if name == "mistral" and kind == "bytelevel":
            continue
        ours_tok = HFTokenizer(str(_folder(tmp_path / name, tok.to_str(), source)))
        theirs = _auto(tmp_path / name)
        ref_tok = _auto(_folder(tmp_path / f"{name}-first", first_json, source))
        template = load_template(None, ours_tok)
        for conv in CONVS:
            if name == "mistral" and not conv[-1]["content"]:
                with pytest.raises(ConversationError, match="empty reply"):
                    encode_conversation(conv, ours_tok, template)
                continue
            ids, _ = encode_conversation(conv, ours_tok, template)
            render = theirs.apply_chat_template(conv, tokenize=False)
            assert template.render(conv, bos_token="<s>", eos_token="</s>") == render
            assert ours_tok.decode(ids) == render  # never a character the render does not have
            ref = _hf_ids(ref_tok, conv)
            segments = render_segments(conv, template, bos_token="<s>", eos_token="</s>")
            _check_boundary_only(list(ids), ref, ref_tok, render, np.cumsum([len(t) for t, _ in segments]))
            exact += list(ids) == ref
            total += 1
            if kind in ("metaspace-always-bpe", "legacy-prepend"):
                # transformers' own ids for these tokenizers put a "▁" after every special token.
                assert theirs.decode(_hf_ids(theirs, conv)) != render
    # Whole-text merges across a boundary are the only differences: none for byte-level BPE or Unigram.
    assert exact == total if kind == "bytelevel" or kind.endswith("unigram") else exact >= total // 2


def test_generation_blocks_give_trls_assistant_mask(trained, tmp_path):
    conv = CONVS[1] + [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    for kind in ("bytelevel", "metaspace-first-unigram"):
        folder = _folder(tmp_path / kind, trained[kind].to_str(), CHATML_GEN)
        ours_tok, theirs = HFTokenizer(str(folder)), _auto(folder)
        template = load_template(str(folder))
        assert template.has_generation and not load_template("chatml").has_generation
        ids, turns = encode_conversation(conv, ours_tok, template)
        out = theirs.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert list(ids) == list(out["input_ids"])
        assert ((turns > 0).astype(int) == np.asarray(out["assistant_masks"])).all()
        runs = [ours_tok.decode(ids[turns == k]) for k in (1, 2, 3)]
        assert runs == ["The answer is 5.<|im_end|>", "café — ✓<|im_end|>", "Hello!<|im_end|>"]
    # Blocks may cover less than the reply: only their text is trained on.
    partial = CHATML_GEN.replace("{{ message['content'] + '<|im_end|>' }}", "{{ message['content'] }}{{ '' }}")
    partial = partial.replace("{% endgeneration %}", "{% endgeneration %}{{ '<|im_end|>' }}")
    ids, turns = encode_conversation(CONVS[0], ours_tok, partial)
    assert ours_tok.decode(ids[turns > 0]) == "Hello!"


def test_generation_block_errors(trained, tmp_path):
    tok = HFTokenizer(str(_folder(tmp_path / "t", trained["bytelevel"].to_str(), CHATML_GEN)))
    outside = CHATML_GEN.replace("{{ '<|im_start|>' + message['role']",
                                 "{% generation %}x{% endgeneration %}{{ '<|im_start|>' + message['role']")
    with pytest.raises(TemplateError, match="outside an assistant message"):
        encode_conversation(CONVS[0], tok, outside)
    nested = "{% generation %}{% generation %}a{% endgeneration %}{% endgeneration %}"
    with pytest.raises(TemplateError, match="nested"):
        load_template(nested).render_spans([])
    with pytest.raises(ConversationError, match="reserved character"):
        encode_conversation([CONVS[0][0], {"role": "assistant", "content": "a\ufdd0"}], tok, CHATML_GEN)


def test_template_from_chat_template_jinja_and_named_lists(trained, tmp_path):
    """What transformers' save_pretrained writes today (chat_template.jinja) is read, and wins
    over tokenizer_config.json, as in transformers; named lists use their `default`."""
    src = _folder(tmp_path / "src", trained["bytelevel"].to_str(), TEMPLATES["tulu"])
    saved = tmp_path / "saved"
    tok = _auto(src)
    tok.chat_template = QWEN25
    tok.save_pretrained(str(saved))
    assert (saved / "chat_template.jinja").exists()
    assert "chat_template" not in json.loads((saved / "tokenizer_config.json").read_text())
    for t in (load_template(str(saved)), load_template(None, HFTokenizer(str(saved))),
              load_template(str(saved / "chat_template.jinja"))):
        assert t.render(CONVS[0]) == _auto(saved).apply_chat_template(CONVS[0], tokenize=False)
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": QWEN25}]
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_template(str(src)).source == QWEN25 == HFTokenizer(str(src)).chat_template[1]["template"]
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(TemplateError, match="no chat_template.jinja"):
        load_template(str(src))


def test_sentencepiece_model_with_dummy_prefix(tmp_path):
    """A SentencePiece .model with add_dummy_prefix and remove_extra_whitespaces (the trainer's
    defaults, as Llama 2's): no "▁" at each piece, no space lost at a piece's end; the ids equal
    transformers' on the converted tokenizer.json up to piece boundaries."""
    import io

    import sentencepiece as spm

    from jaxllm.data import sp_model
    from jaxllm.data.tokenizer import Tokenizer as SPTokenizer

    buf = io.BytesIO()
    lines = [line for text in CORPUS for line in text.split("\n") if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=400,
                                   hard_vocab_limit=False, byte_fallback=True, minloglevel=2)
    sp = SPTokenizer(model_proto=buf.getvalue())
    assert sp.id_to_piece(sp.encode("Hi")[0]).startswith("▁") and sp.decode(sp.encode("  a  b ")) == "a b"
    folder = _folder(tmp_path / "sp", sp_model.to_tokenizer_json(buf.getvalue()), MISTRAL)
    theirs = _auto(folder)
    conv = CONVS[1]
    ids, turns = encode_conversation(conv, sp, MISTRAL)
    render = theirs.apply_chat_template(conv, tokenize=False)
    assert sp.decode(ids) == render.replace("</s>", "").replace("<s>", "")  # control pieces decode to ""
    assert sp.decode(ids[turns == 1]) == "The answer is 5." and ids[turns == 1][-1] == sp.eos_id
    ref = _hf_ids(theirs, conv)
    segments = render_segments(conv, load_template(MISTRAL), bos_token="<s>", eos_token="</s>")
    _check_boundary_only(list(ids), ref, theirs, render, np.cumsum([len(t) for t, _ in segments]))


def test_encode_piece_prefix_rules(trained, tmp_path):
    """The start-of-text prefix once, at the start, never after an added token: checked against
    tokenizers' own whole-text encoding (prepend_scheme "first") for Metaspace, by hand for a
    byte-level tokenizer with add_prefix_space (which transformers spaces after every special)."""
    from tokenizers import Tokenizer as RawTok

    from jaxllm.data.hf_export import tokenizer_json
    from jaxllm.data.hf_tokenizer import PrefixError

    meta = HFTokenizer(str(_folder(tmp_path / "m", trained["metaspace-always-bpe"].to_str(), "")))
    first = RawTok.from_str(prefix_at_start_only(trained["metaspace-always-bpe"].to_str()))
    for text in ("Hi there", " Hi there", "<|im_start|>user\nHi", "\nHi", ""):
        assert meta.encode_piece(text, start=True) == first.encode(text, add_special_tokens=False).ids
    assert meta.id_to_piece(meta.encode_piece("Hi", start=True)[0]).startswith("▁")
    assert not meta.id_to_piece(meta.encode_piece("Hi")[0]).startswith("▁")
    assert meta.encode("Hi") == meta.encode_piece("Hi", start=True)  # a plain document: unchanged

    spec = json.loads(trained["bytelevel"].to_str())
    spec["pre_tokenizer"]["add_prefix_space"] = True
    spaced = HFTokenizer(str(_folder(tmp_path / "b", json.dumps(spec), "")))
    assert spaced.decode(spaced.encode("<|im_start|>Hi")) == "<|im_start|> Hi"  # the tokenizer's own habit
    assert spaced.decode(spaced.encode_piece("<|im_start|>Hi", start=True)) == "<|im_start|>Hi"
    assert spaced.decode(spaced.encode_piece("Hi", start=True)) == " Hi"
    assert spaced.decode(spaced.encode_piece("Hi")) == "Hi"
    with pytest.raises(PrefixError, match="no start-only form"):
        prefix_at_start_only(json.dumps(spec))
    assert "kept as it is" in tokenizer_json(spaced, add_bos=False)[1][0]  # the export says so

    spec = json.loads(trained["legacy-prepend"].to_str())
    spec["normalizer"]["normalizers"][0]["prepend"] = "#"
    odd = HFTokenizer(str(_folder(tmp_path / "p", json.dumps(spec), "")))
    with pytest.raises(PrefixError, match=r"Prepend\('#'\) is not supported"):
        odd.encode_piece("Hi")
