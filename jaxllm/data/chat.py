"""Chat templates, and conversations encoded through them: (ids, loss mask) with exact spans.

A conversation is a `messages` list of `{"role": "system"|"user"|"assistant", "content": str}`
(the tulu-3-sft-mixture / SmolTalk format).

Templates are Jinja2 strings like Hugging Face's `chat_template`, rendered in a sandbox with
transformers' settings (trim_blocks, lstrip_blocks, loop controls, `raise_exception`) and the
variables `messages`, `bos_token`, `eos_token`, `add_generation_prompt`. The built-ins
(`chatml`, `tulu`, `llama3`) are Jinja strings too, so every template goes through one path.

Loss spans are found template-agnostically, as open-instruct does, by rendering the
conversation prefix by prefix: for an assistant message i the text between
render(messages[:i], add_generation_prompt=True) and render(messages[:i+1]) is the reply
(content plus the turn's end marker / eos); the role header before it and whitespace after it
are not trained on. Each such piece is tokenized on its own and the ids concatenated, so the
token boundaries always coincide with the span boundaries (tokenizing the whole string could
merge tokens across a boundary) and the prompt is tokenized exactly as at inference, where the
generation prompt is tokenized alone. A template whose renders are not prefixes of each other
(e.g. one that rewrites earlier turns) raises `TemplateError`.

`sft_segments` turns one SFT record into the segments that `jaxllm.data.sft_packing` lays
into rows; `jaxllm.data.preference_data` builds preference rows from `encode_conversation`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence

import numpy as np

ROLES = ("system", "user", "assistant")
TRUNCATION = ("truncate_end", "drop")

BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    # open-instruct's tulu template (the last assistant turn gets no trailing newline).
    "tulu": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
        "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{% if not loop.last %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
        "{% else %}{{ '<|assistant|>\n' + message['content'] + eos_token }}{% endif %}"
        "{% endif %}"
        "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
        "{% endfor %}"),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
}


class TemplateError(ValueError):
    """A template that does not compile, or does not render conversation prefixes consistently."""


class ConversationError(ValueError):
    """A malformed conversation; `reason` is the skip-count key (no message index in it)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}{': ' + detail if detail else ''}")
        self.reason = reason


# ----------------------------------------------------------------------------- templates


