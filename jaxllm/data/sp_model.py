"""SentencePiece model files: the settings chat encoding needs, and conversion to a Hugging Face
`tokenizer.json` that encodes text to the same ids.

Pieces of a longer text: a model with `add_dummy_prefix` puts "▁" before every text it encodes
and `remove_extra_whitespaces` strips each text's ends, so a conversation encoded piece by piece
would gain a "▁" at each piece and lose spaces at their ends. `piece_models` gives the variants
chat encoding uses: at the start of a text the dummy prefix stays, elsewhere it is off, and
whitespace is never removed. Models trained by jaxllm have neither setting, so they are used as
they are.

`to_tokenizer_json` writes the same model for the `tokenizers` library: BPE (merges ranked by
the merged piece's score, SentencePiece's own order; ties between two different splits of one
piece overlapping in a word are the only place the two can differ) or Unigram (the same
segmentation but between ones of equal score, e.g. runs of whitespace pieces in another order,
which SentencePiece's float rounding picks), byte fallback,
the normaliser's precompiled character map, the dummy prefix as a Metaspace "first"
pre-tokenizer, and the control pieces (<unk>, <s>, </s>, <pad>) as special added tokens, so their
text maps to their ids as jaxllm's chat encoding maps the bos/eos strings.
"""

from __future__ import annotations

from jaxllm.errors import UserError

UNIGRAM, BPE = 1, 2  # TrainerSpec.ModelType
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece.Type


class ConversionError(UserError, ValueError):
    """A SentencePiece model this converter cannot express as a tokenizer.json."""


def read_model(model_proto: bytes):
    """The parsed ModelProto of a .model file's bytes."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(model_proto)
    return model


def piece_models(model_proto: bytes) -> tuple[bytes | None, bytes | None]:
    """(model for a text's start, model for the rest), each None where the model itself is right."""
    model = read_model(model_proto)
    norm = model.normalizer_spec
    if not norm.add_dummy_prefix and not norm.remove_extra_whitespaces:
        return None, None
    norm.remove_extra_whitespaces = False
    start = model.SerializeToString()
    norm.add_dummy_prefix = False
    return start, model.SerializeToString()


# ----------------------------------------------------------------------------- conversion


def _merges(pieces) -> list[tuple[str, str]]:
    """BPE merges: every split (left, right) of a normal piece into two normal pieces, in the
    order SentencePiece applies them (higher merged-piece score first)."""
    normal = {p.piece: i for i, p in enumerate(pieces) if p.type == NORMAL}
    found = []
    for piece, i in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                found.append((-pieces[i].score, i, normal[left], normal[right], left, right))
    return [(left, right) for *_, left, right in sorted(found)]


def _check(model) -> None:
    spec, norm = model.trainer_spec, model.normalizer_spec
    if spec.model_type not in (UNIGRAM, BPE):
        raise ConversionError(f"SentencePiece model type {spec.model_type} is not supported (BPE and Unigram are)")
    kinds = {p.type for p in model.pieces}
    if kinds & {USER_DEFINED, UNUSED}:
        raise ConversionError("SentencePiece models with user-defined or unused pieces are not supported")
    if spec.treat_whitespace_as_suffix or not norm.escape_whitespaces:
        raise ConversionError("SentencePiece models with treat_whitespace_as_suffix or without "
                              "escape_whitespaces are not supported")


def to_tokenizer_json(model_proto: bytes, *, bos_on_encode: bool = False) -> str:
    """The SentencePiece model as tokenizer.json text (see the module docstring). With
    `bos_on_encode`, `tokenizer(text)` (add_special_tokens) prepends BOS, as a jaxllm run with
    data.add_bos does for each document."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    model = read_model(model_proto)
    _check(model)
    pieces, spec, norm = model.pieces, model.trainer_spec, model.normalizer_spec
    unk = next((i for i, p in enumerate(pieces) if p.type == UNKNOWN), None)
    if spec.model_type == BPE:
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        tok = Tokenizer(models.BPE(vocab, _merges(pieces), unk_token=None if unk is None else pieces[unk].piece,
                                   fuse_unk=True, byte_fallback=spec.byte_fallback))
    else:
        tok = Tokenizer(models.Unigram([(p.piece, p.score) for p in pieces], unk_id=unk,
                                       byte_fallback=spec.byte_fallback))
    steps = [normalizers.Precompiled(norm.precompiled_charsmap)] if norm.precompiled_charsmap else []
    if norm.remove_extra_whitespaces:
        # Leading spaces become the dummy prefix itself: stripping them would move the text's
        # start off offset 0, where Metaspace "first" looks for it.
        steps += [normalizers.Replace(Regex(" +$"), ""), normalizers.Replace(Regex(" {2,}"), " "),
                  normalizers.Replace(Regex("^ "), "▁" if norm.add_dummy_prefix else "")]
    if steps:
        tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if norm.add_dummy_prefix else "never", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else []))
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in pieces if p.type in (CONTROL, UNKNOWN)])
    bos = pieces[spec.bos_id].piece if 0 <= spec.bos_id < len(pieces) else None
    if bos_on_encode and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, spec.bos_id)])
    return tok.to_str()


def special_pieces(model_proto: bytes) -> dict[str, str]:
    """{"unk_token", "bos_token", "eos_token", "pad_token"} -> piece text, for those the model has."""
    model = read_model(model_proto)
    spec, n = model.trainer_spec, len(model.pieces)
    ids = {"unk_token": spec.unk_id, "bos_token": spec.bos_id, "eos_token": spec.eos_id, "pad_token": spec.pad_id}
    return {k: model.pieces[i].piece for k, i in ids.items() if 0 <= i < n}
