"""A run's tokenizer and chat template as Hugging Face files, beside an exported checkpoint.

    tokenizer.json          the run's tokenizer: a SentencePiece .model converted
                            (`sp_model.to_tokenizer_json`), or its tokenizer.json with the
                            start-of-text prefix at the text's start only (`hf_tokenizer`)
    tokenizer_config.json   bos/eos/pad/unk strings, the chat template, model_max_length
    generation_config.json  bos/eos/pad ids; eos_token_id lists the template's turn end too
                            when that is one token (chatml's <|im_end|>, Llama 3's <|eot_id|>)

With these `AutoTokenizer.from_pretrained` encodes text as the run did and
`apply_chat_template` renders what the run trained on (BOS included where data.add_bos put it
there) with the same ids up to piece boundaries (`jaxllm.data.chat`).
"""

from __future__ import annotations

import json
import os
import tempfile

from jaxllm.data.chat import ChatEncoder, ChatTemplate, render_segments

# Files of a tokenizer folder that would override what is written here if left from an older export.
_STALE = ("chat_template.jinja", "special_tokens_map.json")
_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def _write(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def tokenizer_json(tokenizer, *, add_bos: bool) -> tuple[str, list[str]]:
    """(tokenizer.json text, notes on what it cannot express)."""
    model_proto = getattr(tokenizer, "model_proto", None)
    if model_proto is not None:
        from jaxllm.data.sp_model import to_tokenizer_json

        return to_tokenizer_json(model_proto, bos_on_encode=add_bos), []
    from jaxllm.data.hf_tokenizer import PrefixError, prefix_at_start_only

    try:
        return prefix_at_start_only(tokenizer.to_json()), []
    except PrefixError as e:
        return tokenizer.to_json(), [f"tokenizer.json kept as it is ({e}): transformers adds that prefix "
                                     "after every special token too, jaxllm's chat encoding does not"]


def special_tokens(tokenizer) -> dict[str, str]:
    """{"bos_token", "eos_token", "pad_token", "unk_token"} -> text, for those the tokenizer has."""
    model_proto = getattr(tokenizer, "model_proto", None)
    if model_proto is not None:
        from jaxllm.data.sp_model import special_pieces

        return special_pieces(model_proto)
    names = ("bos_token", "eos_token", "pad_token", "unk_token")
    return {k: getattr(tokenizer, k) for k in names if getattr(tokenizer, k, None)}


def trained_template(template: ChatTemplate, tokenizer, *, add_bos: bool) -> str:
    """The template's source, prefixed with `{{ bos_token }}` where the run put a BOS before
    conversations the template does not start with one (data.add_bos)."""
    encoder = ChatEncoder(tokenizer)
    if not add_bos or tokenizer.bos_id < 0 or not encoder.bos_token:
        return template.source
    render = template.render(_PROBE, bos_token=encoder.bos_token, eos_token=encoder.eos_token)
    return template.source if render.startswith(encoder.bos_token) else "{{ bos_token }}" + template.source


def stop_tokens(tokenizer, template: ChatTemplate) -> tuple[list[int], list[str]]:
    """([eos id, the turn-end marker's id when it is one token], notes)."""
    encoder = ChatEncoder(tokenizer)
    stops = [tokenizer.eos_id] if tokenizer.eos_id >= 0 else []
    segments = render_segments(_PROBE, template, bos_token=encoder.bos_token, eos_token=encoder.eos_token)
    trained = "".join(text for text, turn in segments if turn == 1)
    marker = trained[len("Hello"):].strip() if trained.startswith("Hello") else ""
    if not marker:
        return stops, []
    ids = encoder.encode(marker)
    if len(ids) == 1:
        return stops + [i for i in ids if i not in stops], []
    return stops, [f"the template's turn end {marker!r} is {len(ids)} tokens, not one: generation stops at EOS only"]


def export_tokenizer(tokenizer, template: ChatTemplate, folder: str, *, add_bos: bool,
                     model_max_length: int) -> list[str]:
    """Writes tokenizer.json, tokenizer_config.json and generation_config.json into `folder`;
    returns one-line notes on what the files cannot express."""
    text, notes = tokenizer_json(tokenizer, add_bos=add_bos)
    stops, stop_notes = stop_tokens(tokenizer, template)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special_tokens(tokenizer),
              "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
              "chat_template": trained_template(template, tokenizer, add_bos=add_bos)}
    generation = {"bos_token_id": tokenizer.bos_id if tokenizer.bos_id >= 0 else None,
                  "eos_token_id": stops[0] if len(stops) == 1 else (stops or None),
                  "pad_token_id": tokenizer.pad_id}
    os.makedirs(folder, exist_ok=True)
    for name in _STALE:
        if os.path.exists(os.path.join(folder, name)):
            os.unlink(os.path.join(folder, name))
    _write(os.path.join(folder, "tokenizer.json"), text)
    _write(os.path.join(folder, "tokenizer_config.json"), json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    _write(os.path.join(folder, "generation_config.json"),
           json.dumps({k: v for k, v in generation.items() if v is not None}, indent=2) + "\n")
    return notes + stop_notes