class ChatTemplate:
    """A compiled Jinja2 chat template."""

    def __init__(self, source: str, name: str = "<template>"):
        from jinja2 import TemplateSyntaxError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(f"{name}: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = raise_exception
        try:
            self._template = env.from_string(source)
        except TemplateSyntaxError as e:
            raise TemplateError(f"{name}: bad Jinja template: {e}") from e
        self.source, self.name = source, name

    def render(self, messages: Sequence[dict], *, bos_token: str = "", eos_token: str = "",
               add_generation_prompt: bool = False) -> str:
        return self._template.render(messages=list(messages), bos_token=bos_token, eos_token=eos_token,
                                     add_generation_prompt=add_generation_prompt)

    def __repr__(self) -> str:
        return f"ChatTemplate({self.name})"


def load_template(spec: str | ChatTemplate | None = None, tokenizer=None) -> ChatTemplate:
    """A template from a built-in name, a `tokenizer_config.json` path (or its folder), a Jinja
    string, or (spec None) the tokenizer's own `chat_template`."""
    if isinstance(spec, ChatTemplate):
        return spec
    if spec is None:
        source = getattr(tokenizer, "chat_template", None)
        if source is None:
            raise TemplateError("no chat template given and the tokenizer has none")
        return ChatTemplate(_pick_template(source, "tokenizer"), "tokenizer chat_template")
    if spec in BUILTIN_TEMPLATES:
        return ChatTemplate(BUILTIN_TEMPLATES[spec], spec)
    if "{{" in spec or "{%" in spec:
        return ChatTemplate(spec)
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(path):
        raise TemplateError(f"{spec}: not a built-in template ({', '.join(BUILTIN_TEMPLATES)}), "
                            "a Jinja string, or a tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if "chat_template" not in config:
        raise TemplateError(f"{path}: no chat_template")
    return ChatTemplate(_pick_template(config["chat_template"], path), path)


def _pick_template(value, where: str) -> str:
    # Newer configs may hold a list of named templates; SFT wants the default one.
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" not in named:
            raise TemplateError(f"{where}: chat_template list has no 'default' ({', '.join(map(str, named))})")
        value = named["default"]
    if not isinstance(value, str):
        raise TemplateError(f"{where}: chat_template is not a string")
    return value


# ----------------------------------------------------------------------------- tokenization


def _special_strings(tokenizer) -> dict[str, int]:
    """bos/eos token text -> id. SentencePiece never matches control pieces in text, so the
    template's bos/eos strings are mapped to their ids by hand (harmless for HF tokenizers)."""
    out = {}
    for name in ("bos", "eos"):
        i = getattr(tokenizer, f"{name}_id")
        if i is None or i < 0:
            continue
        text = getattr(tokenizer, f"{name}_token", None)
        if text is None and hasattr(tokenizer, "id_to_piece"):
            text = tokenizer.id_to_piece(i)
        if text:
            out[text] = i
    return out


def _encoder(tokenizer):
    specials = _special_strings(tokenizer)
    if not specials:
        return tokenizer.encode
    pattern = re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")")

    def encode(text: str) -> list[int]:
        ids = []
        for k, part in enumerate(pattern.split(text)):
            if k % 2:
                ids.append(specials[part])
            elif part:
                ids += tokenizer.encode(part)
        return ids
    return encode


def validate_messages(messages: Any) -> list[dict]:
    """The conversation, or ConversationError saying what is wrong with it."""
    if not isinstance(messages, list) or not messages:
        raise ConversationError("empty conversation" if isinstance(messages, list) else "messages is not a list")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConversationError("message lacks role or content", f"message {k}")
        if m["role"] not in ROLES:
            raise ConversationError("unknown role", f"message {k} has role {m['role']!r}")
        if not isinstance(m["content"], str):
            raise ConversationError("content is not a string", f"message {k}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ConversationError("no assistant turn")
    return messages


def render_segments(messages: Sequence[dict], template: ChatTemplate, *, bos_token: str = "",
                    eos_token: str = "") -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_assistant) pieces, found prefix by prefix."""
    render = lambda msgs, gen=False: template.render(msgs, bos_token=bos_token, eos_token=eos_token,
                                                     add_generation_prompt=gen)

    def check(prefix: str, text: str, what: str):
        if not text.startswith(prefix):
            raise TemplateError(
                f"{template.name}: rendering is not prefix-consistent ({what}); the loss mask needs "
                f"each conversation prefix to render as a prefix of the whole. Got {prefix[-60:]!r} "
                f"vs {text[len(prefix) - 60:len(prefix) + 20]!r}")

    segments: list[tuple[str, bool]] = []
    prev = ""
    for i, message in enumerate(messages):
        cur = render(messages[:i + 1])
        check(prev, cur, f"messages[:{i}] vs messages[:{i + 1}]")
        if message["role"] != "assistant":
            segments.append((cur[len(prev):], False))
        else:
            try:
                head = render(messages[:i], True)
            except Exception:
                if i:
                    raise
                head = prev  # a template that cannot render no messages: locate the reply instead
            if head == prev:  # the template ignores add_generation_prompt: find the reply itself
                at = cur.find(message["content"].strip(), len(prev)) if message["content"].strip() else -1
                if at < 0:
                    raise TemplateError(f"{template.name}: cannot locate assistant message {i} in the "
                                        "render (the template ignores add_generation_prompt)")
                head = cur[:at]
            check(prev, head, f"messages[:{i}] vs its generation prompt")
            check(head, cur, f"generation prompt vs messages[:{i + 1}]")
            reply = cur[len(head):]
            body = reply.rstrip()  # trailing newline after the end marker: not the model's to predict
            segments += [(head[len(prev):], False), (body, True), (reply[len(body):], False)]
        prev = cur
    return [(text, a) for text, a in segments if text]


class ChatEncoder:
    """Text -> ids with the template's bos/eos strings mapped to their ids, plus those strings."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.encode = _encoder(tokenizer)
        specials = {i: s for s, i in _special_strings(tokenizer).items()}
        self.bos_token = specials.get(tokenizer.bos_id, "")
        self.eos_token = specials.get(tokenizer.eos_id, "")


def encode_conversation(messages: Any, tokenizer, template: ChatTemplate | str | None, *,
                        add_bos: bool = False, encoder: ChatEncoder | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32, turns int32) of one whole conversation, untruncated.

    turns[t] is k on the tokens of the k-th assistant reply (1, 2, ...; content plus its end
    marker) and 0 elsewhere. Malformed conversations raise ConversationError. `add_bos`
    prepends BOS unless the template already starts with it.
    """
    messages = validate_messages(messages)
    template = load_template(template, tokenizer)
    encoder = encoder or ChatEncoder(tokenizer)
    segments = render_segments(messages, template, bos_token=encoder.bos_token, eos_token=encoder.eos_token)
    ids, turns, k = [], [], 0
    for text, is_assistant in segments:
        piece = encoder.encode(text)
        k += is_assistant
        ids += piece
        turns += [k if is_assistant else 0] * len(piece)
    if add_bos and tokenizer.bos_id >= 0 and ids[:1] != [tokenizer.bos_id]:
        ids, turns = [tokenizer.bos_id] + ids, [0] + turns
    return np.asarray(ids, np.int32), np.asarray(turns, np.int32)


def tokenize_conversation(messages: Any, tokenizer, template: ChatTemplate | str, *, max_len: int,
                          truncation: str = "truncate_end", add_bos: bool = False
                          ) -> tuple[np.ndarray, np.ndarray] | None:
    """(ids int32, loss_mask int32) of one conversation; mask 1 on assistant reply tokens.

    Longer than `max_len`: "truncate_end" cuts the end, "drop" returns None; None too when the
    cut leaves no assistant token. Malformed conversations raise ConversationError.
    `add_bos` prepends BOS unless the template already starts with it.
    """
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")
    ids, turns = encode_conversation(messages, tokenizer, template, add_bos=add_bos)
    mask = (turns > 0).astype(np.int32)
    if len(ids) > max_len:
        if truncation == "drop":
            return None
        ids, mask = ids[:max_len], mask[:max_len]
    if not mask.any():
        return None
    return ids, mask


def sft_segments(messages: Any, tokenizer, template: ChatTemplate | str, *, max_len: int,
                 truncation: str = "truncate_end", add_bos: bool = False, negative: str | None = None,
                 encoder: ChatEncoder | None = None) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The packing segments of one SFT record: [(ids, loss_mask, ul_mask)] (int32 each).

    The conversation itself (loss_mask on assistant tokens, ul_mask 0), then, when `negative`
    is given (an alternative reply to the last user turn), that turn's context followed by the
    negative reply (loss_mask 0, ul_mask 1 on the negative reply's tokens). Each segment holds
    at most `max_len` tokens under `truncation`; a record that cannot be kept raises
    ConversationError with the skip reason ("too long", "no assistant token after truncation",
    "no user turn before the negative reply", "empty negative reply", "negative reply does not fit").
    """
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")
    template = load_template(template, tokenizer)
    encoder = encoder or ChatEncoder(tokenizer)

    def fit(ids, mask, what_empty: str):
        if len(ids) > max_len:
            if truncation == "drop":
                raise ConversationError("too long")
            ids, mask = ids[:max_len], mask[:max_len]
        if not mask.any():
            raise ConversationError(what_empty)
        return ids, mask

    ids, turns = encode_conversation(messages, tokenizer, template, add_bos=add_bos, encoder=encoder)
    ids, mask = fit(ids, (turns > 0).astype(np.int32), "no assistant token after truncation")
    out = [(ids, mask, np.zeros_like(mask))]
    if negative is not None:
        if not isinstance(negative, str):
            raise ConversationError("negative reply is not a string")
        if not negative.strip():
            raise ConversationError("empty negative reply")
        users = [k for k, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            raise ConversationError("no user turn before the negative reply")
        context = list(messages[:users[-1] + 1])
        neg_ids, neg_turns = encode_conversation(context + [{"role": "assistant", "content": negative}], tokenizer,
                                                 template, add_bos=add_bos, encoder=encoder)
        last = sum(m["role"] == "assistant" for m in context) + 1
        neg_ids, ul = fit(neg_ids, (neg_turns == last).astype(np.int32), "negative reply does not fit")
        out.append((neg_ids, np.zeros_like(ul), ul))
    return out
